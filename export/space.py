"""A folder you can push to a Hugging Face Space as is.

    python -m export space RUN_DIR --out my-space        # exports and verifies the model first
    python -m export space model.onnx --out my-space     # an ONNX file made by python -m export

The folder holds app.py, the torch-free runtime it imports (RUNTIME_FILES: a test checks
that it is every project file app.py imports), the model, example images, a requirements.txt without torch and a
README.md whose front matter Spaces reads and whose body is a model card built from the
model's own metadata and, for a run, its validation report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_FILES = ("app.py", "vit/__init__.py", "vit/cpus.py", "vit/imageio.py", "vit/runtime.py")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("gradio", "onnxruntime", "numpy", "pillow")}


def pick_examples(run_dir: Path, per_class: int, limit: int = 12, data: Path | None = None) -> list[tuple[Path, str]]:
    """Validation images, round-robin over classes, as (path, label)."""
    from vit.run import RunDir

    run = RunDir(run_dir)
    labels, root = run.config()["labels"], run.data_root(data)
    by_class: dict[int, list[str]] = {}
    for rel, y in run.items("val"):
        by_class.setdefault(y, []).append(rel)
    picked = []
    for k in range(per_class):
        for y in sorted(by_class):
            if k < len(by_class[y]) and len(picked) < limit:
                picked.append((root / by_class[y][k], labels[y]))
    return picked


def results_lines(meta: dict, report: dict | None) -> list[str]:
    """The card's results: the held-out test first when there is one, then validation."""
    lines, acc = [], meta.get("val_accuracy")
    if meta.get("test_accuracy"):
        lines.append(
            f"Held-out test accuracy **{float(meta['test_accuracy']):.2%}** on {meta.get('test_images', '?')} "
            "images of the run's test/ folder, which was never used for any choice (this file, measured at export)."
        )
        lines.append("")
    if acc:
        lines.append(
            f"Validation accuracy {float(acc):.2%}. The validation split chose the kept epoch, the calibration "
            'temperature and the "not sure" threshold, so it is an optimistic estimate'
            + ("." if meta.get("test_accuracy") else "; the run had no test/ folder for an unbiased one.")
        )
    if report:
        lines += [
            "",
            f"Macro F1 {report['macro']['f1']:.3f} on {report['n']} validation images; expected calibration error "
            f"of the probabilities the app shows {float(meta.get('ece', report['ece'])):.3f}"
            + (
                f" ({float(meta['ece_uncalibrated']):.3f} before temperature scaling)."
                if "ece_uncalibrated" in meta
                else "."
            ),
            "",
            "| class | precision | recall | F1 | images |",
            "|---|---|---|---|---|",
        ]
        for c, r in report["per_class"].items():
            lines.append(f"| {c} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
    return lines


def limits(meta: dict) -> str:
    """What the model does with images unlike its training images: only what was measured."""
    end = " The numbers above come from the same source as the training images, not from the wild."
    if "ood_known_rates" not in meta:
        return (
            "The model knows only the classes above: every image gets one of them as its answer, including "
            "images that show none of them. Answers whose top probability is below the threshold are shown as "
            '"not sure"; how often images unlike the training data get a confident answer has not been measured '
            "for this model." + end
        )
    rates = json.loads(meta["ood_known_rates"])
    measured = ", ".join(f"{k} {v:.0%}" for k, v in rates.items())
    return (
        "The model knows only the classes above. Besides the probabilities, the file scores how unlike the "
        "training images an image is (Mahalanobis distance of its features to the nearest class); above the "
        'threshold the app says "this does not look like any of the things this model knows" and names the '
        f"closest class as a guess. Share of images answered as known, measured at export: {measured}. Images "
        "that resemble the training images without showing one of the classes can still be answered as "
        "known." + end
    )


def model_card(meta: dict, report: dict | None, title: str) -> str:
    labels = json.loads(meta["labels"])
    cfg = json.loads(meta["model_config"])
    size = json.loads(meta["image_size"])
    lines = [
        f"# {title}",
        "",
        f"A Vision Transformer image classifier for {len(labels)} classes: {', '.join(labels)}. "
        "It runs on onnxruntime on a CPU; upload, photograph or paste an image to see the top classes and an "
        "attention map of where the model looked.",
        "",
        "## Model",
        "",
        f"- Architecture: ViT ({cfg['depth']} blocks, width {cfg['dim']}, {cfg['heads']} heads, patch "
        f"{cfg['patch_size']}), input {size[0]}x{size[1]} px, pooling by {cfg['pool']}.",
        f"- Preprocessing (inside the ONNX file's metadata): resize ({meta['interpolation']}), centre crop "
        f"{float(meta['crop_pct']):.3f}, mean {meta['mean']}, std {meta['std']}.",
        f"- Weights: {meta.get('initialization', 'not recorded')}"
        + (f" on {meta['train_images']} images" if meta.get("train_images") else "")
        + f"; {'fp32' if meta.get('quantization', 'none') == 'none' else meta['quantization']}; "
        f"SHA-256 of the trained weights {meta['weights_sha256'][:16]}...",
        f'- The app says "not sure" below a top probability of {float(meta.get("threshold", 0)):.0%} '
        f"({meta.get('threshold_rule', '')}).",
        "",
        "## Results",
        "",
    ]
    lines += results_lines(meta, report)
    lines += ["", "## Limits", "", limits(meta), ""]
    return "\n".join(lines)


def stage_model(source: Path, staging: Path, examples: Path | None, data: Path | None) -> dict | None:
    """The model (exported and verified, for a run) and example images into ``staging``;
    returns the run's validation report, if any."""
    from export.onnx_export import ExportError, export_run

    if source.is_dir():
        export_run(source, staging / "assets" / "model.onnx", data=data)
        for i, (p, label) in enumerate(pick_examples(source, per_class=2, data=data)):
            shutil.copy(p, staging / "assets" / "examples" / f"{label}_{i:02d}{p.suffix.lower()}")
        return json.loads((source / "report.json").read_text()) if (source / "report.json").is_file() else None
    if source.suffix != ".onnx":
        raise ExportError(f"{source} is neither a run folder nor an .onnx file")
    shutil.copy(source, staging / "assets" / "model.onnx")
    ex = examples or (source.parent / "examples")
    if ex.is_dir():
        for p in sorted(ex.iterdir())[:12]:
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                shutil.copy(p, staging / "assets" / "examples" / p.name)
    return None


def build_space(
    source: Path, out: Path, title: str | None = None, examples: Path | None = None, data: Path | None = None
) -> Path:
    """Write the Space folder ``out`` from a run folder or an exported .onnx file."""
    from export.onnx_export import ExportError
    from vit.runtime import Classifier

    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose a new folder")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "assets" / "examples").mkdir(parents=True)
    try:
        report = stage_model(source, staging, examples, data)
        clf = Classifier(staging / "assets" / "model.onnx")  # proves the file loads and has its metadata
        meta = clf.metadata
        for rel in RUNTIME_FILES:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, staging / rel)
        v = versions()
        (staging / "requirements.txt").write_text(
            f"gradio=={v['gradio']}\nonnxruntime>={v['onnxruntime']}\nnumpy>=1.26\npillow>=10.0\n"
        )
        title = title or "ViT image classifier"
        labels = json.loads(meta["labels"])
        short = f"ViT classifier: {', '.join(labels)}"
        short = short if len(short) <= 60 else f"ViT image classifier, {len(labels)} classes"
        front = "\n".join(
            [
                "---",
                f"title: {title}",
                "emoji: 🔎",
                "colorFrom: indigo",
                "colorTo: blue",
                "sdk: gradio",
                f"sdk_version: {v['gradio']}",
                "app_file: app.py",
                'python_version: "3.11"',
                f"short_description: {short}",
                "tags:",
                "  - image-classification",
                "  - vision-transformer",
                "  - onnx",
                "license: apache-2.0",
                "pinned: false",
                "---",
                "",
            ]
        )
        (staging / "README.md").write_text(front + model_card(meta, report, title))
        lfs = ("*.onnx", "*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif", "*.bmp")  # the Hub takes binaries only via LFS
        (staging / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in lfs))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export space",
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help="a run folder (made by train.py) or an .onnx file (made by export)")
    p.add_argument("--out", type=Path, required=True, help="the Space folder to create")
    p.add_argument("--title", default=None)
    p.add_argument("--examples", type=Path, default=None, help="example images for an .onnx source")
    p.add_argument("--data", type=Path, default=None, help="the run's image folder, if it has moved since training")
    a = p.parse_args(argv)
    from export.onnx_export import ExportError
    from vit.run import RunError
    from vit.runtime import ModelFileError

    try:
        out = build_space(a.source, a.out, a.title, a.examples, a.data)
    except (ExportError, RunError, ModelFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"Space folder ready: {out}\nPush it with git (git-lfs needed: the model and images go through LFS):\n"
        f"  cd {out} && git lfs install && git init && git add . && git commit -m 'Space' && "
        "git remote add space https://huggingface.co/spaces/USER/NAME && git push space HEAD:main\n"
        f"or with huggingface_hub: hf upload USER/NAME {out} . --repo-type space"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
