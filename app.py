"""A web page that classifies images with an exported ViT: onnxruntime only, no torch.

    python app.py                                  # the bundled demo model
    python app.py --model model.onnx --port 7860   # your own (MODEL_PATH works too)

Three parts: preprocess (vit.imageio, shared with training), predict (vit.runtime), UI; the model is
loaded once, in main().
"""

from __future__ import annotations

import argparse
import atexit
import base64
import csv
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Gradio sends usage analytics unless told not to; this app sends nothing unless the user
# sets GRADIO_ANALYTICS_ENABLED=True themselves.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vit.cpus import usable_cpus  # noqa: E402
from vit.imageio import BadImage, open_image  # noqa: E402
from vit.runtime import Classifier, ModelFileError, overlay  # noqa: E402

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
DEFAULT_MODEL = ASSETS / "model.onnx"
EXAMPLES = ASSETS / "examples"
MAX_UPLOAD_MB = 10
MAX_PIXELS = 40_000_000  # decoded pixels per image; bigger uploads are refused, not decoded
MAX_BATCH = 64
CACHE_HOURS = 1  # files a visitor got (CSVs, Gradio's copies of uploads) are deleted after this


# --------------------------------------------------------------------------------------
# 1. Preprocess: decoding, checks and resizing live in vit.imageio (the model: vit.runtime)
# --------------------------------------------------------------------------------------


def read_upload(image, max_bytes: int, max_pixels: int) -> Image.Image:
    """An uploaded file path or the canvas's raw bytes (or a PIL image, for code) -> upright RGB,
    or a gr.Error a person understands. Every input passes the same byte and pixel limits."""
    if isinstance(image, dict):  # a canvas value from code: its flattened picture
        image = image.get("composite")
    if image is None:
        raise gr.Error("No image yet: upload one, take a photo, paste one or draw a shape.")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    size = None
    if isinstance(image, (bytes, bytearray, memoryview)):
        size, image = len(image), io.BytesIO(bytes(image))
    elif isinstance(image, (str, Path)):
        size = os.path.getsize(image) if os.path.exists(image) else 0
    if size is not None and size > max_bytes:
        raise gr.Error(f"That file is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    try:
        return open_image(image, max_pixels=max_pixels)
    except BadImage as e:
        reason = str(e).split(": ", 1)[-1]
        raise gr.Error(f"Could not use this file as an image: {reason}.") from None


def upload_path_image(**kwargs) -> gr.Image:
    """A gr.Image whose input is the raw upload path, so decoding (and every safety check
    on it) happens in one place, ``vit.imageio.open_image``, not in Gradio's own PIL call.

    The override sits on the instance: subclassing a Gradio component makes Gradio write a
    type-stub file beside this one at import time.
    """
    image = gr.Image(type="filepath", **kwargs)
    default = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path is not None:
            return payload.path
        return default(payload)

    image.preprocess = preprocess
    return image


def raw_canvas(**kwargs) -> gr.Sketchpad:
    """A drawing canvas whose input is the raw flattened picture (a path or bytes), for the same
    reason: Gradio's own preprocessing would decode the background, every layer and the
    composite with PIL before the app's byte and pixel limits could look at them."""
    from gradio.data_classes import FileData

    pad = gr.Sketchpad(type="filepath", **kwargs)

    def preprocess(payload):
        if payload is None:
            return None
        if payload.id is not None:  # sent as blobs
            cached = pad.blob_storage.pop(payload.id, None)  # as Gradio's own preprocess: freed once read
            composite = cached.composite if cached else None
        else:
            composite = payload.composite
        if composite is None:
            return None
        return composite.path if isinstance(composite, FileData) else bytes(composite)

    pad.preprocess = preprocess
    return pad


# --------------------------------------------------------------------------------------
# 2. Predict
# --------------------------------------------------------------------------------------


def attention_html(img: Image.Image, width: int = 320) -> str:
    """The overlay inline, as an <img> with a data URI. Served as a file, identical overlays
    from concurrent requests share one cache path in Gradio and race; inline, they cannot,
    and an API client gets it without a second download."""
    img = img.resize((width, round(width * img.height / img.width)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" alt="attention overlay" style="max-width:100%">'


STATUS_NOTE = {"sure": "", "unsure": "not sure", "unknown": "unlike every class the model knows"}
BATCH_HEADER = ["file", "label", "probability", "runner-up", "known", "note"]


def verdict(pred, clf: Classifier) -> str:
    """What the model says about one image, in words: sure, not sure between its classes, or
    that the image looks like none of them (the closest class is still named)."""
    label, p = pred.top_k[0]
    if pred.status == "unknown":
        return (
            f"**This does not look like any of the {len(clf.labels)} things this model knows** "
            f"({', '.join(clf.labels)}). The closest is {label} ({p:.0%}), but the image is unlike the ones "
            "it was trained on, so treat that as a guess."
        )
    if pred.status == "unsure":
        return (
            f"**Not sure.** The best guess is {label} at {p:.0%}, below this model's threshold of "
            f"{clf.threshold:.0%}: it hesitates between its classes."
        )
    return f"**{label}** ({p:.0%})."


class Predictor:
    """The app's functions, plain enough for tests to call directly."""

    def __init__(self, clf: Classifier, max_bytes: int = MAX_UPLOAD_MB * 2**20, max_pixels: int = MAX_PIXELS):
        self.clf, self.max_bytes, self.max_pixels = clf, max_bytes, max_pixels
        self.csv_dir = Path(tempfile.mkdtemp(prefix="vit-app-csv-"))
        atexit.register(shutil.rmtree, self.csv_dir, ignore_errors=True)

    def prune_csvs(self, max_age_s: float = CACHE_HOURS * 3600) -> None:
        """Delete CSVs older than ``max_age_s``: Gradio keeps its own copy for the download."""
        now = time.time()
        for p in self.csv_dir.glob("*.csv"):
            if now - p.stat().st_mtime > max_age_s:
                p.unlink(missing_ok=True)

    def predict(self, image):
        """One image -> ({label: probability}, attention overlay as HTML, a note with time and certainty)."""
        img = read_upload(image, self.max_bytes, self.max_pixels)
        t0 = time.perf_counter()
        pred = self.clf.predict(img, top_k=min(5, len(self.clf.labels)))
        ms = (time.perf_counter() - t0) * 1000
        c = self.clf
        heat = ""
        if pred.attention is not None:
            heat = attention_html(overlay(img, pred.attention, c.preprocessing))
        top_label, top_p = pred.top_k[0]
        return {label: p for label, p in pred.top_k}, heat, f"{verdict(pred, c)} {ms:.0f} ms."

    def predict_batch(self, paths):
        """Several files -> a table (one row per file) and the same table as a CSV file."""
        if not paths:
            raise gr.Error("Choose one or more image files first.")
        if len(paths) > MAX_BATCH:
            raise gr.Error(f"{len(paths)} files: at most {MAX_BATCH} at a time, please.")
        rows = []
        for p in paths:
            path = p if isinstance(p, (str, Path)) else getattr(p, "name", str(p))
            name = Path(path).name
            try:
                pred = self.clf.predict(read_upload(path, self.max_bytes, self.max_pixels), top_k=2)
            except gr.Error as e:
                rows.append([name, "", "", "", "", f"error: {e.message}"])
                continue
            (l1, p1), (l2, p2) = pred.top_k[0], (pred.top_k[1] if len(pred.top_k) > 1 else ("", 0.0))
            known = "" if pred.ood_score is None else "yes" if pred.known else "no"  # "": the file cannot tell
            rows.append([name, l1, round(p1, 4), f"{l2} ({p2:.0%})", known, STATUS_NOTE[pred.status]])
        header = BATCH_HEADER
        self.prune_csvs()
        fd, csv_path = tempfile.mkstemp(prefix="predictions-", suffix=".csv", dir=self.csv_dir)
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        import pandas as pd  # a Gradio dependency

        return pd.DataFrame(rows, columns=header), csv_path


# --------------------------------------------------------------------------------------
# 3. UI
# --------------------------------------------------------------------------------------


def precision(quantization: str) -> str:
    return "fp32" if quantization in ("none", "", None) else quantization


def model_facts(clf: Classifier) -> str:
    i = clf.info()
    acc = f"{float(i['val_accuracy']):.1%}" if i.get("val_accuracy") else "not recorded"
    test = clf.metadata.get("test_accuracy")
    if test:
        acc += f" · **Held-out test accuracy:** {float(test):.1%} ({clf.metadata.get('test_images', '?')} images)"
    return (
        f"**Classes ({len(i['labels'])}):** {', '.join(i['labels'])}  \n"
        f"**Input:** {i['image_size'][0]}x{i['image_size'][1]} px · **Validation accuracy:** {acc} · "
        f'**"Not sure" below:** {clf.threshold:.0%} · **Precision:** {precision(i["quantization"])} · '
        f"**Weights:** {clf.metadata.get('initialization', 'not recorded')}"
        + (f" · {clf.metadata['models']} models, logits averaged" if clf.metadata.get("models", "1") != "1" else "")
        + "  \n"
        f"**File:** {clf.path.name}, exported {i.get('exported_at') or '?'}"
        + (
            "  \n**Answered as known** (measured at export): "
            + ", ".join(f"{k} {v:.0%}" for k, v in i["known_rates"].items())
            if i.get("known_rates")
            else ""
        )
    )


def build_ui(clf: Classifier, examples_dir: Path | None = EXAMPLES, max_upload_mb: float = MAX_UPLOAD_MB) -> gr.Blocks:
    app = Predictor(clf, max_bytes=int(max_upload_mb * 2**20))
    canvas = clf.metadata.get("canvas") == "true"
    hours = CACHE_HOURS * 3600
    with gr.Blocks(title="ViT image classifier", delete_cache=(hours, hours)) as demo:
        gr.Markdown(
            "# ViT image classifier\nUpload, photograph or paste an image and see what the model thinks "
            "and where it looked."
        )
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image = upload_path_image(sources=["upload", "webcam", "clipboard"], label="Image", height=320)
                    go = gr.Button("Classify", variant="primary")
                with gr.Column():
                    label = gr.Label(num_top_classes=5, label="Prediction")
                    note = gr.Markdown()
                    heat = gr.HTML(label="Where it looked (attention rollout)")
            outputs = [label, heat, note]
            go.click(app.predict, image, outputs, api_name="predict")
            image.upload(app.predict, image, outputs, api_name=False)
            if examples_dir is not None and examples_dir.is_dir():
                kinds = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
                files = sorted(str(p) for p in examples_dir.iterdir() if p.suffix.lower() in kinds)
                if files:
                    gr.Examples(
                        files,
                        inputs=image,
                        outputs=outputs,
                        fn=app.predict,
                        run_on_click=True,
                        cache_examples=False,
                        label="Examples (click one)",
                    )
        if canvas:
            with gr.Tab("Draw"):
                with gr.Row():
                    with gr.Column():
                        sketch = raw_canvas(label="Draw a shape", canvas_size=(320, 320))
                        draw_go = gr.Button("Classify drawing", variant="primary")
                    with gr.Column():
                        d_label, d_note = gr.Label(num_top_classes=5, label="Prediction"), gr.Markdown()
                        d_heat = gr.HTML(label="Where it looked")
                draw_go.click(app.predict, sketch, [d_label, d_heat, d_note], api_name="predict_drawing")
        with gr.Tab("Many images"):
            # No file-type filter: the content decides (a JPEG without an extension is an image),
            # and a file that is not one gets its own error row, as in training.
            batch = gr.File(file_count="multiple", label="Images")
            batch_go = gr.Button("Classify all", variant="primary")
            table = gr.Dataframe(headers=BATCH_HEADER, interactive=False)
            csv_out = gr.File(label="Download as CSV")
            batch_go.click(app.predict_batch, batch, [table, csv_out], api_name="predict_batch")
        with gr.Accordion("About this model", open=False):
            gr.Markdown(model_facts(clf))
    # One request per two CPUs at a time, a bounded waiting line: each prediction runs on every CPU.
    demo.queue(default_concurrency_limit=max(1, usable_cpus() // 2), max_size=256)
    return demo


def default_host() -> str:
    """127.0.0.1 unless told otherwise; a Space (SPACE_ID is set there) must listen on 0.0.0.0."""
    if os.environ.get("GRADIO_SERVER_NAME"):
        return os.environ["GRADIO_SERVER_NAME"]
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=os.environ.get("MODEL_PATH", str(DEFAULT_MODEL)),
        help="ONNX file made by `python -m export` (env MODEL_PATH; default: the bundled demo model)",
    )
    p.add_argument(
        "--host",
        default=default_host(),
        help="address to listen on (default 127.0.0.1, this machine only; on a Hugging Face Space 0.0.0.0)",
    )
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")), help="port (env PORT; 7860)")
    p.add_argument(
        "--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help=f"largest upload accepted ({MAX_UPLOAD_MB} MB)"
    )
    a = p.parse_args(argv)
    try:
        clf = Classifier(a.model)
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_ui(clf, max_upload_mb=a.max_upload_mb)
    print(f"Serving {clf.path.name} ({len(clf.labels)} classes) at http://{a.host}:{a.port}", flush=True)
    demo.launch(
        server_name=a.host,
        server_port=a.port,
        max_file_size=f"{a.max_upload_mb:g}mb",
        show_error=True,
        allowed_paths=[str(EXAMPLES)],
        blocked_paths=[str(Path(a.model).resolve())],
        share=False,
        footer_links=["api"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
