"""How the out-of-distribution score was chosen: candidate scores on one trained run.

    python benchmarks/ood_choice.py --run runs/demo        # after `make demo-model` (about 3 minutes)

For the run's model, in PyTorch: each candidate's share of images answered as known at a
threshold that keeps 98.5% of validation images (split-conformal, as export does), and its
AUROC against the run's held-out test images (its test/ folder), on the same sources as
benchmarks/ood.py (other random draws of them). Candidates:

  msp            the maximum softmax probability (what "not sure" alone uses)
  energy         the free energy of the logits (Liu et al. 2020)
  knn            distance to the 10th nearest training image, cosine, last block (Sun et al. 2022)
  maha-last      Mahalanobis, shared covariance, last block's pooled tokens (Lee et al. 2018)
  relmaha-last   relative Mahalanobis (Ren et al. 2021), last block
  maha-fcnorm    Mahalanobis on the features after the final LayerNorm, as the head reads them
  maha-all       Mahalanobis on every block's pooled tokens side by side (what export uses
                 when the training images support it)

Writes benchmarks/ood_choice_cpu.json. The choice was made on these sources, so the
benchmark's table is not an unseen-source measurement; it is why the file carries maha-all
(guarded since by a distance on the patch embedding, export.ood).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ood import auroc, digits, letters, photos, synthetic  # noqa: E402
from export.ood import KEEP, conformal_threshold, fit_gaussian  # noqa: E402
from vit.bench import portable  # noqa: E402
from vit.imageio import Preprocessing, open_image  # noqa: E402
from vit.model import mean_of_views, with_mirrors  # noqa: E402
from vit.run import RunDir  # noqa: E402
from vit.runtime import softmax  # noqa: E402


@torch.no_grad()
def features(model, prep: dict, images: list) -> dict[str, np.ndarray]:
    """Per image: every block's pooled tokens (N, L, D), the head's input, and the logits; for a
    model that averages each image with its mirror (``mirror_average``), each averaged over the
    two views, as the model's prediction and the exported score are."""
    prep = Preprocessing.from_dict(prep)
    mirrored = model.config.mirror_average
    views = with_mirrors if mirrored else (lambda x: x)
    mean = mean_of_views if mirrored else (lambda t: t)
    taps, heads, logits = [], [], []
    for i in range(0, len(images), 128):
        x = torch.from_numpy(np.stack([prep(im.convert("RGB")) for im in images[i : i + 128]]))
        t = []
        y, _ = model.forward_pooled(views(x), taps=t)
        f = model.fc_norm(y)
        taps.append(mean(torch.stack(t[1:], 1)))  # the blocks' (t[0] is z_0, before any block)
        heads.append(mean(f))
        logits.append(mean(model.head(f)))
    cat = lambda xs: torch.cat(xs).double().numpy()  # noqa: E731
    return dict(taps=cat(taps), head=cat(heads), logits=cat(logits))


def mahalanobis(train: np.ndarray, labels: np.ndarray, k: int, relative: bool = False):
    means, precision = fit_gaussian(train, labels, k)
    if relative:
        mean0, precision0 = fit_gaussian(train, np.zeros(len(train), int), 1)

    def score(f: np.ndarray) -> np.ndarray:
        d = f[:, None] - means[None]
        s = np.einsum("nkd,de,nke->nk", d, precision, d)
        if relative:
            d0 = f - mean0[0]
            s = s - np.einsum("nd,de,ne->n", d0, precision0, d0)[:, None]
        return s.min(1)

    return score


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/ood_choice.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--fit-images", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ood_choice_cpu.json")
    a = p.parse_args(argv)
    run = RunDir(a.run)
    model, cfg = run.load_one(), run.config()  # an ensemble's first model: the one the file's score reads
    root, prep, k = run.data_root(), cfg["preprocessing"], len(cfg["labels"])

    def split(which, limit=None):
        items = run.items(which, limit)
        return [open_image(root / r) for r, _ in items], np.array([y for _, y in items])

    (tr, ytr), (va, _), (te, _) = split("train", a.fit_images), split("val"), split("test")
    if not te:
        raise SystemExit(f"{a.run} has no test/ split: the AUROC needs held-out in-distribution images")
    rng = np.random.default_rng(1)
    sources = {**synthetic(rng), "photos and crops": photos(rng), "handwritten digits": digits()}
    sources["letters"] = letters(rng)
    f = {name: features(model, prep, imgs) for name, imgs in (("train", tr), ("val", va), ("test", te))}
    f.update({name: features(model, prep, imgs) for name, imgs in sources.items()})
    last = lambda g: g["taps"][:, -1]  # noqa: E731
    every = lambda g: g["taps"].reshape(len(g["taps"]), -1)  # noqa: E731
    train_last = last(f["train"]) / np.linalg.norm(last(f["train"]), axis=1, keepdims=True)
    candidates = {
        "msp": lambda g: -softmax(g["logits"]).max(1),
        "energy": lambda g: -np.log(np.exp(g["logits"] - g["logits"].max(1, keepdims=True)).sum(1))
        - g["logits"].max(1),
        "knn": lambda g: -np.sort((last(g) / np.linalg.norm(last(g), axis=1, keepdims=True)) @ train_last.T, 1)[:, -10],
        "maha-last": (lambda s: lambda g: s(last(g)))(mahalanobis(last(f["train"]), ytr, k)),
        "relmaha-last": (lambda s: lambda g: s(last(g)))(mahalanobis(last(f["train"]), ytr, k, relative=True)),
        "maha-fcnorm": (lambda s: lambda g: s(g["head"]))(mahalanobis(f["train"]["head"], ytr, k)),
        "maha-all": (lambda s: lambda g: s(every(g)))(mahalanobis(every(f["train"]), ytr, k)),
    }  # fmt: skip
    doc = dict(
        run=portable(str(a.run)), fit_images=len(ytr), keep=KEEP, command="python benchmarks/ood_choice.py", results={}
    )
    for name, score in candidates.items():
        threshold = conformal_threshold(score(f["val"]), KEEP)
        test = score(f["test"])
        row = {"held-out test known": round(float(np.mean(test <= threshold)), 4)}
        for source in sources:
            s = score(f[source])
            row[source] = dict(known=round(float(np.mean(s <= threshold)), 4), auroc=round(auroc(test, s), 4))
        doc["results"][name] = row
        print(name, row, flush=True)
    from vit import files
    from vit.bench import machine

    doc["machine"] = machine()
    files.write_json(a.out, doc)
    print(f"wrote {a.out}")
    return doc


if __name__ == "__main__":
    main()
