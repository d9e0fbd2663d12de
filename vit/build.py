"""The model a run starts from: a fresh ViT from its settings, or weights to fine-tune (a timm
name or file, a Google .npz, or one of our own runs, whose weights say what they are).

Used by train.py; torch is imported only inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def pretrained_run(src: str) -> dict | None:
    """Our own weights as the starting point: a run folder (an ensemble's: its first model), or a
    .safetensors file that says what it is (its run's config.json beside it, or the description
    train.py writes into the file). Returns {model, labels, preprocessing, weights} or None for
    timm names and other files."""
    import json

    from safetensors import safe_open

    from vit.run import RunDir

    path = Path(src).expanduser()
    if path.is_dir():
        run = RunDir(path)
        run.require_trained()
        return {**run.config(), "weights": run / RunDir.WEIGHTS}
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    if (path.parent / RunDir.CONFIG).is_file():
        cfg = RunDir(path.parent).config()
        if {"model", "labels", "preprocessing"} <= set(cfg):
            return {**cfg, "weights": path}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if {"vit_config", "labels", "preprocessing"} <= set(meta):
        parts = {k: json.loads(meta[k]) for k in ("labels", "preprocessing")}
        return dict(model=json.loads(meta["vit_config"]), weights=path, **parts)
    return None


def pretrained_preprocessing(src: str, log=print) -> tuple[dict, object]:
    """(preprocessing the pretrained weights expect, a timm module already created or None)."""
    from vit.convert import CHECKPOINT_SUFFIXES, create_pretrained_timm, timm_preprocessing

    ours = pretrained_run(src)
    if ours is not None:
        p = ours["preprocessing"]
        size = p["image_size"]
        return dict(p, image_size=size[0] if size[0] == size[1] else list(size)), None
    if Path(src).suffix in CHECKPOINT_SUFFIXES or Path(src).exists():
        google = Path(src).suffix == ".npz"
        mean, std = ([0.5] * 3, [0.5] * 3) if google else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        log(f"note: {src} carries no preprocessing; using mean {mean} std {std} (override with --mean/--std)")
        return dict(mean=mean, std=std, interpolation="bicubic", crop_pct=0.875, image_size=224), None
    module = create_pretrained_timm(src)
    prep = timm_preprocessing(module)
    prep["image_size"] = module.patch_embed.img_size[0]
    return prep, module


def build_model(cfg, classes: list[str], timm_module=None):
    """A fresh ViT, or pretrained weights at the run's input size with a head for its classes.

    From our own weights the architecture is read from what they say about themselves, never
    guessed, and the head is kept when the classes are the same ones in the same order."""
    from safetensors.torch import load_file

    from vit import ViT, ViTConfig
    from vit.convert import from_timm

    fields = dict(dropout=cfg.dropout, drop_path=cfg.drop_path, mirror_average=bool(cfg.mirror_average))
    size = cfg.image_size
    if cfg.pretrained:
        ours = pretrained_run(cfg.pretrained)
        if ours is None:
            return from_timm(timm_module or cfg.pretrained, num_classes=len(classes), image_size=size, **fields)
        model = ViT(replace(ViTConfig.from_dict(ours["model"]), **fields))
        model.load_state_dict(load_file(str(ours["weights"])))
        if tuple(model.config.image_size) != ((size, size) if isinstance(size, int) else tuple(size)):
            model.set_image_size(size)
        if ours["labels"] != classes:
            model.reset_head(len(classes))
        return model
    for k in ("dim", "depth", "heads", "mlp_dim", "patch_size", "image_size"):
        if getattr(cfg, k) is None:
            raise ValueError(f"missing model setting {k}")
    pool = cfg.pool or "token"
    return ViT(
        ViTConfig(
            image_size=size,
            patch_size=cfg.patch_size,
            num_classes=len(classes),
            dim=cfg.dim,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_dim,
            stem=cfg.stem or "patch",
            stem_depth=cfg.stem_depth or 1,
            # Average pooling goes with no class token and a LayerNorm after pooling (timm's layout).
            pool=pool,
            class_token=pool == "token",
            fc_norm=pool == "avg",
            **fields,
        )
    )
