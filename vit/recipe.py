"""Training defaults chosen from the data: its image size, its size, and the device.

Every value here is only a default: each has a command-line flag that overrides it, and
the resolved values are printed and saved with the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# With a time budget a from-scratch schedule is fitted to the clock (vit.budget), up to this
# many epochs: DeiT's length, and the longest the recipe gives a run without a budget. Only
# small data reaches it on a CPU (about 400 glyph-sized training images or fewer in the default
# 8 minutes), and there more epochs did not pay: at 10 digits a class a 1,000-epoch run scored
# 93.85 (one run a split, another day) against 95.18 for 300 (behind on every split) and 95.26
# for 150; at 20 a class the whole 8 minutes (734-761 epochs) 97.33 against 97.04 for 300,
# within the spread, no trend from 87 epochs up (3 splits; benchmarks/learning_tiny*_8min_*_cpu.json,
# learning_tiny*_5min_*_cpu.json, learning_ens_base_tiny*_cpu.json). A run that reaches it ends
# early, and says why (CAP_NOTE).
BUDGET_MAX_EPOCHS = 300
CAP_NOTE = (
    "set by the recipe, DeiT's length: with a few hundred images, more epochs scored no higher beyond the spread "
    "in the README's tiny-data runs"
)
# A from-scratch run whose whole schedule (the cap above) ended with more of its time budget left
# than it took spends the rest on a second model, trained from another seed on the same split,
# whose logits are averaged with the first's (train.py). In the CPU's 8 minutes on the digits:
# +0.42 at 10 a class (9 splits, ahead on 7, behind on 1) and +0.22 at 20 (6 splits, ahead on 4,
# behind on 2; benchmarks/budget_spend_tiny*_8min_same_cpu.json). Two at most: each costs a
# forward pass (the two-model file took 1.72x one model's latency, ensemble_latency_cpu.json),
# and a recipe change is held to 2x.
AUTO_MEMBERS = 2
MEMBER_MARGIN = 1.1  # the time left must be this many times what the first model took
GLYPH_SIDE = 16  # images this small are taken for glyphs: no flip, no strong augmentation (tiny data: mixup)
SHORT_BUDGET = 4.0  # minutes: on a CPU, a budget this short gets a coarser token grid (input_size_for)
CPU_BUDGET = 8.0  # minutes: a from-scratch run's default time budget on a CPU
SMALL_DATA = 5_000  # fewer training images than this get the small model (model_for)
SAM_IMAGES, SAM_BUDGET = 1_000, 5.0  # glyph-sized data with this many images, and minutes: SAM
MIXUP_IMAGES, MIXUP_BUDGET = 500, CPU_BUDGET  # glyph-sized data with fewer training images, and minutes: mixup
GLYPH_GRID = (16, 2)  # (input, patch) for small data of 12 px or less: an 8x8 token grid
# The small model narrowed for that grid (4 times the tokens of 8 px in 2 px patches): its
# file takes 1.44x the 4x4 grid's time at batch 1 on a CPU with AVX-512, 1.83-1.96x on one with
# AVX2 only, the full width's 1.98-2.24x and 2.67-2.72x (benchmarks/grid_encoder_latency_cpu.json,
# grid_latency_cpu.json, grid_latency_avx2_r*_cpu.json), and it scores level
# with the full width on digits: 99.29 against 99.42, within the spread (5 splits, 2 minutes;
# benchmarks/learning_dig2screen_grid8w96_cpu.json, learning_dig2screen_grid8_cpu.json).
GLYPH_GRID_MODEL = dict(dim=96, depth=6, heads=3, mlp_dim=192)


def short_cpu_budget(device: str, budget: float | None) -> bool:
    """A time budget short enough, on a CPU, for images of 25-96 px to get a 4x4 grid."""
    return device == "cpu" and bool(budget) and budget < SHORT_BUDGET


def input_size_for(native_side: int, device: str, budget: float | None = None, num_images: int = 0) -> tuple[int, int]:
    """(image size, patch size) for images whose shorter side is about ``native_side``, on
    ``device``, with a time budget of ``budget`` minutes (None: no budget), for
    ``num_images`` training images (0: unknown, taken as small data).

    Small images are not blown up much: the input stays near its native size and the patch
    grows with it, so the token grid stays small. Images of 12 px or less (8 px digits) are
    resized to 16 px in 2-pixel patches, an 8x8 grid, when there are fewer than
    ``SMALL_DATA`` of them, with a narrower encoder (``model_for_input``) that keeps the file
    within 1.5x the 4x4 grid's latency on a CPU with AVX-512 (1.83-1.96x with AVX2 only).
    Measured on digits with ``benchmarks/learning.py``
    against 8 px in a 4x4 grid: 99.29% against 99.11% in 2 minutes on the 5 splits it was
    chosen on, 99.07% against 98.84% on 5 new ones; 95.78% against 94.67% at 10 images a
    class and 97.41% against 96.37% at 20 in 1 minute (3 splits).
    13-24 px: a 4x4 grid (not measured against 8x8). Above, 8x8; on a CPU with a short
    budget (under ``SHORT_BUDGET`` minutes) images up to 96 px get a 4x4 grid too: a step
    costs about a third of an 8x8 grid's, so the run trains 2-2.7 times as many epochs,
    which matters more than the finer grid when there are few. Measured (3 splits): in 2
    minutes, shapes at 32 px 94.5% against 71.7% and letters in unseen fonts at 64 px 99.4%
    against 96.3%; in 5 minutes the 8x8 grid is ahead on the letters (99.9% against 99.3%).
    Large images use the paper's 16-pixel patches, at 224 on a GPU and 128 on a CPU.
    """
    if native_side <= 12:
        # digit-sized images: an 8x8 grid of 2-pixel patches on the image doubled, for small
        # data; more images get the larger model (model_for), which keeps a 4x4 grid
        return GLYPH_GRID if num_images < SMALL_DATA else (8, 2)
    if native_side <= 24:
        return 16, 4
    grid = 4 if short_cpu_budget(device, budget) else 8
    for limit, size in ((48, 32), (96, 64)):
        if native_side <= limit:
            return size, size // grid
    return (224, 16) if device == "cuda" else (128, 16)


def patch_for(image_size: int, device: str, budget: float | None = None) -> int:
    """The patch for an input size the user chose (``--image-size`` without ``--patch-size``):
    the recipe's patch for images of that size, halved until it divides the size and leaves a
    grid of at least 4x4 (a power of 2, as the conv stem needs)."""
    patch = input_size_for(image_size, device, budget)[1]
    while patch > 1 and (image_size % patch or image_size // patch < 4):
        patch //= 2
    return patch


def model_for(num_images: int) -> dict[str, int]:
    """Width and depth for the amount of data: small data, small model (less to overfit)."""
    if num_images < SMALL_DATA:
        return dict(dim=128, depth=6, heads=4, mlp_dim=256)
    if num_images < 50_000:
        return dict(dim=192, depth=12, heads=3, mlp_dim=768)  # ViT-Ti (DeiT)
    return dict(dim=384, depth=12, heads=6, mlp_dim=1536)  # ViT-S (DeiT)


def model_for_input(num_images: int, native_side: int, image_size: int, patch: int) -> dict[str, int]:
    """Width and depth for the data and the input it is given: the narrowed small model
    (``GLYPH_GRID_MODEL``) for digit-sized small data on the 8x8 grid it was measured on
    (``GLYPH_GRID``), whichever device trains it, since the exported file runs on CPUs (the
    app, the browser); otherwise ``model_for``. Another input size or patch on the same images
    (``--image-size 8``, ``--patch-size 4``) gets ``model_for``'s model again."""
    if native_side <= 12 and num_images < SMALL_DATA and (image_size, patch) == GLYPH_GRID:
        return dict(GLYPH_GRID_MODEL)
    return model_for(num_images)


def default_budget(device: str) -> float | None:
    """A from-scratch run's time budget in minutes when none is given: ``CPU_BUDGET`` on a CPU."""
    return CPU_BUDGET if device == "cpu" else None


def scratch_recipe(num_images: int, native_side: int, device: str, budget: float | None = None) -> dict:
    """Defaults for training from scratch (DeiT-style recipe, scaled to the data); ``budget``:
    the time budget the user gave, in minutes (0: none), else the device's default."""
    budget = budget if budget is not None else default_budget(device)
    image_size, patch = input_size_for(native_side, device, budget, num_images)
    model = model_for_input(num_images, native_side, image_size, patch)
    epochs = int(min(300, max(30, 100_000 // max(num_images, 1))))
    # Images of 16 px or less are mostly glyphs (digits, letters, icons): a mirror image or a
    # tight crop of one is often another class, so those augmentations are left out.
    glyphs = native_side <= GLYPH_SIDE
    # On a CPU the run is fitted to minutes, a few dozen epochs of a few thousand images: too short for
    # strong augmentation and regularisation to pay off (DeiT's recipe assumes hundreds of epochs);
    # tiny glyph-sized data, which trains hundreds, gets mixup (below).
    # Measured on 3,000 shapes at 32 px: 57% with light augmentation against 33% with
    # TrivialAugment, erasing and stochastic depth in the same time (an earlier benchmarks/learning.py).
    short = device == "cpu"
    return dict(
        image_size=image_size,
        patch_size=patch,
        **model,
        # A small conv stem (Xiao et al. 2021; like the paper's hybrid input, §3.1) learns much faster
        # from scratch than linear patches: 70% against 57% on those shapes in the same time.
        stem="conv",
        # Two 3x3 convolutions per stage (a stride-1 one after each stride-2 one, closer to the
        # paper's ResNet hybrid than Xiao et al.'s one per stage): +5.0 and +3.3 on the shapes at
        # 64 and 32 px in 2 minutes (better on every split), +2.7 and +1.9 at 10 and 20 digits a
        # class in 1 minute, level on digits and letters in 5 minutes, at 0.92-1.25x the file's
        # latency (benchmarks/learning_stemdepth_*_cpu.json, stem_latency_cpu.json). Its
        # out-of-distribution score turns away as much as depth 1's on the digits model (AUROC a
        # little lower) and far more unseen shapes (benchmarks/ood_guard_*_cpu.json).
        stem_depth=2,
        # Average pooling over patch tokens, LayerNorm after pooling: learns faster than the
        # class token from scratch on small data (as Beyer et al. 2022 report too).
        pool="avg",
        epochs=epochs,
        time_budget=budget or None,  # minutes; fits the schedule to the clock
        batch_size=min(128, max(32, num_images // 50)),  # small data: more, smaller steps
        lr=1e-3,
        min_lr_ratio=0.01,
        weight_decay=0.05,
        warmup_epochs=min(5, max(1, epochs // 20)),
        label_smoothing=0.1,
        augment="none" if glyphs or short else "trivial",  # at <= 16 px its ops destroy the glyph
        scale_min=0.75 if glyphs else 0.6 if short else 0.35,
        hflip=0.0 if glyphs else 0.5,
        # Tiny glyph-sized data (Teachable Machine's ten to fifty images a class) trains the
        # recipe's whole 300 epochs within the CPU's default budget (nearly all of it at fifty a
        # class) and fits its few images long before the end: mixup (Zhang et al. 2018; alpha
        # 0.8, DeiT's) blends pairs of images and their labels, which no glyph-preserving
        # augmentation does. 8 px digits in 8 minutes, against 300 epochs without it: +0.81 at
        # 10 a class and +0.69 at 20 (9 splits, ahead on 7 at each), +0.22 at 50 (3 splits,
        # within the spread; benchmarks/learning_tiny*_8min_{cap300,mix08}*_cpu.json). Only with no
        # budget or one of MIXUP_BUDGET minutes or more, the budget it was measured in; shorter
        # budgets, 500 to 1,000 images (where SAM starts) and larger images were not measured.
        mixup=0.8 if glyphs and num_images < MIXUP_IMAGES and (not budget or budget >= MIXUP_BUDGET) else 0.0,
        cutmix=0.0,
        erase=0.0 if glyphs or short else 0.25,
        # A few thousand glyph-sized images train for hundreds of epochs in a CPU budget (digits
        # at 8 px: 115-172 plain epochs in 5 minutes) and fit their training images: stochastic depth is the
        # regulariser that paid there, +0.4 on digits at 5 minutes (better on every split) and
        # +0.7 and +0.8 at 10 and 20 images a class in 1 minute (better on 3 and 2 of 3 splits;
        # benchmarks/learning_5min_droppath_digits_cpu.json, learning_1min_droppath_cpu.json).
        # Larger images, or more of them, get a few dozen epochs on a CPU and underfit: none.
        drop_path=0.1 if (glyphs and num_images < SMALL_DATA) or not short else 0.0,
        dropout=0.0,
        clip_grad=1.0,
        # Sharpness-aware minimisation costs a second forward and backward pass a step, so it
        # halves the epochs. Glyph-sized data of a thousand images or more gain nothing from
        # more plain epochs past a couple of minutes on a CPU (the digits scored 98.74 in 10
        # minutes against 99.04 in 2 and in 5 on the same splits), and there SAM spends the time
        # better: level in 2 minutes, +0.27 in 5 (5 splits), +0.82 in 10 (every split of 3;
        # benchmarks/learning_dig*screen_sam*_cpu.json, learning_dig10_*_cpu.json). On 100-200
        # images in 1 minute it lost 1.2-1.6 points (learning_intel_sam10_tiny*_cpu.json), and
        # on 200 in 5 minutes it was level (learning_tiny20_5min_sam10_cpu.json).
        sam=0.1 if short and glyphs and SAM_IMAGES <= num_images < SMALL_DATA and (budget or 0) >= SAM_BUDGET else 0.0,
        ema=True,
        layer_decay=None,
        interpolation="bicubic",
        crop_pct=1.0,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
    )


def mixup_note(num_images: int, native_side: int, device: str, budget: float | None = None) -> str | None:
    """Why the recipe turned mixup on or off, for tiny glyph-sized data (None elsewhere, where
    it is simply off); ``budget`` as for ``scratch_recipe``."""
    if native_side > GLYPH_SIDE or num_images >= MIXUP_IMAGES:
        return None
    rule = f"the recipe's for fewer than {MIXUP_IMAGES} glyph-sized training images"
    if scratch_recipe(num_images, native_side, device, budget)["mixup"]:
        return (
            f"on (0.8): {rule}, given no time budget or one of {MIXUP_BUDGET:g} minutes or more "
            "(+0.7 to +0.8 points on 10 and 20 digits a class in the README)"
        )
    return (
        f"off: the recipe's mixup for fewer than {MIXUP_IMAGES} glyph-sized training images was measured in a "
        f"budget of {MIXUP_BUDGET:g} minutes, not in shorter ones"
    )


def finetune_recipe(num_images: int, preprocessing: dict) -> dict:
    """Defaults for fine-tuning pretrained weights: lower LR, fewer epochs, LR decay by layer."""
    epochs = int(min(50, max(5, 20_000 // max(num_images, 1))))
    return dict(
        epochs=epochs,
        time_budget=None,
        batch_size=min(64, max(8, num_images // 16)),
        lr=1e-4,
        min_lr_ratio=0.01,
        weight_decay=0.05,
        warmup_epochs=1,
        label_smoothing=0.1,
        augment="trivial",
        scale_min=0.5,
        hflip=0.5,
        mixup=0.0,
        cutmix=0.0,
        erase=0.0,
        drop_path=0.1,
        dropout=0.0,
        clip_grad=1.0,
        sam=0.0,
        ema=False,
        layer_decay=0.75,
        **preprocessing,
    )


@dataclass(frozen=True)
class MirrorCheck:
    """Does a mirror image of one class look like another class? Measured, not assumed.

    A horizontal flip is the most common augmentation, and right for photos; but a mirrored
    letter or digit can be another class (or no class at all), and training on it then costs
    accuracy: 4.2 points on letters across fonts in ``benchmarks/learning.py``. The check asks
    the training images themselves: each image's nearest neighbour (cosine distance between
    grey 16x16 thumbnails, the image itself left out) among the others, and among the others
    and their mirror images. If adding mirrors turns clearly more right answers wrong than
    wrong answers right (a one-sided sign test at 5%, and at least twice as many), mirrors
    look like other classes and the flip is left out.
    """

    checked: int  # images checked
    worse: int  # right without mirrors, wrong with them
    better: int  # wrong without mirrors, right with them
    p: float  # one-sided sign test: worse >= this many by chance, if mirrors made no difference

    @property
    def hurts(self) -> bool:
        # Significant, and large: mirrors must break at least twice as many answers as they fix.
        # Adding any images breaks some answers (more candidates, more near misses), most where
        # most answers are right: crops of two photos, where a mirror is as good a crop, gave
        # 19 broken against 11 fixed (benchmarks/mirror_check.json); letters across fonts 34-36
        # against 10-15.
        return self.worse >= 2 * self.better and self.p < 0.05

    def sentence(self) -> str:
        counts = (
            f"with mirrors added, {self.worse} of {self.checked} training images' nearest neighbours turned "
            f"to another class and {self.better} turned right"
        )
        if self.hurts:
            return f"mirror images look like other classes: {counts} (sign test p={self.p:.2g})"
        if self.worse + self.better < 5:  # below 5, no count reaches p < 0.05
            return f"too few images to tell whether mirror images look like other classes ({counts}); kept"
        if self.worse > self.better:
            return (
                f"no clear sign that mirror images look like other classes: {counts} (sign test p={self.p:.2g}; "
                "the flip is left out at p < 0.05 with at least twice as many turned wrong as right)"
            )
        return f"mirror images do not look like other classes: {counts}"


def sign_test(k: int, n: int) -> float:
    """One-sided sign test: the chance of ``k`` or more of ``n`` coin flips coming up heads."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n if n else 1.0


def mirror_check(thumbs: np.ndarray, labels: np.ndarray, most: int = 4000, seed: int = 0) -> MirrorCheck:
    """``MirrorCheck`` on (n, h, w) grey thumbnails, at most ``most`` of them (a random sample)."""
    n = len(labels)
    if n < 2:
        return MirrorCheck(n, 0, 0, 1.0)
    if n > most:
        keep = np.random.default_rng(seed).choice(n, most, replace=False)
        thumbs, labels = thumbs[keep], labels[keep]
        n = most
    x = torch.from_numpy(np.ascontiguousarray(thumbs, dtype=np.float32).reshape(n, -1))
    m = torch.from_numpy(np.ascontiguousarray(thumbs[:, :, ::-1], dtype=np.float32).reshape(n, -1))
    y = torch.from_numpy(np.asarray(labels))

    def unit(v: torch.Tensor) -> torch.Tensor:  # brightness and contrast do not count
        v = v - v.mean(1, keepdim=True)
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)

    x, m = unit(x), unit(m)
    plain, mirrored = x @ x.T, x @ m.T
    plain.fill_diagonal_(-2.0)
    mirrored.fill_diagonal_(-2.0)  # an image's own mirror is not a neighbour
    right = y[plain.argmax(1)] == y
    best = torch.cat([plain, mirrored], 1).argmax(1)
    right_with = torch.cat([y, y])[best] == y
    worse, better = int((right & ~right_with).sum()), int((~right & right_with).sum())
    return MirrorCheck(n, worse, better, sign_test(worse, worse + better))
