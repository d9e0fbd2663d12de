"""Candidates for the rest of a time budget, screened on runs kept by ``benchmarks/learning.py
--keep``: test-time shifted views, and an ensemble of members that split the budget.

    python benchmarks/learning.py --only digits --budget 5 --seeds 3 --methods vit --keep --work W
    python benchmarks/budget_spend.py --work W                            # views, latency: a minute
    python benchmarks/budget_spend.py --work W --members 2 --budget 5     # + 2 members of 2.5 min each
    python benchmarks/budget_spend.py --work W --members 2 --each 8 --kept-first  # + a second 8-min run

For each kept split (W/<data>-<seed>/data with its test/ folder, W/<data>-<seed>/vit-run):
  views     the kept model's test accuracy when its logits are averaged over shifted copies
            of each image (edges repeated, bilinear for fractions of a pixel): the image and
            4 copies moved by s px left, right, up and down ("cross"), or 2 copies moved
            along a diagonal ("diagonal"), for s of 1/4, 1/2 and 1 px of the native image;
  members   K train.py runs on the same training folder with seeds S, S+100, ..., each with
            BUDGET / K minutes (or --each), and the test accuracy of their mean logits; with
            --kept-first the kept run is member 0 (a run that ends at its epoch cap with most
            of its budget left, as on tiny data, leaves room for more members); with --same-split
            the others train on the kept run's own train/val split (as members of one run
            would), not on a validation split drawn from their own seed;
  latency   onnxruntime's time for 1 image against V images in one batch (2 threads), of a
            logits-only graph of the first split's model (no attention map, no score): what V
            views cost, not the exported file's own latency; medians of 15 rounds of 40 calls.
Members are trained with train.py's defaults, whatever flags the kept runs had.
The test split is used for no choice inside a run; these numbers choose between candidates,
so a candidate picked here is to be confirmed on other splits before it becomes a default.
Writes benchmarks/budget_spend_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shifted(x, dx: float, dy: float):
    """(B, C, H, W) moved right by dx and down by dy px; edges repeated, bilinear between pixels."""
    import torch.nn.functional as F

    p = int(np.ceil(max(abs(dx), abs(dy)))) + 1
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    H, W = x.shape[-2:]
    fx, fy = int(np.floor(dx)), int(np.floor(dy))
    ax, ay = dx - fx, dy - fy

    def take(ox: int, oy: int):
        return xp[..., p - oy : p - oy + H, p - ox : p - ox + W]

    return (
        (1 - ax) * (1 - ay) * take(fx, fy)
        + ax * (1 - ay) * take(fx + 1, fy)
        + (1 - ax) * ay * take(fx, fy + 1)
        + ax * ay * take(fx + 1, fy + 1)
    )


def view_sets(native_px: float) -> dict[str, list[tuple[float, float]]]:
    """Shift sets, in input px, for shifts of 1/4, 1/2 and 1 native px (``native_px``: input px per native px)."""
    sets = {"image only": [(0.0, 0.0)]}
    for frac in (0.25, 0.5, 1.0):
        s = frac * native_px
        sets[f"cross {frac:g} px (5 views)"] = [(0, 0), (s, 0), (-s, 0), (0, s), (0, -s)]
        sets[f"diagonal {frac:g} px (3 views)"] = [(0, 0), (s, s), (-s, -s)]
    return sets


def load_run(run: Path):
    """The run's own model and its config: an ensemble's first model alone (a kept run of
    tiny data trains a second one unless --members 1; the members here are trained with it)."""
    from vit.run import RunDir

    return RunDir(run).load_one(), RunDir(run).config()


def test_tensors(root: Path, cfg: dict):
    import torch

    from vit.imageio import Preprocessing, open_image

    prep = Preprocessing.from_dict(cfg["preprocessing"])
    files = [(f, i) for i, c in enumerate(cfg["labels"]) for f in sorted((root / "test" / c).iterdir())]
    x = torch.from_numpy(np.stack([prep(open_image(f)) for f, _ in files]))
    return x, torch.tensor([y for _, y in files])


def views(split: Path) -> dict[str, float]:
    import torch

    model, cfg = load_run(split / "vit-run")
    x, y = test_tensors(split / "data", cfg)
    from PIL import Image

    with Image.open(next((split / "data" / "test").glob("*/*"))) as first:
        native = min(first.size)  # the data's own side (these data sets' images are all one size)
    out = {}
    with torch.no_grad():
        for name, shifts in view_sets(x.shape[-1] / native).items():
            logits = sum(model(shifted(x, dx, dy)) for dx, dy in shifts) / len(shifts)
            out[name] = round(float((logits.argmax(1) == y).float().mean()), 4)
    return out


def same_split_folder(split: Path) -> Path:
    """The kept run's own train/val split as a folder (train/, val/, and the test/ beside them):
    members trained on it share the kept run's training and validation images, as members of
    one run would, instead of drawing a validation split of their own from their seed."""
    out = split / "kept-split"
    if not (out / "val").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        saved = json.loads((split / "vit-run" / "split.json").read_text())
        for which in ("train", "val"):
            for rel, _ in saved[which]:
                src = split / "data" / rel
                dst = out / which / src.parent.name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        shutil.copytree(split / "data" / "test", out / "test")
    return out


def members(
    split: Path, seed: int, budget: float, k: int, each: float | None = None, kept_first: bool = False,
    same_split: bool = False,
) -> dict:  # fmt: skip
    """K train.py runs of budget / K minutes (``each``: of that many) on the split's training
    folder; their mean logits on test. ``kept_first``: the kept run is member 0 (seed S);
    ``same_split``: the others train on the kept run's own train/val split (same_split_folder)."""
    import torch

    each = each or budget / k
    data = same_split_folder(split) if same_split else split / "data"
    tag = "-same" if same_split else ""
    logits, singles, epochs = [], [], []
    for i in range(k):
        run = split / f"member{i}-of-{k}-{budget:g}min{tag}" if not (kept_first and i == 0) else split / "vit-run"
        done = (run / "config.json").exists() and "result" in json.loads((run / "config.json").read_text())
        if not done:  # a member that did not finish is trained again
            shutil.rmtree(run, ignore_errors=True)
            cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--out", str(run)]
            cmd += ["--time-budget", f"{each:g}", "--seed", str(seed + 100 * i), "--members", "1"]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(f"train.py failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        model, cfg = load_run(run)
        x, y = test_tensors(split / "data", cfg)
        with torch.no_grad():
            logits.append(model(x))
        singles.append(round(float((logits[-1].argmax(1) == y).float().mean()), 4))
        epochs.append(cfg["train"].get("epochs_fitted") or cfg["train"]["epochs"])
    ensemble = round(float((sum(logits).argmax(1) == y).float().mean()), 4)
    return dict(member_test_acc=singles, ensemble_test_acc=ensemble, member_epochs=epochs)


def latency(run: Path, batches=(1, 2, 3, 5), rounds: int = 15, calls: int = 40) -> dict[str, float]:
    """onnxruntime ms for a batch of 1, 2, 3 and 5 images of the run's model (logits only)."""
    import onnxruntime as ort

    from export.onnx_export import to_onnx

    model, _ = load_run(run)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(to_onnx(model, attention=False).SerializeToString(), opts)
    name = sess.get_inputs()[0].name
    inputs = {
        b: np.random.default_rng(0).standard_normal((b, 3, *model.config.image_size), np.float32) for b in batches
    }
    times = {b: [] for b in batches}
    for _ in range(rounds):  # every batch once per round: a machine that drifts affects them alike
        for b in batches:
            sess.run(None, {name: inputs[b]})
            t0 = time.perf_counter()
            for _ in range(calls):
                sess.run(None, {name: inputs[b]})
            times[b].append((time.perf_counter() - t0) / calls * 1000)
    return {f"batch {b} ms": round(float(np.median(t)), 3) for b, t in times.items()}


def summary(values: list[float]) -> dict[str, float]:
    a = np.array(values)
    return dict(mean=round(float(a.mean()), 4), std=round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/budget_spend.py", description=__doc__, allow_abbrev=False)
    p.add_argument("--work", type=Path, required=True, help="learning.py --keep's --work folder")
    p.add_argument("--members", type=int, default=0, help="also train an ensemble of this many members")
    p.add_argument("--budget", type=float, default=5.0, help="minutes the members share (default 5)")
    p.add_argument("--each", type=float, help="minutes each member gets (default: --budget / --members)")
    p.add_argument("--kept-first", action="store_true", help="the kept run (seed S) is member 0, not retrained")
    p.add_argument(
        "--same-split", action="store_true", help="members train on the kept run's train/val split, not their own"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "budget_spend_cpu.json")
    a = p.parse_args(argv)
    from vit.bench import command_line, machine

    splits = sorted(s for s in a.work.iterdir() if (s / "vit-run" / "model.safetensors").exists())
    if not splits:
        raise SystemExit(f"no kept runs in {a.work}: run benchmarks/learning.py with --keep --work {a.work} first")
    shown = [v if v != str(a.work) else "W" for v in (argv if argv is not None else sys.argv[1:])]
    doc = dict(command=command_line("python benchmarks/budget_spend.py", shown), machine=machine(), splits={})
    for split in splits:
        seed = int(split.name.rsplit("-", 1)[1])
        row = dict(views=views(split))
        if a.members:
            row.update(members(split, seed, a.budget, a.members, a.each, a.kept_first, a.same_split))
        doc["splits"][split.name] = row
        print(split.name, json.dumps(row), flush=True)
    rows = list(doc["splits"].values())
    doc["summary"] = {name: summary([r["views"][name] for r in rows]) for name in rows[0]["views"]}
    if a.members:
        doc["summary"]["ensemble"] = summary([r["ensemble_test_acc"] for r in rows])
        doc["summary"]["members"] = summary([np.mean(r["member_test_acc"]) for r in rows])
    doc["latency"] = latency(splits[0] / "vit-run")
    for name, s in doc["summary"].items():
        print(f"{name}: {100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
    print(json.dumps(doc["latency"]))
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
