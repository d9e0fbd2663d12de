"""Knowing what the model does not know: a Mahalanobis out-of-distribution score in the file.

The "not sure" threshold only catches doubt *between* known classes: softmax spreads over
the classes the model has, so a photo of a cat can still get "square, 100%". This score
asks another question: does the image look like the training images at all, at any depth
of the network? It is the Mahalanobis distance to the nearest class mean under one shared
covariance (Lee et al. 2018), on the pooled tokens of the last blocks side by side (their
"feature ensemble"; on ViTs, Fort et al. 2021), as many blocks as the training images can
fit a covariance for (``blocks_for``). Chosen by measurement on the bundled model: on the
last block's features alone it beat the maximum softmax probability, the energy score,
k-nearest-neighbour cosine distance and the relative Mahalanobis distance, and every block
together lowered the share of photos and digits answered as known from 4.5% and 5.3% to
2.5% and 4.3% (benchmarks/ood_choice.py, benchmarks/ood_choice_cpu.json).

A second distance guards the first: the same score on the patch embedding's tokens z_0,
before any block, counted only where it is far beyond the validation images' (``STEM_MARGIN``
times their 98.5% quantile). The last blocks of a model trained for a hundred epochs or more on a
little data map almost anything near some class: without the guard, a digits model (1,270
images at 8 px, its last block read) answered 93% and 99.5% of uniform-noise images as known
(two seeds) and 28% and 69% of photos; with it, none of either, on the same weights. On the
7-shape open-set model, whose last blocks already tell those apart, it moved each rate by at
most 2 points (``python benchmarks/ood.py --only digits open-set --without-guard --seed S
--vit-flags '--stem-depth 2'``, benchmarks/ood_guard_stem2_seed*_cpu.json; with one
convolution per stem stage, benchmarks/ood_guard_seed*_cpu.json, the same picture).

Everything is fitted at export from the training run alone (its training images give the
class means and the covariances; its validation images scale the two distances and give the
threshold), and the score is a graph output, so every runtime (Python, the browser) gets it
from the file.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vit.model import mean_of_views, with_mirrors

FIT_IMAGES = 10_000  # training images for the class means and covariance (stratified)
IMAGES_PER_DIM = 10  # fit images per feature dimension before another block's features are added
KEEP = 0.985  # the threshold keeps at least this share of new in-distribution images
# z_0's distance counts from this many times its validation quantile: far enough that it turns
# away almost no image the blocks would keep (known images are spread in z_0 as well), near
# enough for noise, flat colours and photos, which lie many times further out there.
STEM_MARGIN = 1.5


class MahalanobisScore(nn.Module):
    """min_k (y - mu_k)^T P (y - mu_k) for pooled features y (B, D) -> (B,).

    P = W W^T, so each distance is |(y - mu_k) W|^2, summed from differences rather than
    expanded into y P y - 2 y P mu + mu P mu, which cancels badly in fp32 when |y| is large.
    """

    def __init__(self, means: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        w = torch.linalg.cholesky(precision.double()).float()  # (D, D), lower triangular
        self.register_buffer("w", w)
        self.register_buffer("means_w", (means.double() @ w.double()).float())  # (K, D)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = y @ self.w  # (B, D)
        d = (z.unsqueeze(1) - self.means_w.unsqueeze(0)).square().sum(-1)  # (B, K)
        return d.amin(dim=1)


class OODScore(nn.Module):
    """The file's ood_score from the pooled taps (B, depth + 1, D) (``pooled_features``):
    max(deep / deep_scale, stem / stem_scale), where deep is the Mahalanobis score on the
    last ``blocks`` blocks side by side and stem the one on z_0 (taps[:, 0]). The scales
    are fitted on validation images (``fit``), so 1 is about where the deep score alone would
    have its threshold."""

    def __init__(self, deep: MahalanobisScore, stem: MahalanobisScore, blocks: int):
        super().__init__()
        self.deep, self.stem, self.blocks = deep, stem, blocks
        self.register_buffer("scales", torch.ones(2))  # deep_scale, stem_scale: set by ``fit``

    def parts(self, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two distances, unscaled: (B,), (B,)."""
        return self.deep(taps[:, -self.blocks :].flatten(1)), self.stem(taps[:, 0])

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        deep, stem = self.parts(taps)
        return torch.maximum(deep / self.scales[0], stem / self.scales[1])

    @classmethod
    def fit(cls, train: np.ndarray, labels: np.ndarray, val: np.ndarray, num_classes: int, depth: int):
        """From the pooled taps of training images (N, depth + 1, D) and their labels, and of
        validation images (M, depth + 1, D), or z_0 and the last blocks only (at least as many as
        the images support): each distance's Gaussian from the training images, its scale from
        the validation images (the deep one's conformal quantile, the stem's ``STEM_MARGIN``
        times its own)."""
        blocks = blocks_for(len(labels), depth, train.shape[-1])
        scorers = [
            MahalanobisScore(*(torch.from_numpy(a).float() for a in fit_gaussian(f, labels, num_classes)))
            for f in (train[:, -blocks:].reshape(len(train), -1), train[:, 0])
        ]
        score = cls(*scorers, blocks)
        with torch.no_grad():
            deep, stem = (d.double().numpy() for d in score.parts(torch.from_numpy(val).float()))
        tiny = 1e-12
        score.scales.copy_(
            torch.tensor([max(conformal_threshold(deep), tiny), STEM_MARGIN * max(conformal_threshold(stem), tiny)])
        )
        score.fit_images = len(labels)
        return score


def fit_gaussian(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K', D) and the shared precision matrix (D, D) of ``features`` (N, D).

    The covariance is shrunk towards a multiple of the identity by D / (D + N), a little for
    many images and a lot for few, so it is invertible even with fewer images than dimensions.
    Only classes with training images get a mean (K' <= K): a stand-in centre for a class never
    seen would make whatever lies near it look known."""
    f = features.astype(np.float64)
    present = [k for k in range(num_classes) if (labels == k).any()]
    means = np.stack([f[labels == k].mean(0) for k in present])
    resid = f - means[np.searchsorted(present, labels)]
    n, d = resid.shape
    cov = resid.T @ resid / max(n - len(present), 1)
    scale = np.trace(cov) / d
    if scale <= 1e-12 * max(np.trace(np.cov(f.T, bias=True)) / d, 1e-12):  # no spread within classes
        scale = max(np.trace(np.cov(f.T, bias=True)) / d, 1.0)  # (one image each): the spread between them
    alpha = d / (d + n)
    cov = (1 - alpha) * cov + alpha * scale * np.eye(d)
    cov += 1e-9 * scale * np.eye(d)
    return means, np.linalg.inv(cov)


def conformal_threshold(val_scores: np.ndarray, keep: float = KEEP) -> float:
    """The ceil((n + 1) * keep)-th smallest validation score: for a new image from the same
    source as the validation images, P(score <= threshold) >= keep (split conformal). With
    too few validation images for that, the largest one."""
    s = np.sort(np.asarray(val_scores, dtype=np.float64))
    k = math.ceil((len(s) + 1) * keep)
    return float(s[min(k, len(s)) - 1])


def blocks_for(images: int, depth: int, dim: int) -> int:
    """How many of the last blocks the score reads: as many as the fit images can estimate a
    covariance for (IMAGES_PER_DIM images per dimension), at least the last one. More blocks
    see more (measured on the bundled model: every block halves the photos and digits taken
    for shapes), but a covariance of more dimensions than the images support makes new
    in-distribution images look strange (measured on a digits model with 1,200 images: 89%
    answered as known with every block, 99% with the last)."""
    return max(1, min(depth, images // (IMAGES_PER_DIM * dim)))


@torch.no_grad()
def pooled_features(model, x: np.ndarray, blocks: int | None = None, batch: int = 64) -> np.ndarray:
    """What the score reads, for preprocessed images (N, 3, H, W): z_0 and every block's output,
    pooled as the model pools its last (N, depth + 1, D); with ``blocks``, z_0 and the last
    ``blocks`` only (N, blocks + 1, D), which is all the score reads. A model that averages
    each image with its mirror (``mirror_average``) averages these too, so the score, like the
    prediction, is the same for an image and its mirror."""
    model.eval()
    mirrored, out = model.config.mirror_average, []
    for i in range(0, len(x), batch):
        taps, xb = [], torch.from_numpy(x[i : i + batch])
        model.forward_pooled(with_mirrors(xb) if mirrored else xb, taps=taps)
        f = torch.stack(taps if blocks is None else [taps[0], *taps[-blocks:]], 1)
        out.append(mean_of_views(f) if mirrored else f)
    return torch.cat(out).numpy()


def probe_images(size: int = 64, n: int = 64, seed: int = 0) -> dict[str, list]:
    """Images no classifier of ours was trained on, made here, to measure at export how often
    each is answered as known: uniform noise, flat colours, smooth gradients."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, size)
    xx, yy = np.meshgrid(t, t)

    def gradient():
        a, b, angle = rng.integers(0, 256, 3), rng.integers(0, 256, 3), rng.uniform(0, 2 * np.pi)
        w = np.cos(angle) * xx + np.sin(angle) * yy
        w = (w - w.min()) / max(np.ptp(w), 1e-9)
        return Image.fromarray((a * (1 - w[..., None]) + b * w[..., None]).astype(np.uint8))

    return {
        "uniform noise": [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)],
        "flat colours": [
            Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(n)
        ],
        "smooth gradients": [gradient() for _ in range(n)],
    }
