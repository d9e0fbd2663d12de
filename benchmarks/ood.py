"""Does the model know what it doesn't know? Out-of-distribution answers, per source.

    python benchmarks/ood.py                       # all three models (about 15 minutes on 2 CPU cores)
    python benchmarks/ood.py --only bundled        # the shipped file alone (a minute)
    python benchmarks/ood.py --only digits open-set --seed 1 --without-guard \
        --out benchmarks/ood_guard_stem2_seed1_cpu.json  # the trained models, another seed, and the ablation
    python benchmarks/ood.py --only digits --vit-flags '--stem-depth 1'  # another recipe

For each model, every image goes through the app's own runtime (``vit.runtime``, the ONNX
file alone) and is counted as answered "sure" (like the training images and confident),
"unsure" (between known classes) or "unknown" (unlike every known class). Reported per
source: the share answered "sure", the share answered as known, and the AUROC of the file's
``ood_score`` against the model's own held-out in-distribution test images.

Models:
  bundled   assets/model.onnx, the demo model (10 shapes, 48 px)
  digits    a model trained here on scikit-learn's digits (8 px), with digits held out for its test
  open-set  the demo recipe on 7 of the 10 shapes; the 3 it never saw are the near-OOD source
            (the open-set protocol), scored with the same file-borne score

With --without-guard each trained model is also exported a second time from the same weights
without the patch-embedding guard (``export.ood.STEM_MARGIN``), and scored under "without
the guard": what the guard changes, on one model.

Sources, all made or found offline: uniform noise, flat colours, smooth gradients,
scikit-learn's two sample photos and 200 random crops of them, handwritten digits (for the
shape models), shapes (for the digits model), capital letters rendered in every font the OS
has. Writes benchmarks/ood_cpu.json when every model ran, else only where --out says.
"""

from __future__ import annotations

import argparse
import glob
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vit.runtime import Classifier  # noqa: E402

OPEN_SET_HELD_OUT = ("heart", "moon", "star")


def synthetic(rng: np.random.Generator, n: int = 200, size: int = 64) -> dict[str, list]:
    from export.ood import probe_images

    return probe_images(size, n, seed=int(rng.integers(1 << 30)) + 1)  # other images than export's probes


def photos(rng: np.random.Generator, crops: int = 100) -> list:
    from sklearn.datasets import load_sample_images

    out = []
    for array in load_sample_images().images:
        photo = Image.fromarray(array)
        out.append(photo)
        for _ in range(crops):
            s = int(rng.integers(32, min(array.shape[:2])))
            x, y = int(rng.integers(0, array.shape[1] - s)), int(rng.integers(0, array.shape[0] - s))
            out.append(photo.crop((x, y, x + s, y + s)))
    return out


def digits(n: int = 300, dark_on_light: bool = True, size: int = 64) -> list:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for img in d.images[-n:]:
        a = (img * 255 / 16).round().astype(np.uint8)
        out.append(Image.fromarray(255 - a if dark_on_light else a).resize((size, size), Image.Resampling.BICUBIC))
    return out


def letters(rng: np.random.Generator, n: int = 300, size: int = 64, dark_on_light: bool = True) -> list:
    fonts = sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    if not fonts:
        return []
    out = []
    for i in range(n):
        font = ImageFont.truetype(fonts[i % len(fonts)], int(rng.integers(size // 2, size - 8)))
        bg, ink = ((255, 255, 255), (0, 0, 0)) if dark_on_light else ((0, 0, 0), (255, 255, 255))
        im = Image.new("RGB", (size, size), bg)
        ImageDraw.Draw(im).text((size // 2, size // 2), chr(65 + i % 26), fill=ink, font=font, anchor="mm")
        out.append(im)
    return out


def folder_images(folder: Path) -> list:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*/*.png"))]


def auroc(known: np.ndarray, other: np.ndarray) -> float:
    """P(score of an other image > score of a known one), ties counting half (Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[known, other])
    u = ranks[len(known) :].sum() - len(other) * (len(other) + 1) / 2
    return float(u / (len(known) * len(other)))


def score(clf: Classifier, images: list) -> tuple[np.ndarray, list[str]]:
    scores, status = [], []
    for i in range(0, len(images), 64):
        for p in clf.predict_many(images[i : i + 64]):
            scores.append(p.ood_score)
            status.append(p.status)
    return np.array(scores), status


def evaluate(name: str, model: Path, in_dist: dict[str, list], sources: dict[str, list]) -> dict:
    """Rows per source; the first in-distribution source is the AUROC reference."""
    clf = Classifier(model)
    ref_name = next(iter(in_dist))
    ref, _ = score(clf, in_dist[ref_name])
    rows = {}
    for kind, group in (("in distribution", in_dist), ("out of distribution", sources)):
        for source, images in group.items():
            if not images:
                continue
            s, status = score(clf, images)
            rows[source] = dict(
                kind=kind,
                images=len(images),
                answered_sure=round(status.count("sure") / len(status), 4),
                answered_known=round(1 - status.count("unknown") / len(status), 4),
                auroc=None if source == ref_name else round(auroc(ref, s), 4),
            )
            print(f"{name:9s} {source:32s} {rows[source]}", flush=True)
    return dict(model=str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model.name), sources=rows)


def bundled(rng: np.random.Generator, work: Path) -> dict:
    from vit.datasets import make_shapes

    test = make_shapes(work / "test", 100, 64, seed=1)  # the demo's held-out test/ (never trained on)
    drawn = make_shapes(work / "drawn", 50, 64, seed=3, style="drawing")
    far = {**synthetic(rng), "photos and crops": photos(rng), "handwritten digits": digits(), "letters": letters(rng)}
    in_dist = {"fresh shapes (seed 1)": folder_images(test), "canvas-style drawings": folder_images(drawn)}
    return evaluate("bundled", ROOT / "assets" / "model.onnx", in_dist, far)


# export's main with the patch-embedding guard switched off (an infinite margin): the ablation
UNGUARDED = (
    "import math, sys, export.ood; export.ood.STEM_MARGIN = math.inf; "
    "from export.__main__ import main; sys.exit(main())"
)


def train_and_export(data: Path, out: Path, args: list[str], unguarded: bool = False) -> list[Path]:
    """The trained run's file, and with ``unguarded`` a second one from the same weights
    without the guard."""
    cmds = [
        [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--out", str(out), *args],
        [sys.executable, "-m", "export", str(out), "--out", str(out / "model.onnx")],
    ]
    if unguarded:
        cmds.append([sys.executable, "-c", UNGUARDED, str(out), "--out", str(out / "unguarded.onnx")])
    for cmd in cmds:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return [out / "model.onnx"] + ([out / "unguarded.onnx"] if unguarded else [])


def evaluate_files(name: str, files: list[Path], in_dist: dict[str, list], sources: dict[str, list]) -> dict:
    """``evaluate`` for the file, and under "without the guard" for its unguarded twin."""
    doc = evaluate(name, files[0], in_dist, sources)
    if len(files) > 1:
        doc["without the guard"] = evaluate(f"{name}-", files[1], in_dist, sources)["sources"]
    return doc


def digits_model(rng: np.random.Generator, work: Path, budget: float, flags: list[str], unguarded: bool) -> dict:
    from sklearn.datasets import load_digits

    from vit.datasets import make_shapes

    d = load_digits()
    root = work / "digits"
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = root / ("test" if i >= len(d.images) - 300 else "train") / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    args = ["--time-budget", str(budget), "--workers", "1", *flags]
    files = train_and_export(root, work / "digits-run", args, unguarded)
    shapes = [im.convert("L").resize((8, 8), Image.Resampling.BICUBIC)
              for im in folder_images(make_shapes(work / "shapes8", 30, 64, seed=5))]  # fmt: skip
    far = {
        **synthetic(rng, size=8),
        "photos and crops": [p.resize((8, 8), Image.Resampling.BICUBIC) for p in photos(rng)],
        "shapes": [Image.eval(s, lambda v: 255 - v) for s in shapes],  # light ink on dark, like these digits
        "letters": [im.resize((8, 8), Image.Resampling.BICUBIC) for im in letters(rng, dark_on_light=False)],
    }
    return evaluate_files("digits", files, {"held-out digits": folder_images(root / "test")}, far)


def open_set_model(rng: np.random.Generator, work: Path, budget: float, flags: list[str], unguarded: bool) -> dict:
    from vit.datasets import SHAPES, make_shapes

    known = tuple(s for s in SHAPES if s not in OPEN_SET_HELD_OUT)
    root = work / "open-set"
    make_shapes(root / "train", 1200, 64, seed=0, classes=known)
    make_shapes(root / "test", 100, 64, seed=1, classes=known)
    unseen = make_shapes(work / "unseen", 100, 64, seed=1, classes=OPEN_SET_HELD_OUT)
    demo = "--image-size 48 --patch-size 8 --dim 128 --depth 6 --heads 4 --mlp-dim 256 --batch-size 64"  # demo-model
    args = ["--time-budget", str(budget), "--workers", "1", "--val-fraction", "0.1", *demo.split(), *flags]
    files = train_and_export(root, work / "open-set-run", args, unguarded)
    near = {f"unseen shapes ({', '.join(OPEN_SET_HELD_OUT)})": folder_images(unseen)}
    return evaluate_files("open-set", files, {"held-out known shapes": folder_images(root / "test")}, near)


def latency(model: Path, work: Path, rounds: int = 7, runs: int = 200) -> dict:
    """Batch-1 latency of the file against the same file without its ood_score output (the
    rest of the graph, extracted by onnx.utils), interleaved in rounds; medians in ms."""
    import onnx.utils

    from vit.runtime import ort_session

    plain = work / "without-ood.onnx"
    outputs = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output if o.name != "ood_score"]
    onnx.utils.extract_model(str(model), str(plain), ["pixel_values"], outputs)
    size = tuple(Classifier(model).image_size)
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    sessions = {"with ood_score": ort_session(model), "without": ort_session(plain)}
    times = {k: [] for k in sessions}
    for r in range(rounds):
        for name in sorted(sessions, reverse=r % 2 == 1):  # alternate the order
            sess = sessions[name]
            for _ in range(20):
                sess.run(None, {"pixel_values": x})
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, {"pixel_values": x})
                times[name].append((time.perf_counter() - t) * 1000)
    med = {k: round(float(np.median(v)), 4) for k, v in times.items()}
    med["ratio"] = round(med["with ood_score"] / med["without"], 3)
    print("latency, batch 1 (ms):", med, flush=True)
    return med


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/ood.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    names = ["bundled", "digits", "open-set"]
    p.add_argument("--only", nargs="+", choices=names, default=names, help="which models (default: all)")
    p.add_argument("--budget", type=float, default=4.0, help="training minutes for each model trained here")
    p.add_argument("--seed", type=int, default=0, help="train.py's seed for the models trained here")
    p.add_argument("--vit-flags", default="", help="more train.py flags for the models trained here, one string")
    p.add_argument(
        "--without-guard",
        action="store_true",
        help="also score each trained model's file "
        "exported without the patch-embedding guard (export.ood.STEM_MARGIN), from the same weights",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default: benchmarks/ood_cpu.json "
                   "when every model ran, else none)")  # fmt: skip
    a = p.parse_args(argv)
    out = a.out or (ROOT / "benchmarks" / "ood_cpu.json" if set(a.only) == set(names) else None)
    flags = ["--seed", str(a.seed), *shlex.split(a.vit_flags)]
    from vit.bench import command_line, machine

    rng = np.random.default_rng(0)
    doc = dict(
        machine=machine(),
        command=command_line("python benchmarks/ood.py", sys.argv[1:] if argv is None else argv),
        models={},
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "bundled" in a.only:
            doc["latency_ms"] = latency(ROOT / "assets" / "model.onnx", work)
            doc["models"]["bundled"] = bundled(rng, work)
        for name, fn in (("digits", digits_model), ("open-set", open_set_model)):
            if name in a.only:
                doc["models"][name] = fn(rng, work, a.budget, flags, a.without_guard)
    doc["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    if out is not None:
        from vit import files

        files.write_json(out, doc)
        print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
