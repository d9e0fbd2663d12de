"""Training defaults chosen from the data: its image size, its size, and the device.

Every value here is only a default: each has a command-line flag that overrides it, and
the resolved values are printed and saved with the run.
"""

from __future__ import annotations


def input_size_for(native_side: int, device: str) -> tuple[int, int]:
    """(image size, patch size) for images whose shorter side is about ``native_side``.

    Small images are not blown up: the input stays near its native size and the patch
    shrinks with it, so the grid stays at 8x8 = 64 tokens (4x4 for glyph-sized images of 24 px
    or less), cheap enough for a CPU. Large
    images use the paper's 16-pixel patches, at 224 on a GPU and 128 on a CPU.
    """
    if native_side <= 12:
        return 8, 2  # glyph-sized images: a 4x4 grid of 2-pixel patches
    if native_side <= 24:
        return 16, 4
    for limit, size in ((48, 32), (96, 64)):
        if native_side <= limit:
            return size, size // 8
    return (224, 16) if device == "cuda" else (128, 16)


def model_for(num_images: int) -> dict[str, int]:
    """Width and depth for the amount of data: small data, small model (less to overfit)."""
    if num_images < 5_000:
        return dict(dim=128, depth=6, heads=4, mlp_dim=256)
    if num_images < 50_000:
        return dict(dim=192, depth=12, heads=3, mlp_dim=768)  # ViT-Ti (DeiT)
    return dict(dim=384, depth=12, heads=6, mlp_dim=1536)  # ViT-S (DeiT)


def scratch_recipe(num_images: int, native_side: int, device: str) -> dict:
    """Defaults for training from scratch (DeiT-style recipe, scaled to the data)."""
    image_size, patch = input_size_for(native_side, device)
    epochs = int(min(300, max(30, 100_000 // max(num_images, 1))))
    # Images of 16 px or less are mostly glyphs (digits, letters, icons): a mirror image or a
    # tight crop of one is often another class, so those augmentations are left out.
    glyphs = native_side <= 16
    # On a CPU the run is fitted to minutes, a few dozen epochs at most: too short for strong
    # augmentation and regularisation to pay off (DeiT's recipe assumes hundreds of epochs).
    # Measured on 3,000 shapes at 32 px: 57% with light augmentation against 33% with
    # TrivialAugment, erasing and stochastic depth in the same time (an earlier benchmarks/learning.py).
    short = device == "cpu"
    return dict(
        image_size=image_size,
        patch_size=patch,
        **model_for(num_images),
        # A small conv stem (Xiao et al. 2021; like the paper's hybrid input, §3.1) learns much faster
        # from scratch than linear patches: 70% against 57% on those shapes in the same time.
        stem="conv",
        # Average pooling over patch tokens, LayerNorm after pooling: learns faster than the
        # class token from scratch on small data (as Beyer et al. 2022 report too).
        pool="avg",
        epochs=epochs,
        time_budget=8.0 if device == "cpu" else None,  # minutes; fits the schedule to the clock
        batch_size=min(128, max(32, num_images // 50)),  # small data: more, smaller steps
        lr=1e-3,
        min_lr_ratio=0.01,
        weight_decay=0.05,
        warmup_epochs=min(5, max(1, epochs // 20)),
        label_smoothing=0.1,
        augment="none" if glyphs or short else "trivial",  # at <= 16 px its ops destroy the glyph
        scale_min=0.75 if glyphs else 0.6 if short else 0.35,
        hflip=0.0 if glyphs else 0.5,
        mixup=0.0,
        cutmix=0.0,
        erase=0.0 if glyphs or short else 0.25,
        drop_path=0.0 if short else 0.1,
        dropout=0.0,
        clip_grad=1.0,
        ema=True,
        layer_decay=None,
        interpolation="bicubic",
        crop_pct=1.0,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
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
        ema=False,
        layer_decay=0.75,
        **preprocessing,
    )
