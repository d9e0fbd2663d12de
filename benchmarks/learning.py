"""Learning quality: train.py with default settings against an RBF-SVM on raw pixels.

    python benchmarks/learning.py                 # every dataset below
    python benchmarks/learning.py --only digits

For each small dataset, writes it as an image folder, runs ``python train.py --data ...``
with no settings at all (the recipe decides; on a CPU it fits itself to 8 minutes), then
trains scikit-learn's SVC (RBF kernel, C chosen by 3-fold cross-validation on the
training images only) on the raw pixels of the *same* train/validation split that
train.py saved, and scores both on that validation split. Writes
benchmarks/learning_<machine>.json and prints a markdown table.

Datasets (nothing is downloaded):
  digits   scikit-learn's bundled handwritten digits: 1,797 images, 8x8 px, 10 classes
  shapes   this package's procedural shapes: 10 classes x 300 images, 32 px
  shapes64 the same generator at 64 px: 10 classes x 200 images
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_digits(out: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = out / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return out


def write_shapes(out: Path, per_class: int, size: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from vit.datasets import make_shapes

    return make_shapes(out, per_class=per_class, size=size, seed=123)


DATASETS = {
    "digits": write_digits,
    "shapes": lambda out: write_shapes(out, 300, 32),
    "shapes64": lambda out: write_shapes(out, 200, 64),
}


def pixels(root: Path, items: list, side: int) -> np.ndarray:
    from vit.imageio import open_image

    rows = []
    for rel, _ in items:
        img = open_image(root / rel)
        if img.size != (side, side):
            img = img.resize((side, side), Image.Resampling.BICUBIC)
        rows.append(np.asarray(img, dtype=np.float32).ravel() / 255.0)
    return np.stack(rows)


def svm_baseline(root: Path, split: dict) -> dict:
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    side = Image.open(root / split["train"][0][0]).size[0]
    xtr, ytr = pixels(root, split["train"], side), np.array([y for _, y in split["train"]])
    xva, yva = pixels(root, split["val"], side), np.array([y for _, y in split["val"]])
    t0 = time.perf_counter()
    search = GridSearchCV(
        make_pipeline(StandardScaler(), SVC(kernel="rbf", gamma="scale")),
        {"svc__C": [1, 3, 10, 30, 100]},
        cv=3,
        n_jobs=1,
    )
    search.fit(xtr, ytr)
    return dict(
        val_acc=round(float((search.predict(xva) == yva).mean()), 4),
        C=search.best_params_["svc__C"],
        seconds=round(time.perf_counter() - t0, 1),
    )


def run_one(name: str, work: Path) -> dict:
    data, run = work / name / "data", work / name / "run"
    if not data.exists():
        DATASETS[name](data)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--out", str(run)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    minutes = (time.perf_counter() - t0) / 60
    if res.returncode != 0:
        raise SystemExit(f"train.py failed on {name}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    cfg = json.loads((run / "config.json").read_text())
    split = json.loads((run / "split.json").read_text())
    last = (run / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    last_row = dict(zip(header, last))
    last_acc = max(float(last_row["val_acc"]), float(last_row["ema_val_acc"] or 0))
    m = cfg["model"]
    return dict(
        dataset=name,
        classes=len(cfg["labels"]),
        train_images=len(split["train"]),
        val_images=len(split["val"]),
        native_px=Image.open(data / split["train"][0][0]).size[0],
        vit=dict(
            val_acc_best=cfg["result"]["val_acc"],
            val_acc_last_epoch=round(last_acc, 4),
            epochs=cfg["train"].get("epochs_fitted", cfg["train"]["epochs"]),
            wall_minutes=round(minutes, 2),
            model=f"{m['depth']} blocks x {m['dim']} wide, {m['image_size'][0]}px / patch {m['patch_size']}",
            train_images_per_s=float(last_row["images_per_s"]),
            data_wait=float(last_row["data_wait"]),
        ),
        svm=svm_baseline(data, split),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(DATASETS), action="append")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "learning")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "learning_cpu.json")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from vit.bench import machine

    for name in a.only or list(DATASETS):
        print(f"== {name}", flush=True)
        r = run_one(name, a.work)
        print(json.dumps(r, indent=1), flush=True)
        old = json.loads(a.out.read_text())["results"] if a.out.exists() else []
        merged = {x["dataset"]: x for x in old} | {r["dataset"]: r}  # saved after every dataset
        doc = dict(
            machine=machine(),
            platform=platform.platform(),
            command="python benchmarks/learning.py",
            results=list(merged.values()),
        )
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        "\n| dataset | images (train/val) | px | ViT val acc (best / last epoch) | RBF-SVM val acc | ViT minutes "
        "| epochs | train img/s | data wait |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in doc["results"]:
        v, s = r["vit"], r["svm"]
        print(
            f"| {r['dataset']} | {r['train_images']}/{r['val_images']} | {r['native_px']} | "
            f"{v['val_acc_best']:.1%} / {v['val_acc_last_epoch']:.1%} | {s['val_acc']:.1%} | {v['wall_minutes']:.1f} "
            f"| {v['epochs']} | {v['train_images_per_s']:.0f} | {v['data_wait']:.0%} |"
        )


if __name__ == "__main__":
    main()
