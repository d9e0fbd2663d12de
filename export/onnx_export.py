"""A training run -> one verified, self-describing ONNX file (and an optional int8 twin).

Exporter: ``torch.onnx.export(..., dynamo=True)``. It traces with ``torch.export``,
which is the exporter PyTorch maintains today (the TorchScript-based one is deprecated),
expresses the dynamic batch axis as a checked symbolic shape instead of a hint, and
emits current opsets. The tests export, check and run every file it writes.

Nothing is written unless it passed: the file is built in memory, checked by
``onnx.checker`` (full check), run by onnxruntime at the optimisation level the app uses
on images of the run's validation split and compared with PyTorch (max |Δ logits| and
top-1), and only then moved into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from vit import files
from vit.imageio import Preprocessing
from vit.model import ViT, mean_of_views, members_of, with_mirrors
from vit.report import expected_calibration_error
from vit.run import RunDir
from vit.runtime import softmax

OPSET = 18
MAX_ABS_LOGIT_DIFF = 1e-4
MAX_REL_OOD_DIFF = 1e-4
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_ACC_DROP = 0.005
CALIBRATION_IMAGES = 2000  # validation images for temperature, threshold and the int8 gate (stratified)
VERIFY_IMAGES = 256  # of those, compared with PyTorch (stratified too)


class ExportError(RuntimeError):
    """The export did not pass a check; nothing was written."""


class Exportable(nn.Module):
    """Logits and, optionally, an attention map and an out-of-distribution score per image.

    The map is attention rollout (Abnar & Zuidema 2020): each block's head-averaged
    attention, mixed half-and-half with the identity for the residual path, chained from
    the last block down to the input. For a class-token model it is the class token's row,
    i.e. how much each patch contributed to the prediction; for an average-pooled model
    (class token or not), the mean row. Shape (B, Gh, Gw), scaled so each map's maximum is 1.
    The score (``export.ood``) reads z_0's and the blocks' pooled tokens: (B,), larger is stranger.
    """

    def __init__(self, model: ViT, attention: bool = True, ood: nn.Module | None = None):
        super().__init__()
        self.model, self.attention, self.ood = model.eval(), attention, ood

    def forward(self, pixel_values: torch.Tensor):
        members, taps = members_of(self.model), ([] if self.ood is not None else None)
        mirrored = self.model.config.mirror_average  # the image and its mirror in one batch, as ViT.forward does
        x = with_mirrors(pixel_values) if mirrored else pixel_values
        logits, grids = [], []
        for k, m in enumerate(members):  # an ensemble: its members' logits and maps averaged, as Ensemble.forward
            y, attns = m.forward_pooled(
                x, fused=not self.attention, return_attn=self.attention, taps=taps if k == 0 else None
            )  # the score reads the first member's tokens, as export.ood fits it
            logits.append(m.head(m.fc_norm(y)))
            if self.attention:
                grids.append(self.rollout(attns))
        logits = logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)
        outs = [mean_of_views(logits) if mirrored else logits]
        if self.attention:
            grid = grids[0]
            if len(grids) > 1:
                grid = torch.stack(grids).mean(0)
                grid = grid / grid.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
            if mirrored:  # the mirror's map, mirrored back, averaged with the image's
                a, b = grid.unflatten(0, (2, -1)).unbind(0)
                grid = a + b.flip(-1)
                grid = grid / grid.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
            outs.append(grid)
        if self.ood is not None:  # the pooled taps, averaged over the views as in export.ood
            f = torch.stack(taps, 1)
            outs.append(self.ood(mean_of_views(f) if mirrored else f))
        return tuple(outs) if len(outs) > 1 else outs[0]

    def rollout(self, attns: list[torch.Tensor]) -> torch.Tensor:
        cfg = self.model.config  # an ensemble's members share it
        # Each block's rollout matrix is R = (mean_h A_h + I) / 2; its rows already sum to 1 (softmax
        # rows do), so no renormalisation is needed, and only one row is ever carried down:
        # v R = (mean_h (v A_h) + v) / 2 is h vector-matrix products, never an N x N sum.
        v = None  # (B, 1, N): the rolled-out row, built from the last block down
        for a in reversed(attns):  # (B, h, Nq, N)
            if v is None:
                n = a.shape[-1]
                if cfg.pool == "token":  # the class token's row of R: what reaches the head
                    row, eye = a[:, :, :1].mean(1), F.one_hot(torch.tensor(0), n).to(a.dtype)
                else:  # the mean of R's patch rows: what average pooling reads (class token or not)
                    p0 = cfg.num_prefix_tokens
                    row = a[:, :, p0:].mean(2).mean(1, keepdim=True)
                    eye = torch.cat([torch.zeros(p0), torch.full((n - p0,), 1.0 / (n - p0))]).to(a.dtype)
                v = 0.5 * row + 0.5 * eye
            else:
                v = 0.5 * (v.unsqueeze(1) @ a).mean(1) + 0.5 * v  # (B, h, 1, N) -> (B, 1, N)
        grid = v[:, 0, cfg.num_prefix_tokens :].reshape(-1, *cfg.grid_size)  # (B, Gh, Gw)
        return grid / grid.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def to_onnx(model: ViT, attention: bool = True, ood: nn.Module | None = None) -> onnx.ModelProto:
    """Trace ``model`` (eval mode, fp32) to ONNX with a dynamic batch axis."""
    x = torch.randn(2, model.config.in_chans, *model.config.image_size)
    names = ["logits"] + (["attention"] if attention else []) + (["ood_score"] if ood is not None else [])
    return export_module(Exportable(model.float().eval(), attention, ood), x, names)


def export_module(module: nn.Module, example: torch.Tensor, output_names: list[str]) -> onnx.ModelProto:
    """Any image model (B, C, H, W) -> ONNX, the way every file here is made: the dynamo
    exporter, input ``pixel_values`` with a dynamic batch axis, opset ``OPSET``."""
    import warnings

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=output_names,
            dynamic_shapes=({0: batch},),  # by position: the module's argument may have any name
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    return without_trace(program.model_proto)


def without_trace(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without the exporter's notes: every operator's Python stack trace, module
    names and FX node, and the exported program's signature. The traces name folders of the
    machine that exported the file, which a shared model should not carry, and the notes are
    4% of the demo model's bytes. The model's own metadata (labels, preprocessing, ...) is kept."""

    def subgraphs(nodes):  # the bodies of If, Loop and Scan nodes, at any depth
        for node in nodes:
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield sub
                    yield from subgraphs(sub.node)

    def clear(node_or_graph) -> None:
        del node_or_graph.metadata_props[:]
        node_or_graph.doc_string = ""

    for f in proto.functions:
        clear(f)
        for n in f.node:
            clear(n)
    for g in [proto.graph, *subgraphs(proto.graph.node), *(sub for f in proto.functions for sub in subgraphs(f.node))]:
        clear(g)
        for v in [*g.initializer, *g.input, *g.output, *g.value_info]:
            del v.metadata_props[:]
        for n in g.node:
            clear(n)
    proto.doc_string = ""
    return proto


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            proto.metadata_props.add(key=k, value=v)


def file_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata, read without its weights' external data."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise ExportError(f"{path} is not a valid ONNX file ({type(e).__name__}: {e})") from None
    return {p.key: p.value for p in proto.metadata_props}


def portable_name(source: str) -> str:
    """What the weights were fine-tuned from, without a folder of the machine that trained
    them: a file's name (whether or not it is still there), or a timm name as it is."""
    if source.startswith("hf-hub:") or not ("/" in source or "\\" in source or Path(source).exists()):
        return source
    return Path(source.replace("\\", "/")).name


def run_metadata(run: dict, weights: list[Path], attention: bool) -> dict[str, str]:
    """Everything a reader of the file needs, as strings (JSON where structured). ``weights``:
    the kept weights' files, an ensemble's members' in order (each one's hash is kept)."""
    result = run.get("result", {})
    source = run["train"].get("pretrained")
    hashes = [hashlib.sha256(f.read_bytes()).hexdigest() for f in ([weights] if isinstance(weights, Path) else weights)]
    return {
        "labels": json.dumps(run["labels"]),
        **Preprocessing.from_dict(run["preprocessing"]).metadata(),
        "model_config": json.dumps(run["model"]),
        "initialization": f"fine-tuned from {portable_name(source)}" if source else "trained from scratch",
        "train_images": str(run.get("data", {}).get("train_images", "")),
        "val_accuracy": str(result.get("val_acc", "")),
        "weights_sha256": hashes[0],  # the run's own model.safetensors
        "models": str(len(hashes)),
        **({"ensemble_weights_sha256": json.dumps(hashes)} if len(hashes) > 1 else {}),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "attention_output": str(attention).lower(),
        "views": "the image and its mirror, logits averaged"
        if run["model"].get("mirror_average")
        else "the image as given",
        **(
            {
                "ensemble": f"{len(hashes)} models of this configuration trained from other seeds on the same images, "
                "logits averaged; the ood score reads the first"
            }
            if len(hashes) > 1
            else {}
        ),  # fmt: skip
        "threshold_rule": "5th percentile of the top probability on correctly classified validation images "
        "(after temperature scaling)",
        "quantization": "none",
        "producer": "vit-app export",
        "input": "pixel_values: float32 (batch, 3, H, W), RGB, resized, centre-cropped and normalised as above",
    }


def ort_session(model, threads: int | None = None, spin: bool = True):
    """``vit.runtime.ort_session`` (the app's settings) for a path or an in-memory model."""
    from vit.runtime import ort_session as session

    return session(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model, threads, spin)


def ort_output(session, x: np.ndarray, name: str = "logits", batch: int = 32) -> np.ndarray:
    """One output of the file for preprocessed images (N, 3, H, W), in batches."""
    return np.concatenate([session.run([name], {"pixel_values": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def ort_logits(session, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return ort_output(session, x, "logits", batch)


@torch.no_grad()
def torch_logits(model: ViT, x: np.ndarray, batch: int = 32) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def verify(
    proto: onnx.ModelProto, model: ViT, x: np.ndarray, with_attention: bool, ood: nn.Module | None = None
) -> tuple[dict, object]:
    """Check the file and compare it with PyTorch; raise ExportError on any failure. Returns the
    numbers and the onnxruntime session it made, for the caller's further use of the file."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the model: {e}") from None
    sess = ort_session(proto)
    ref, got = torch_logits(model, x), ort_logits(sess, x)
    diff = float(np.abs(ref - got).max())
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    if diff > MAX_ABS_LOGIT_DIFF or agree < 1.0:
        raise ExportError(
            f"onnxruntime and PyTorch disagree: max |Δ logits| {diff:.2e} (limit "
            f"{MAX_ABS_LOGIT_DIFF:.0e}), top-1 agreement {agree:.2%} (must be 100%)"
        )
    for b in (1, 3, 8):  # the dynamic batch axis really works
        xb = np.resize(x, (b, *x.shape[1:])).astype(np.float32)
        outs = sess.run(None, {"pixel_values": xb})
        if outs[0].shape != (b, model.config.num_classes):
            raise ExportError(f"batch {b}: logits shape {outs[0].shape}")
        if with_attention and outs[1].shape != (b, *model.config.grid_size):
            raise ExportError(f"batch {b}: attention shape {outs[1].shape}")
        d = float(np.abs(outs[0] - torch_logits(model, xb)).max())
        if d > MAX_ABS_LOGIT_DIFF:
            raise ExportError(f"batch {b}: max |Δ logits| {d:.2e}")
        if ood is not None and outs[-1].shape != (b,):
            raise ExportError(f"batch {b}: ood_score shape {outs[-1].shape}")
    check = dict(max_abs_logit_diff=diff, top1_agreement=agree, images=len(x))
    if ood is not None:
        from export.ood import pooled_features

        with torch.no_grad():
            ref = ood(torch.from_numpy(pooled_features(members_of(model)[0], x))).numpy()
        got = np.concatenate(
            [sess.run(["ood_score"], {"pixel_values": x[i : i + 32]})[0] for i in range(0, len(x), 32)]
        )
        rel = float((np.abs(ref - got) / np.maximum(np.abs(ref), 1.0)).max())
        if rel > MAX_REL_OOD_DIFF:
            raise ExportError(f"onnxruntime and PyTorch disagree on the ood score: max relative difference {rel:.2e}")
        check["max_rel_ood_diff"] = rel
    return check, sess


def save_proto(proto: onnx.ModelProto, out: Path) -> None:
    """Write one self-contained file, atomically (no external data)."""
    files.atomic_write(out, lambda tmp: onnx.save_model(proto, tmp, save_as_external_data=False))


def load_run(run_dir: Path) -> tuple[ViT, dict, list[Path]]:
    run = RunDir(run_dir)
    if not run.is_trained():
        raise ExportError(
            f"{run_dir} is not a training run: it needs config.json and model.safetensors (made by python train.py)"
        )
    return run.load_model(), run.config(), run.weight_files()


def split_inputs(
    run_dir: Path, which: str = "val", limit: int | None = CALIBRATION_IMAGES, data: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The run's ``val`` (or ``train``) images, a seeded sample stratified over every class
    (all of them up to ``limit``), preprocessed exactly as the runtime will, and labels."""
    run = RunDir(run_dir)
    reader = InputReader(run, data)
    x, y, _ = reader(run.items(which, limit))
    if not len(y):
        raise ExportError(
            f"no {which} images found under {reader.root}: the run's data folder is needed; pass it with --data PATH"
        )
    return x, y


class InputReader:
    """A run's images, preprocessed as the runtime will: the run's settings and data folder are
    read once, then any number of batches of items go through it."""

    def __init__(self, run: RunDir, data: Path | None):
        from vit.imageio import DEFAULT_MAX_PIXELS

        cfg = run.config()
        self.prep, self.root = run.preprocessing(), run.data_root(data)
        self.max_pixels = cfg.get("data", {}).get("max_pixels") or DEFAULT_MAX_PIXELS

    def __call__(self, items: list) -> tuple[np.ndarray, np.ndarray, int]:
        """(images, labels, files that could not be read)."""
        from vit.imageio import BadImage, open_image

        xs, ys = [], []
        for rel, y in items:
            try:
                img = open_image(self.root / rel, self.max_pixels)
            except (BadImage, OSError):
                continue
            xs.append(self.prep(img))
            ys.append(y)
        empty = np.zeros((0, 3, *self.prep.image_size), np.float32)
        return (np.stack(xs) if xs else empty), np.array(ys, dtype=np.int64), len(items) - len(ys)


class HeldOut:
    """The run's test/ split, streamed in batches (it may be large), never used for a choice."""

    def __init__(self, run_dir: Path, data: Path | None, batch: int = 256):
        run = RunDir(run_dir)
        self.read, self.batch, self.items = InputReader(run, data), batch, run.items("test")

    def evaluate(self, session) -> dict:
        """Accuracy of a file on every readable test image, and its ood scores if it has them."""
        names = {o.name for o in session.get_outputs()}
        correct, n, skipped, scores = 0, 0, 0, []
        for i in range(0, len(self.items), self.batch):
            x, y, missing = self.read(self.items[i : i + self.batch])
            skipped += missing
            if not len(y):
                continue
            correct += int((ort_output(session, x).argmax(1) == y).sum())
            n += len(y)
            if "ood_score" in names:
                scores.append(ort_output(session, x, "ood_score"))
        return dict(
            accuracy=correct / max(n, 1), images=n, skipped=skipped,
            ood_scores=np.concatenate(scores) if scores else None,
        )  # fmt: skip


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T that minimises the validation NLL of
    softmax(logits / T). One scalar, so the ranking (and accuracy) is unchanged; it undoes the
    under-confidence that label smoothing trains in, or a small model's over-confidence.
    Searched on a fine log-spaced grid (1.5% steps from 0.05 to 20): deterministic, no optimiser."""
    logits, y = logits.astype(np.float64), np.asarray(y)
    best_t, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 400)):
        p = softmax(logits / t)[np.arange(len(y)), y]
        nll = float(-np.log(np.clip(p, 1e-300, None)).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def confidence_threshold(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    correct = probs.argmax(1) == y
    top = probs.max(1)[correct]
    t = float(np.percentile(top, 5)) if len(top) else 0.0
    return min(0.9, max(1.0 / k, t))


def int8_gate(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray) -> dict:
    agree = float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean())
    acc32 = float((fp32_logits.argmax(1) == labels).mean())
    acc8 = float((int8_logits.argmax(1) == labels).mean())
    ok = agree >= INT8_MIN_AGREEMENT and acc32 - acc8 <= INT8_MAX_ACC_DROP + 1e-12
    return dict(passed=ok, top1_agreement=agree, fp32_accuracy=acc32, int8_accuracy=acc8, images=len(labels))


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of MatMul/Gemm weights (activations quantised at run time)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    keep = {i.name for i in model.graph.initializer if i.name.startswith("ood.")}
    # The out-of-distribution score stays fp32: quantised, its distances lose the image's place
    # among the training images (AUROC on photos fell from 0.995 to 0.76).
    exclude = [n.name for n in model.graph.node if keep & set(n.input)]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # quiet its generic advice to pre-process the model
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True},
            nodes_to_exclude=exclude,
        )
    finally:
        root.setLevel(level)


def export_run(
    run_dir: Path,
    out: Path,
    attention: bool = True,
    int8: bool = False,
    log=print,
    extra_metadata: dict[str, str] | None = None,
    data: Path | None = None,
    ood: bool = True,
) -> dict:
    """Export, verify, and write ``out`` (and ``out``'s ``.int8.onnx`` twin if asked and passed).

    ``data``: where the run's images are now, if not where it was trained. ``ood``: carry the
    out-of-distribution score (``export.ood``). An older int8 twin of ``out`` is removed unless
    a new one passes its gate: it would describe other weights.
    """
    model, run, weights = load_run(run_dir)
    if (pending := RunDir(run_dir).pending_member()) is not None:
        log(
            f"warning: {pending} is a model of this run's ensemble that has not finished, so this file holds "
            f"the {len(weights)} that have; python train.py --resume {run_dir} finishes it"
        )
    prep = Preprocessing.from_dict(run["preprocessing"])
    x, y = split_inputs(run_dir, "val", CALIBRATION_IMAGES, data)
    scorer = fit_ood(model, run_dir, data, x, log) if ood else None
    proto = to_onnx(model, attention, scorer)
    check_x = np.concatenate([x[y == k][: max(1, VERIFY_IMAGES // model.config.num_classes)] for k in np.unique(y)])
    check, session = verify(proto, model, check_x, attention, scorer)  # verified: used for the rest (faster)
    logits = ort_logits(session, x)
    meta = {**run_metadata(run, weights, attention), **calibration(logits, y, model.config.num_classes, log)}
    test = HeldOut(run_dir, data) if RunDir(run_dir).split().get("test") else None
    tested = test.evaluate(session) if test is not None else None
    if tested is not None:
        meta["test_accuracy"], meta["test_images"] = f"{tested['accuracy']:.4f}", str(tested["images"])
        unread = f" ({tested['skipped']} could not be read)" if tested["skipped"] else ""
        log(f"held-out test accuracy {tested['accuracy']:.2%} on {tested['images']} images{unread} (this file)")
    if scorer is not None:
        meta.update(ood_metadata(session, x, tested, prep, log, scorer))
    set_metadata(proto, {**meta, **(extra_metadata or {})})
    out, twin = Path(out), int8_path(Path(out))
    if twin.exists():  # made from other weights: it must not outlive them, whatever happens next
        twin.unlink()
        log(f"removed the older {twin}: an int8 file must come from this export")
    save_proto(proto, out)
    log(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB"
        + (f", {len(weights)} models, logits averaged" if len(weights) > 1 else "")
        + "): "
        f"max |Δ logits| vs PyTorch {check['max_abs_logit_diff']:.1e} "
        f"on {check['images']} validation images, top-1 agreement {check['top1_agreement']:.0%}"
    )
    result = dict(fp32=dict(path=str(out), calibration_images=len(y), temperature=float(meta["temperature"]), **check))
    if int8:
        result["int8"] = export_int8(out, x, y, log, test, prep)
    return result


def calibration(logits: np.ndarray, y: np.ndarray, num_classes: int, log=print) -> dict[str, str]:
    """Temperature and "not sure" threshold from validation logits, as metadata."""
    temperature = fit_temperature(logits, y)
    before = expected_calibration_error(softmax(logits), y)
    after = expected_calibration_error(softmax(logits / temperature), y)
    if after > before:  # a few validation images can mislead the fit: never ship a worse calibration
        log(f"temperature {temperature:.3f} would raise the calibration error ({before:.3f} -> {after:.3f}): kept 1")
        temperature, after = 1.0, before
    probs = softmax(logits / temperature)
    threshold = confidence_threshold(probs, y, num_classes)
    log(
        f"calibration on {len(y)} validation images ({len(np.unique(y))} classes): temperature {temperature:.3f}, "
        f"expected calibration error {before:.3f} -> {after:.3f}, 'not sure' below {threshold:.3f}"
    )
    return {
        "ece_uncalibrated": f"{before:.4f}",
        "ece": f"{after:.4f}",
        "threshold": f"{threshold:.4f}",
        "temperature": f"{temperature:.4f}",
        "temperature_rule": "fitted on the validation split to minimise NLL; "
        "probabilities are softmax(logits / temperature)",
        "calibration_images": str(len(y)),
    }


def fit_ood(model: ViT, run_dir: Path, data: Path | None, x_val: np.ndarray, log=print):
    """The score's class means and covariances from the run's training images, and its scales
    from the validation images ``x_val`` (preprocessed)."""
    from export.ood import FIT_IMAGES, OODScore, blocks_for, pooled_features

    run, cfg = RunDir(run_dir), model.config
    model = members_of(model)[0]  # an ensemble's score reads its first member (Exportable)
    items = run.items("train", FIT_IMAGES)
    keep = blocks_for(len(items), cfg.depth, cfg.dim)  # what the score can read: the rest is not kept
    feats, labels, read = [], [], InputReader(run, data)
    for i in range(0, len(items), 256):  # in batches: 10,000 images at 224 px would be 6 GB at once
        x, y, _ = read(items[i : i + 256])
        if len(y):
            feats.append(pooled_features(model, x, keep))
            labels.append(y)
    if not labels:
        raise ExportError(f"no training images found under {read.root}: pass the data folder with --data")
    yt = np.concatenate(labels)
    scorer = OODScore.fit(np.concatenate(feats), yt, pooled_features(model, x_val, keep), cfg.num_classes, cfg.depth)
    log(
        f"out-of-distribution score: the last {scorer.blocks} of {cfg.depth} blocks, guarded by the patch embedding, "
        f"fitted on {len(yt)} training images"
    )
    return scorer


def ood_metadata(
    session, x_val: np.ndarray, tested: dict | None, prep: Preprocessing, log=print, scorer=None
) -> dict[str, str]:
    """The score's threshold (conformal, on validation images) and the rates measured at export."""
    from export.ood import KEEP, STEM_MARGIN, conformal_threshold, probe_images

    def scores(x):
        return np.concatenate(
            [session.run(["ood_score"], {"pixel_values": x[i : i + 64]})[0] for i in range(0, len(x), 64)]
        )

    val = scores(x_val)
    threshold = conformal_threshold(val, KEEP)
    rates = {"validation": float(np.mean(val <= threshold))}
    if tested is not None and tested["ood_scores"] is not None:
        rates["held-out test"] = float(np.mean(tested["ood_scores"] <= threshold))
    probes = probe_images()
    for name, images in probes.items():
        rates[name] = float(np.mean(scores(np.stack([prep(im) for im in images])) <= threshold))
    log("answered as known: " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()))
    enough = math.ceil(KEEP / (1 - KEEP))  # the fewest images with a ceil((n + 1) * KEEP)-th score
    conformal = f"the split-conformal {KEEP:.1%} quantile"
    quantile = f"{conformal} of {len(val)} validation images' scores"
    if len(val) < enough:
        quantile = f"the largest of {len(val)} validation images' scores (too few for {conformal})"
        log(
            f"warning: {len(val)} validation images are too few for the {KEEP:.1%} quantile (at least {enough}): "
            "the threshold is the largest of their scores, and the share of new known images it keeps is not known"
        )
    fooled = [name for name in probes if rates[name] > 0.5]
    if fooled:
        log(
            f"warning: most of the {', '.join(fooled)} images made here are answered as known: this model's score "
            "cannot tell them from its classes, so 'unlike the training classes' will rarely be said; more "
            "training and validation images help"
        )
    return {
        "ood_threshold": f"{threshold:.6g}",
        "ood_rule": "squared Mahalanobis distance of the pooled features"
        + (f" of the last {scorer.blocks} blocks, fitted on {scorer.fit_images} training images," if scorer else "")
        + " to the nearest class mean (one shared covariance), divided by its validation quantile; or, where "
        + f"larger, the same for the patch embedding's tokens divided by {STEM_MARGIN} times its own; "
        + "an image is unlike the training classes above "
        + quantile,
        "ood_known_rates": json.dumps({k: round(v, 4) for k, v in rates.items()}),
    }


def int8_path(fp32_path: Path) -> Path:
    return fp32_path.with_name(fp32_path.stem + ".int8.onnx")


def export_int8(
    fp32_path: Path,
    x: np.ndarray,
    y: np.ndarray,
    log=print,
    test: HeldOut | None = None,
    prep: Preprocessing | None = None,
) -> dict:
    """Quantise ``fp32_path``; keep the result only if it passes the accuracy gate (on the
    validation images ``x``, ``y``). ``test``: the held-out split, whose accuracy goes in the file.
    The int8 file's out-of-distribution threshold and rates are fitted on its own scores."""
    dst = int8_path(fp32_path)
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "q.onnx"
        quantize_int8(fp32_path, q)
        proto = onnx.load(str(q))
        src_meta = file_metadata(fp32_path)
        meta = {**src_meta, "quantization": "int8-dynamic (MatMul/Gemm weights, per channel)"}
        gate = int8_gate(ort_logits(ort_session(fp32_path), x), ort_logits(ort_session(proto), x), y)
        session = ort_session(proto)
        tested = test.evaluate(session) if test is not None else None
        if tested is not None:
            meta["test_accuracy"] = f"{tested['accuracy']:.4f}"
        if "ood_threshold" in src_meta and prep is not None:
            meta.update(ood_metadata(session, x, tested, prep, log=lambda *_: None))
            meta["ood_rule"] = src_meta["ood_rule"]  # the same score; only its threshold is the int8 file's own
        set_metadata(proto, meta)
        numbers = (
            f"top-1 agreement with fp32 {gate['top1_agreement']:.2%} (need >= {INT8_MIN_AGREEMENT:.0%}), "
            f"accuracy {gate['fp32_accuracy']:.2%} -> {gate['int8_accuracy']:.2%} (max drop "
            f"{INT8_MAX_ACC_DROP * 100:.1f} points) on {gate['images']} validation images"
        )
        if not gate["passed"]:
            log(f"int8 refused: {numbers}; no int8 file written")
            return dict(path=None, **gate)
        save_proto(proto, dst)
    log(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB): {numbers}")
    return dict(path=str(dst), **gate)
