"""The bundled demo model on freshly generated shapes it has never seen (other seeds).

    python benchmarks/demo_accuracy.py --model assets/model.onnx

Scores the ONNX file itself, through the torch-free runtime the app uses, on
  - a test set drawn like the training data but with another seed (the >= 98% target), and
  - canvas-style drawings (dark wobbly strokes on white, as people draw in the app),
then writes benchmarks/demo_accuracy.json and refreshes the example images in assets/examples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vit.bench import command_line, portable  # noqa: E402
from vit.datasets import SHAPES, make_shapes  # noqa: E402
from vit.runtime import Classifier  # noqa: E402


def score(clf: Classifier, folder: Path) -> dict:
    files = sorted(folder.glob("*/*.png"))
    correct, per_class = 0, {}
    for i in range(0, len(files), 64):
        chunk = files[i : i + 64]
        for f, p in zip(chunk, clf.predict_many(chunk, top_k=1)):
            ok = p.label == f.parent.name
            correct += ok
            c = per_class.setdefault(f.parent.name, [0, 0])
            c[0] += ok
            c[1] += 1
    return dict(
        images=len(files),
        accuracy=round(correct / len(files), 4),
        per_class={k: round(v[0] / v[1], 4) for k, v in sorted(per_class.items())},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "model.onnx")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "demo_accuracy.json")
    p.add_argument("--examples", type=Path, default=ROOT / "assets" / "examples")
    a = p.parse_args()
    clf = Classifier(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        test = make_shapes(Path(tmp) / "test", a.per_class, 64, seed=1)
        drawn = make_shapes(Path(tmp) / "drawn", a.per_class // 2, 64, seed=3, style="drawing")
        result = dict(
            model=portable(str(a.model.resolve())),
            file_mib=round(a.model.stat().st_size / 2**20, 2),
            val_accuracy=clf.metadata.get("val_accuracy"),
            fresh_test=score(clf, test),
            drawings=score(clf, drawn),
            command=command_line("python benchmarks/demo_accuracy.py", ["--model", str(a.model.resolve())]),
        )
        # A dozen examples: one of each shape (seed 2), and two drawings.
        shutil.rmtree(a.examples, ignore_errors=True)
        a.examples.mkdir(parents=True)
        ex = make_shapes(Path(tmp) / "ex", 1, 128, seed=2)
        for s in SHAPES:
            shutil.copy(ex / s / f"{s}_00000.png", a.examples / f"{s}.png")
        for s in ("star", "heart"):
            shutil.copy(drawn / s / f"{s}_00000.png", a.examples / f"drawn_{s}.png")
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
