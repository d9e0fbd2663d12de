"""What the flip's mirror check (vit.recipe.mirror_check) decides on the learning benchmark's
datasets, and on crops of photos, over several seeds.

    python benchmarks/mirror_check.py            # about a minute; writes benchmarks/mirror_check.json

For each dataset and seed, the training images of benchmarks/learning.py's split (the same
folders train.py is given there) are reduced to the scan's grey 16x16 thumbnails and checked;
"photos" are random square crops (32 px to the whole height) of the two photographs that
scikit-learn ships, one class per photograph, where a mirrored crop is as good a crop. Prints
a table: images checked, answers turned wrong and right by adding mirrors, the sign test's p,
the decision, and the check's time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.learning import DATASETS  # noqa: E402
from vit.data import THUMB, thumbnail  # noqa: E402
from vit.recipe import mirror_check  # noqa: E402


def folder_thumbs(train: Path) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in train.iterdir())
    x, y = [], []
    for i, c in enumerate(classes):
        for f in sorted((train / c).iterdir()):
            with Image.open(f) as im:
                x.append(np.frombuffer(thumbnail(im), np.uint8).reshape(THUMB, THUMB))
            y.append(i)
    return np.stack(x), np.array(y)


def photo_thumbs(seed: int, per_class: int = 400) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    x, y = [], []
    for i, array in enumerate(load_sample_images().images):
        photo = Image.fromarray(array)
        for _ in range(per_class):
            s = int(rng.integers(32, array.shape[0]))
            left, top = int(rng.integers(0, array.shape[1] - s)), int(rng.integers(0, array.shape[0] - s))
            x.append(
                np.frombuffer(thumbnail(photo.crop((left, top, left + s, top + s))), np.uint8).reshape(THUMB, THUMB)
            )
            y.append(i)
    return np.stack(x), np.array(y)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "mirror_check.json")
    a = p.parse_args(argv)
    rows = []
    for name in [*DATASETS, "photos"]:
        for seed in range(a.seeds):
            if name == "photos":
                x, y = photo_thumbs(seed)
            else:
                work = Path(tempfile.mkdtemp())
                try:
                    DATASETS[name](work, seed)
                    x, y = folder_thumbs(work / "train")
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            t0 = time.perf_counter()
            c = mirror_check(x, y, seed=seed)
            ms = (time.perf_counter() - t0) * 1000
            rows.append(dict(data=name, seed=seed, checked=c.checked, worse=c.worse, better=c.better,
                             p=float(f"{c.p:.3g}"), flip="off" if c.hurts else "on", ms=round(ms, 1)))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    from vit.bench import machine

    doc = {"command": "python benchmarks/mirror_check.py", "machine": machine(), "rows": rows}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("| data | seed | images | worse with mirrors | better | p | flip |\n|---|---|---|---|---|---|---|")
    for r in rows:
        cells = (r["data"], r["seed"], r["checked"], r["worse"], r["better"], f"{r['p']:.2g}", r["flip"])
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
