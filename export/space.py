"""A folder you can push to a Hugging Face Space as is.

    python -m export space RUN_DIR --out my-space        # exports and verifies the model first
    python -m export space model.onnx --out my-space     # an ONNX file made by python -m export
    python -m export space RUN_DIR --out my-space --examples 12   # and 12 validation images as examples

The folder holds app.py, the torch-free runtime it imports (RUNTIME_FILES: a test checks
that it is every project file app.py imports), the model, example images only when asked
for, a requirements.txt without torch and a README.md whose front matter Spaces reads and
whose body is a model card built from the model's own metadata and, for a run, its
validation report. Every binary file is under Git LFS (.gitattributes).

Creating a Gradio Space needs a paid Hugging Face plan; `python -m export web` builds the
free route, a static page that runs the same file in the visitor's browser.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from vit.imageio import Preprocessing

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
            f"Validation accuracy {float(acc):.2%}. The validation split helped choose the kept weights, and chose "
            'the calibration temperature and the "not sure" threshold, so it is an optimistic estimate'
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


GRADIO_WHERE = (
    "It runs on onnxruntime on a CPU; upload, photograph or paste an image to see the top classes and an "
    "attention map of where the model looked."
)


def model_card(meta: dict, report: dict | None, title: str, where: str = GRADIO_WHERE) -> str:
    labels = json.loads(meta["labels"])
    cfg = json.loads(meta["model_config"])
    p = Preprocessing.from_metadata(meta)
    lines = [
        f"# {title}",
        "",
        f"A Vision Transformer image classifier for {len(labels)} classes: {', '.join(labels)}. {where}",
        "",
        "## Model",
        "",
        f"- Architecture: ViT ({cfg['depth']} blocks, width {cfg['dim']}, {cfg['heads']} heads, patch "
        f"{cfg['patch_size']}), input {p.image_size[0]}x{p.image_size[1]} px, pooling by {cfg['pool']}"
        + ("; each prediction averages the image's and its mirror's logits." if cfg.get("mirror_average") else ".")
        + (f" An ensemble: {meta['ensemble']}." if meta.get("ensemble") else ""),
        f"- Preprocessing (inside the ONNX file's metadata): resize ({p.interpolation}), centre crop "
        f"{p.crop_pct:.3f}, mean {list(p.mean)}, std {list(p.std)}.",
        f"- Weights: {meta.get('initialization', 'not recorded')}"
        + (f" on {meta['train_images']} images" if meta.get("train_images") else "")
        + f"; {'fp32' if meta.get('quantization', 'none') == 'none' else meta['quantization']}; "
        f"SHA-256 of the trained weights {meta['weights_sha256'][:16]}..."
        + (" (the first model's)" if meta.get("ensemble_weights_sha256") else ""),
        f'- The app says "not sure" below a top probability of {float(meta.get("threshold", 0)):.0%}, '
        f"the {meta.get('threshold_rule', 'rule not recorded')}.",
        "",
        "## Results",
        "",
    ]
    lines += results_lines(meta, report)
    lines += ["", "## Limits", "", limits(meta), ""]
    return "\n".join(lines)


def stage_model(
    source: Path, dest: Path, data: Path | None = None, int8: bool | None = None, canvas: bool = False, log=print
) -> dict | None:
    """The model a published folder serves, written to ``dest``; returns the run's validation
    report, if any.

    ``source``: a run folder (exported and verified here) or an .onnx file made by export.
    ``int8``: serve the int8 file; None carries one over when present (a run's earlier
    ``export --int8``, or an .onnx file's ``.int8.onnx`` twin: either exists only if it passed
    its accuracy gate). ``canvas``: offer a drawing pad; a run's earlier export carries it too.
    """
    from export.onnx_export import (
        ExportError,
        export_run,
        file_metadata,
        int8_path,
        save_proto,
        set_metadata,
        without_trace,
    )

    source = Path(source)
    if not source.exists():
        raise ExportError(f"{source} does not exist: give a run folder made by train.py or an .onnx file")
    if source.is_dir():
        earlier, carried = source / "model.onnx", False
        if earlier.is_file():
            canvas = canvas or file_metadata(earlier).get("canvas") == "true"
            carried = int8 is None and int8_path(earlier).is_file()
        want = bool(int8) or carried
        canvas_meta = {"canvas": "true"} if canvas else None
        export_run(source, dest, int8=want, extra_metadata=canvas_meta, data=data, log=log)
        twin = int8_path(dest)
        if want and twin.is_file():
            twin.replace(dest)
            log(f"serving the int8 file ({dest.stat().st_size / 2**20:.1f} MiB); --fp32 serves fp32")
        elif want and int8:
            raise ExportError("the int8 file did not pass its accuracy gate: leave out --int8 to serve fp32")
        elif want:
            log("the run's earlier int8 file did not pass its gate again: serving fp32")
        report = source / "report.json"
        return json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
    if source.suffix != ".onnx" or not source.is_file():
        raise ExportError(f"{source} is neither a run folder nor an .onnx file")
    twin = int8_path(source)
    quantized = file_metadata(source).get("quantization", "none") != "none"
    if int8 is False and quantized:
        raise ExportError(f"{source.name} is an int8 file: give the fp32 file beside it for --fp32")
    if int8 and not quantized and not twin.is_file():
        raise ExportError(f"there is no {twin.name} next to {source.name}: export the run with --int8 first")
    use = twin if (int8 is not False and not quantized and twin.is_file()) else source
    if use is twin:
        log(f"serving {twin.name}, the int8 file next to {source.name} (--fp32 serves the fp32 one)")
    import onnx

    proto = without_trace(onnx.load(str(use)))  # a file exported by an earlier version may carry traces
    if canvas:
        set_metadata(proto, {"canvas": "true"})
    save_proto(proto, dest)
    return None


EXAMPLE_LIMITS = (10 * 2**20, 40_000_000)  # bytes and pixels: what the app and the page accept
BROWSER_FORMATS = {"PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP"}


def example_problem(path: Path) -> str | None:
    """Why ``path`` cannot be published as an example image, or None when it can."""
    from vit.imageio import BadImage, decode_image

    if path.stat().st_size > EXAMPLE_LIMITS[0]:
        return "over 10 MB"
    try:
        fmt = decode_image(path, EXAMPLE_LIMITS[1])[1]
    except BadImage as e:
        return str(e)
    return None if fmt in BROWSER_FORMATS else f"{fmt} files are not shown by browsers"


def stage_examples(
    source: Path, dest: Path, count: int, from_dir: Path | None = None, data: Path | None = None, log=print
) -> list[dict]:
    """Up to ``count`` example images into ``dest``, as [{"file", "label"}]: the images of
    ``from_dir`` when given, else a run's validation images, round-robin over classes (or
    examples/ next to an .onnx file). Files that are not usable images are left out and named.
    None unless asked: a user's images are published only when they say so."""
    if count <= 0:
        return []
    source = Path(source)
    if source.is_dir() and from_dir is None:
        from vit.run import RunDir

        k = max(1, len(RunDir(source).config()["labels"]))
        candidates = pick_examples(source, -(-count // k) + 2, limit=count + 2 * k, data=data)
    else:
        folder = from_dir or source.parent / "examples"
        if not folder.is_dir():
            from export.onnx_export import ExportError

            raise ExportError(f"no example folder {folder}: pass --examples-from DIR, or --examples 0")
        candidates = [(p, None) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    dest.mkdir(parents=True, exist_ok=True)
    picked = []
    for p, label in candidates:
        if len(picked) == count:
            break
        problem = example_problem(p)
        if problem:
            log(f"example {p.name} left out: {problem}")
            continue
        name = f"{label}_{len(picked):02d}{p.suffix.lower()}" if label else p.stem + p.suffix.lower()
        shutil.copy(p, dest / name)  # lower-case suffixes: the LFS rules match those
        picked.append({"file": name, "label": label})
    if len(picked) < count:
        log(f"{len(picked)} example images published ({count} asked for): no more usable ones")
    return picked


# The Hub takes binary files only through Git LFS.
LFS_PATTERNS = ("*.onnx", "*.wasm", "*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif", "*.bmp")


def write_lfs_rules(folder: Path) -> None:
    rules = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
    (folder / ".gitattributes").write_text(rules, encoding="utf-8")


@contextmanager
def staged(out: Path):
    """A folder written whole or not at all: built in a new hidden folder beside ``out``, renamed
    at the end, removed on any failure."""
    import tempfile

    from export.onnx_export import ExportError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the folder from a web server's user
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def renamed_log(staging: Path, out: Path, log=print):
    """``log``, saying ``out`` where a message names the staging folder (which will be renamed)."""
    return lambda msg: log(str(msg).replace(str(staging), str(out)))


def front_matter(title: str, labels: list[str], sdk_lines: list[str]) -> str:
    """The Space's YAML header. Free text is written as JSON strings (valid YAML, whatever it holds)."""
    short = f"ViT classifier: {', '.join(labels)}"
    short = json.dumps(short if len(short) <= 60 else f"ViT image classifier, {len(labels)} classes")
    tags = ["image-classification", "vision-transformer", "onnx"]
    return "\n".join(
        ["---", f"title: {json.dumps(title)}", "emoji: 🔎", "colorFrom: indigo", "colorTo: blue", *sdk_lines]
        + [f"short_description: {short}", "tags:", *(f"  - {t}" for t in tags), "license: apache-2.0"]
        + ["pinned: false", "---", ""]
    )


def build_space(
    source: Path,
    out: Path,
    title: str | None = None,
    examples: int = 0,
    examples_from: Path | None = None,
    data: Path | None = None,
    int8: bool | None = None,
    canvas: bool = False,
) -> Path:
    """Write the Gradio Space folder ``out`` from a run folder or an exported .onnx file."""
    from vit.runtime import Classifier

    with staged(out) as staging:
        (staging / "assets").mkdir()
        log = renamed_log(staging, out)
        report = stage_model(source, staging / "assets" / "model.onnx", data, int8, canvas, log)
        stage_examples(source, staging / "assets" / "examples", examples, examples_from, data, log)
        clf = Classifier(staging / "assets" / "model.onnx")  # proves the file loads and has its metadata
        for rel in RUNTIME_FILES:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, staging / rel)
        v = versions()
        (staging / "requirements.txt").write_text(
            f"gradio=={v['gradio']}\nonnxruntime>={v['onnxruntime']}\nnumpy>=1.26\npillow>=10.0\n", encoding="utf-8"
        )
        title = title or "ViT image classifier"
        sdk = ["sdk: gradio", f"sdk_version: {v['gradio']}", "app_file: app.py", 'python_version: "3.11"']
        (staging / "README.md").write_text(
            front_matter(title, clf.labels, sdk) + model_card(clf.metadata, report, title, GRADIO_WHERE),
            encoding="utf-8",
        )
        write_lfs_rules(staging)
    return Path(out)


def quoted(path) -> str:
    """A path as a printed shell command needs it (cmd.exe's quoting on Windows)."""
    import shlex
    import subprocess

    return subprocess.list2cmdline([str(path)]) if sys.platform == "win32" else shlex.quote(str(path))


def count_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: give 0 or more")
    return int(text)


def publish_args(prog: str, description: str, argv: list[str] | None, more=None) -> argparse.Namespace:
    """The command line the Space and the web page share, parsed and checked; ``more(parser)``
    adds a command's own flags."""
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", type=Path, help="a run folder (made by train.py) or an .onnx file (made by export)")
    p.add_argument("--out", type=Path, required=True, help="the folder to create")
    p.add_argument("--title", default=None, help="the page's title (default: ViT image classifier)")
    p.add_argument(
        "--examples",
        type=count_arg,
        default=0,
        metavar="N",
        help="publish N example images (a run's validation images, round-robin over classes); default none",
    )
    p.add_argument(
        "--examples-from",
        type=Path,
        default=None,
        help="take the examples from this folder (default: a run's validation images, or examples/ beside an .onnx)",
    )
    p.add_argument("--data", type=Path, default=None, help="the run's image folder, if it has moved since training")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--int8", dest="int8", action="store_true", default=None, help="serve the int8 file")
    q.add_argument("--fp32", dest="int8", action="store_false", help="serve fp32 even when an int8 file is present")
    p.add_argument("--canvas", action="store_true", help="offer a drawing pad (a model of drawings)")
    if more is not None:
        more(p)
    a = p.parse_args(argv)
    if a.examples_from is not None and not a.examples:
        p.error("--examples-from needs --examples N: how many of its images to publish")
    return a


def main(argv: list[str] | None = None) -> int:
    a = publish_args("python -m export space", __doc__, argv)
    from export.onnx_export import ExportError
    from vit.run import RunError
    from vit.runtime import ModelFileError

    try:
        out = build_space(a.source, a.out, a.title, a.examples, a.examples_from, a.data, a.int8, a.canvas)
    except (ExportError, RunError, ModelFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q = quoted(out)
    print(
        f"Space folder ready: {out}\n"
        "Creating a Gradio Space needs a paid Hugging Face plan; `python -m export web` makes a static page, "
        "which is free to host.\n"
        "Push it with huggingface_hub (installed with this project; `hf auth login` once first):\n"
        "  hf repos create USER/NAME --type space --sdk gradio\n"
        f"  hf upload USER/NAME {q} . --repo-type space\n"
        "or with git (git-lfs needed: the model and images go through LFS):\n"
        f"  cd {q} && git lfs install && git init && git add . && git commit -m 'Space' && "
        "git remote add space https://huggingface.co/spaces/USER/NAME && git push space HEAD:main"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
