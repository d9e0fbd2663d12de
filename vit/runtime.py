"""Run an exported model with onnxruntime, numpy and PIL alone: no torch.

    from vit.runtime import Classifier
    clf = Classifier("model.onnx")
    pred = clf.predict(PIL.Image.open("cat.jpg"))
    pred.top_k      # [("cat", 0.93), ("dog", 0.05), ...]
    pred.attention  # (Gh, Gw) array in [0, 1]: where the model looked, or None
    pred.status     # "sure", "unsure" (between its classes) or "unknown" (unlike all of them)

Everything needed to use the file correctly (labels, input size, normalisation, resize,
crop, temperature, the "not sure" threshold, the out-of-distribution threshold) is read
from the ONNX file's own metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vit.cpus import usable_cpus
from vit.imageio import DEFAULT_MAX_PIXELS, Preprocessing, open_image

REQUIRED_METADATA = ("labels", "image_size", "mean", "std", "interpolation", "crop_pct")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, numerically stable."""
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


class ModelFileError(ValueError):
    """The model file is missing, not ONNX, or not made by ``python -m export``."""


def ort_session(model, threads: int | None = None, spin: bool = True):
    """The one onnxruntime session set-up, for the app and for export's verification alike:
    every graph optimisation, one inter-op thread, intra-op threads sized from the usable CPUs.
    ``model``: a path or serialised bytes. ``spin=False`` lets idle threads sleep (fair when
    another engine shares the CPUs, as in the benchmark)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or usable_cpus()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


@dataclass
class Prediction:
    top_k: list[tuple[str, float]]  # (label, probability), most likely first
    probs: np.ndarray  # (K,) over all labels, in class-index order
    attention: np.ndarray | None  # (Gh, Gw), max 1, or None if the file has no attention output
    sure: bool  # like the training images, and top probability at or above the model's threshold
    known: bool = True  # like the training images (always True for a file without an ood score)
    ood_score: float | None = None  # larger is stranger; None if the file has no ood score

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def status(self) -> str:
        """ "sure", "unsure" (between known classes) or "unknown" (unlike every known class)."""
        return "unknown" if not self.known else "sure" if self.sure else "unsure"


class Classifier:
    """An ONNX file made by ``python -m export``, ready to classify PIL images."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, warmup: bool = True):
        path = Path(path)
        if path.is_dir():
            raise ModelFileError(
                f"{path} is a folder: give the .onnx file (export a run with: python -m export {path} --out m.onnx)"
            )
        if not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        try:
            self.session = ort_session(path, threads)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelFileError(f"{path} is not a valid ONNX model: {e}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise ModelFileError(f"{path} lacks metadata {missing}: export it with `python -m export RUN_DIR`")
        self.path = path
        self.metadata = dict(meta)
        try:
            self.labels: list[str] = json.loads(meta["labels"])
            self.preprocessing = Preprocessing.from_metadata(meta)
        except ValueError as e:  # json's errors are ValueErrors too
            raise ModelFileError(f"{path} has unusable preprocessing metadata ({e}): export it again") from None
        p = self.preprocessing
        self.image_size, self.mean, self.std = p.image_size, list(p.mean), list(p.std)
        self.interpolation, self.crop_pct = p.interpolation, p.crop_pct
        self.threshold = float(meta.get("threshold", 0.0))
        self.ood_threshold = float(meta["ood_threshold"]) if "ood_threshold" in meta else None
        self.temperature = float(meta.get("temperature", 1.0))  # calibration fitted at export
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.has_attention = "attention" in self.outputs
        if "ood_score" not in self.outputs:
            self.ood_threshold = None
        if warmup:
            self.session.run(None, {self.input_name: np.zeros((1, 3, *self.image_size), np.float32)})

    def info(self) -> dict:
        """The model's facts, for a person: labels, input size, accuracy and so on."""
        m = self.metadata
        return dict(
            labels=self.labels,
            image_size=list(self.image_size),
            val_accuracy=m.get("val_accuracy"),
            threshold=self.threshold,
            temperature=self.temperature,
            ood_threshold=self.ood_threshold,
            known_rates=json.loads(m["ood_known_rates"]) if "ood_known_rates" in m else None,
            quantization=m.get("quantization", "none"),
            exported_at=m.get("exported_at"),
            weights_sha256=m.get("weights_sha256"),
        )

    def preprocess(self, image) -> np.ndarray:
        """PIL image, path or file -> (3, H, W) float32, as training evaluated it."""
        return self.preprocessing(open_image(image, DEFAULT_MAX_PIXELS))  # PIL images too: EXIF, mode

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, 3, H, W) -> the file's outputs: logits (B, K), and attention (B, Gh, Gw) and
        ood_score (B,) when it has them."""
        return dict(zip(self.outputs, self.session.run(None, {self.input_name: batch})))

    def predict_many(self, images: list, top_k: int = 5) -> list[Prediction]:
        out = self.run(np.stack([self.preprocess(im) for im in images]))
        probs = softmax(out["logits"] / self.temperature)
        attn, scores = out.get("attention"), out.get("ood_score")
        preds = []
        for i, p in enumerate(probs):
            order = np.argsort(-p)[:top_k]
            known = self.ood_threshold is None or bool(scores[i] <= self.ood_threshold)
            preds.append(
                Prediction(
                    [(self.labels[j], float(p[j])) for j in order],
                    p,
                    None if attn is None else attn[i],
                    known and bool(p[order[0]] >= self.threshold),
                    known,
                    None if scores is None else float(scores[i]),
                )
            )
        return preds

    def predict(self, image, top_k: int = 5) -> Prediction:
        return self.predict_many([image], top_k)[0]


def overlay(image: Image.Image, attention: np.ndarray, prep: Preprocessing, alpha: float = 0.55) -> Image.Image:
    """The attention map as a heat overlay on the region of the image the model saw."""
    seen = prep.resize(open_image(image))
    a = np.clip(attention / max(float(attention.max()), 1e-8), 0, 1)
    heat = Image.fromarray((a * 255).astype(np.uint8)).resize(seen.size, Image.Resampling.BICUBIC)
    h = np.asarray(heat, dtype=np.float32) / 255.0
    colour = np.stack([h, 0.25 * h, 1 - h], -1) * 255  # blue (ignored) to red (attended)
    out = np.asarray(seen, dtype=np.float32) * (1 - alpha * h[..., None]) + colour * alpha * h[..., None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
