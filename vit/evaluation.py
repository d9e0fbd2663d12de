"""``train.py --eval``: a trained run, or an exported ONNX file, measured on a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np


# The steps of one evaluation in their order (model, folder, items, probabilities, report), so
# what is measured can be checked in one read.
def evaluate(
    source: Path, data: Path, out: Path | None = None, strict: bool = False, max_pixels: int | None = None, log=print
) -> dict:
    """A run's weights (``source`` a run folder) or an exported file (``source`` a .onnx, with its
    own preprocessing and temperature, as the app applies them) on a folder of images; writes the
    report and returns its scores."""
    from vit import report
    from vit.data import DataError, scan_folder
    from vit.imageio import DEFAULT_MAX_PIXELS, open_image

    if data is None:
        raise DataError("--eval RUN_DIR|MODEL.onnx needs --data PATH: the folder to evaluate on")
    onnx_file = source.suffix == ".onnx"
    if onnx_file:
        from vit.runtime import Classifier

        clf = Classifier(source)
        labels, prep = clf.labels, None
    else:
        from vit.run import RunDir

        run = RunDir(source)
        if not run.is_trained():
            raise DataError(f"{source} holds no trained model (config.json and model.safetensors)")
        labels, prep = run.config()["labels"], run.preprocessing()
    scan = scan_folder(
        data,
        strict=strict,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
        cache=False,
        min_classes=1,
        min_per_class=1,
    )
    items = scan.test or scan.val or scan.train
    unknown = sorted(set(scan.classes) - set(labels))
    if unknown:
        raise DataError(f"{data} has classes the model does not know: {unknown} (it knows {labels})")
    items = [(rel, labels.index(scan.classes[lab])) for rel, lab in items]
    if scan.skipped:
        shown = "; ".join(f"{rel} ({why})" for rel, why in scan.skipped[:5])
        log(f"skipped {len(scan.skipped)} unusable files: {shown}" + (" ..." if len(scan.skipped) > 5 else ""))
    if not onnx_file:
        seen = seen_in_training(run, scan.root, items)
        if seen:
            log(
                f"warning: {seen} of these {len(items)} images were in the run's training or validation split, so "
                "this accuracy is not a held-out number (a test/ folder is)"
            )
    load = lambda i: open_image(scan.root / items[i][0], scan.max_pixels)  # noqa: E731
    if onnx_file:
        probs = np.concatenate(  # the file's own preprocessing and temperature, as the app applies them
            [np.stack([p.probs for p in clf.predict_many([load(j) for j in range(i, min(i + 32, len(items)))])])
             for i in range(0, len(items), 32)]
        )  # fmt: skip
    else:
        probs = torch_probs(run.load_model(), scan, items, prep)
    ys = np.array([y for _, y in items])
    default = source.with_suffix("").parent / f"eval-{source.stem}-{scan.root.name}" if onnx_file else None
    out = out or default or source / f"eval-{scan.root.name}"
    scores = report.write_report(out, labels, probs, ys, load, title=f"Evaluation of {source.name} on {data}")
    log(
        f"{scores['n']} images from {data}: accuracy {scores['accuracy']:.2%}, macro F1 "
        f"{scores['macro']['f1']:.3f}; report in {out / 'report.md'}"
    )
    return scores


def seen_in_training(run, root: Path, items: list) -> int:
    """How many of ``items`` (under ``root``) the run trained or validated on."""
    from vit.run import RunError

    try:
        if run.data_root() != root:
            return 0
    except RunError:  # the run's folder has moved: it cannot be this one
        return 0
    split = run.split()
    used = {rel for rel, _ in split["train"] + split["val"]}
    return sum(rel in used for rel, _ in items)


def torch_probs(model, scan, items, prep) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader

    from vit.data import EvalTransform, FolderDataset

    ds = FolderDataset(scan, items, EvalTransform(prep))
    with torch.inference_mode():
        return torch.cat([model(x).softmax(-1) for x, _ in DataLoader(ds, batch_size=64)]).numpy()
