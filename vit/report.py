"""The run report: curves, confusion matrix, per-class scores, worst mistakes, calibration.

Inputs are plain arrays (probabilities and labels), so the same report serves training's
validation split and ``train.py --eval`` on another folder.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from vit import files


def append_metrics(path: Path, row: dict) -> None:
    """Add (or, after a resume, replace) one epoch's row of ``metrics.csv``, atomically."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(row))
    w.writeheader()
    w.writerows(rows)
    files.write_text(path, buf.getvalue())


def per_class_scores(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, and their macro averages."""
    k = len(classes)
    pred = probs.argmax(1)
    cm = np.zeros((k, k), dtype=np.int64)  # rows: true class, columns: predicted class
    np.add.at(cm, (labels, pred), 1)
    rows = {}
    for i, c in enumerate(classes):
        tp, support, predicted = cm[i, i], cm[i].sum(), cm[:, i].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rows[c] = dict(
            precision=round(float(p), 4), recall=round(float(r), 4), f1=round(float(f1), 4), support=int(support)
        )
    present = [v for v in rows.values() if v["support"]]
    macro = {m: round(float(np.mean([v[m] for v in present])), 4) for m in ("precision", "recall", "f1")}
    return dict(
        accuracy=round(float((pred == labels).mean()), 4),
        macro=macro,
        per_class=rows,
        confusion=cm.tolist(),
        ece=round(expected_calibration_error(probs, labels), 4),
        n=int(len(labels)),
    )


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| averaged over equal-width confidence bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path) -> None:
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)


def plot_curves(metrics_csv: Path, out: Path, train_label: str = "train") -> None:
    """Loss and accuracy by epoch; ``train_label`` names the training curves (their images may be mixed)."""
    rows = list(csv.DictReader(metrics_csv.open()))
    if not rows:
        return
    plt = _plt()
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [float(r["train_loss"]) for r in rows], label=train_label)
    a.plot(ep, [float(r["val_loss"]) for r in rows], label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    # mixed images' accuracy jumps from batch to batch: drawn faint, so validation stays readable
    faint = dict(alpha=0.35, linewidth=0.8) if train_label != "train" else {}
    b.plot(ep, [float(r["train_acc"]) for r in rows], label=train_label, **faint)
    b.plot(ep, [float(r["val_acc"]) for r in rows], label="validation")
    if rows[0].get("ema_val_acc"):
        b.plot(ep, [float(r["ema_val_acc"]) for r in rows], label="validation (EMA)", linestyle="--")
    b.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    _save_fig(fig, out)


def plot_confusion(cm: np.ndarray, classes: list[str], out: Path) -> None:
    plt = _plt()
    k = len(classes)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(14, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8 if k > 15 else 10)
    ax.set_yticks(range(k), classes, fontsize=8 if k > 15 else 10)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (rows sum to 1; numbers are counts)")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    _save_fig(fig, out)


def plot_mistakes(images: list, truths: list[str], preds: list[str], confs: list[float], out: Path) -> None:
    """A grid of the most confidently wrong images, or a note that there are none."""
    plt = _plt()
    n = len(images)
    cols = min(4, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "No validation mistakes", ha="center", va="center", fontsize=12)
    for ax, img, t, p, c in zip(axes.flat, images, truths, preds, confs):
        ax.imshow(img)
        ax.set_title(f"true: {t}\npredicted: {p} ({c:.0%})", fontsize=9)
    fig.suptitle("Most confidently wrong validation images")
    _save_fig(fig, out)


def write_report(
    out_dir: Path,
    classes: list[str],
    probs: np.ndarray,
    labels: np.ndarray,
    load_image,
    metrics_csv: Path | None = None,
    title: str = "Validation report",
    worst: int = 16,
    train_label: str = "train",
) -> dict:
    """Write report.md, report.json and the PNGs into ``out_dir``; return the scores.

    ``load_image(i)`` gives the i-th evaluated image (PIL), for the mistakes grid.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = per_class_scores(probs, labels, classes)
    files.write_json(out_dir / "report.json", dict(classes=classes, **scores))
    plot_confusion(np.asarray(scores["confusion"]), classes, out_dir / "confusion_matrix.png")
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-conf[wrong])][:worst]
    plot_mistakes(
        [load_image(int(i)) for i in wrong],
        [classes[labels[i]] for i in wrong],
        [classes[pred[i]] for i in wrong],
        [float(conf[i]) for i in wrong],
        out_dir / "mistakes.png",
    )
    if metrics_csv is not None and metrics_csv.exists():
        plot_curves(metrics_csv, out_dir / "curves.png", train_label)

    lines = [
        f"# {title}",
        "",
        f"{scores['n']} images, accuracy **{scores['accuracy']:.2%}**, "
        f"macro F1 {scores['macro']['f1']:.3f}, expected calibration error {scores['ece']:.3f} (15 bins).",
        "",
    ]
    if metrics_csv is not None and metrics_csv.exists():
        lines += ["![curves](curves.png)", ""]
    lines += ["| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
    for c, r in scores["per_class"].items():
        lines.append(f"| {c} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
    m = scores["macro"]
    lines += [
        f"| *macro average* | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {scores['n']} |",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "![most confidently wrong](mistakes.png)",
        "",
    ]
    files.write_text(out_dir / "report.md", "\n".join(lines))
    return scores
