"""Weights in and out of our ViT: timm modules, timm checkpoints, Google ``.npz`` files.

Our parameter names are timm's names (``patch_embed.proj``, ``blocks.{i}.attn.qkv`` ...),
so a timm state dict maps onto ours key for key; what this module adds is the checking:
every key and every shape is compared before anything is copied, and a mismatch lists
what is missing on each side. Google's ``.npz`` layout (the paper's released weights) is
mapped explicitly, in both directions.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vit.model import ViT, ViTConfig

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # read with torch.load(weights_only=True)
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".npz")  # every weights file we read

# --------------------------------------------------------------------------------------
# Checked loading
# --------------------------------------------------------------------------------------


def load_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state_dict`` into ``model`` only if every key and shape matches.

    Raises ValueError naming the missing keys, the unexpected keys and the shape
    mismatches, so a wrong variant or a foreign checkpoint is obvious at a glance.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: {source} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit this ViT:"]
        if missing:
            lines.append(f"  missing in {source} ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"  unexpected in {source} ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:20]))
        lines.append("  Check the model variant (width, depth, patch size, image size, classes).")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def _patch_stem_only(config: ViTConfig, target: str) -> None:
    if config.stem != "patch":
        raise ValueError(
            f"{target} has no counterpart of the conv stem (stem={config.stem!r}); only stem='patch' converts"
        )


def to_timm_state_dict(model: ViT) -> dict[str, torch.Tensor]:
    """A state dict that timm's ``VisionTransformer`` of the same config loads strictly."""
    _patch_stem_only(model.config, "timm")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def timm_kwargs(config: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer``."""
    _patch_stem_only(config, "timm")
    return dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.dim,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_dim / config.dim,
        qkv_bias=config.qkv_bias,
        class_token=config.class_token,
        global_pool=config.pool,
        fc_norm=config.fc_norm,
        pos_drop_rate=config.dropout,
        proj_drop_rate=config.dropout,
        drop_rate=config.dropout,
        attn_drop_rate=config.attn_dropout,
        drop_path_rate=config.drop_path,
    )


# --------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------


def config_from_timm_module(m: nn.Module) -> dict[str, Any]:
    """Our config fields read off a timm ``VisionTransformer``; refuses what we don't model."""
    if type(m).__name__ != "VisionTransformer" or not hasattr(m, "blocks"):
        raise ValueError(f"expected a timm VisionTransformer, got {type(m).__name__}")
    b0 = m.blocks[0]
    unsupported = {
        "register tokens": getattr(m, "num_reg_tokens", 0) > 0,
        "no_embed_class": getattr(m, "no_embed_class", False),
        "dynamic_img_size": getattr(m, "dynamic_img_size", False),
        "layer scale": not isinstance(b0.ls1, nn.Identity),
        "qk_norm": not isinstance(b0.attn.q_norm, nn.Identity),
        "pre-norm (norm_pre)": not isinstance(m.norm_pre, nn.Identity),
        "attention pooling": getattr(m, "attn_pool", None) is not None,
        "patch embedding norm": not isinstance(m.patch_embed.norm, nn.Identity),
        "MLP norm": not isinstance(getattr(b0.mlp, "norm", nn.Identity()), nn.Identity),
        "non-GELU activation": getattr(b0.mlp.act, "approximate", None) != "none",
        "non-square patches": m.patch_embed.patch_size[0] != m.patch_embed.patch_size[1],
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(f"this timm model uses features the paper's ViT does not have: {', '.join(found)}")
    if m.global_pool not in ("token", "avg"):
        raise ValueError(f"timm global_pool={m.global_pool!r} is not supported (use 'token' or 'avg')")
    return dict(
        image_size=tuple(m.patch_embed.img_size),
        patch_size=m.patch_embed.patch_size[0],
        in_chans=m.patch_embed.proj.in_channels,
        num_classes=m.num_classes,
        dim=m.embed_dim,
        depth=len(m.blocks),
        heads=b0.attn.num_heads,
        mlp_dim=b0.mlp.fc1.out_features,
        qkv_bias=b0.attn.qkv.bias is not None,
        class_token=m.cls_token is not None,
        pool=m.global_pool,
        fc_norm=isinstance(m.fc_norm, nn.LayerNorm),
        ln_eps=b0.norm1.eps,
    )


def config_from_state_dict(sd: dict[str, torch.Tensor], heads: int | None = None) -> dict[str, Any]:
    """Architecture fields inferred from a timm-layout state dict's keys and shapes.

    Heads leave no trace in the shapes; every published ViT uses a head dim of 64, so
    ``dim // 64`` is assumed unless ``heads`` is given.
    """
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        keys = ", ".join(list(sd)[:8])
        raise ValueError(
            f"not a ViT checkpoint in timm layout (no patch_embed.proj.weight / pos_embed); keys: {keys} ..."
        )
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    class_token = "cls_token" in sd
    n_pos = sd["pos_embed"].shape[1] - int(class_token)
    side = int(round(n_pos**0.5))
    if side * side != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} patch positions, not a square grid: pass image_size")
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    fc_norm = "fc_norm.weight" in sd
    return dict(
        image_size=(side * patch, side * patch),
        patch_size=patch,
        in_chans=in_chans,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        dim=dim,
        depth=depth,
        heads=heads or max(1, dim // 64),
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        class_token=class_token,
        pool="avg" if (fc_norm or not class_token) else "token",
        fc_norm=fc_norm,
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` read with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif path.suffix in TORCH_SUFFIXES:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported checkpoint type {path.suffix!r}: use .safetensors, .pth, .pt, .bin or .npz")
    for key in ("model", "state_dict", "model_ema"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def from_state_dict(
    sd: dict[str, torch.Tensor],
    source: str = "checkpoint",
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    **fields,
) -> ViT:
    """Build a ViT that fits a timm-layout state dict, load it, then adapt size and head."""
    arch = config_from_state_dict(sd, heads=fields.pop("heads", None))
    return _build_and_load(arch, sd, source, num_classes, image_size, **fields)


def _build_and_load(arch, sd, source, num_classes, image_size, **fields) -> ViT:
    model = ViT(ViTConfig(**{**arch, **fields}))
    load_checked(model, sd, source)
    if image_size is not None:
        model.set_image_size(image_size)
    if num_classes is not None and num_classes != model.config.num_classes:
        model.reset_head(num_classes)
    return model


def from_timm(
    source: nn.Module | str | os.PathLike,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    **fields,
) -> ViT:
    """Our ViT with the weights of a timm model, model name or checkpoint file.

    ``source`` is a timm ``VisionTransformer``, a timm model name (pretrained weights
    are downloaded by timm, so this needs the network), or a path to a ``.safetensors``
    / ``.pth`` / ``.bin`` checkpoint (``.npz``: see ``load_npz``).

    ``num_classes`` replaces the head with a zero-initialised one when it differs;
    ``image_size`` resamples the position embedding; ``fields`` set other config fields
    (``dropout``, ``drop_path``, ``heads`` for a checkpoint file, ...).
    """
    if isinstance(source, nn.Module):
        arch = config_from_timm_module(source)
        sd = {k: v.detach().clone() for k, v in source.state_dict().items()}
        return _build_and_load(arch, sd, "timm model", num_classes, image_size, **fields)
    path = Path(source)
    if path.suffix == ".npz":
        return load_npz(path, num_classes=num_classes, image_size=image_size, **fields)
    if path.exists() or path.suffix in (".safetensors", *TORCH_SUFFIXES):
        return from_state_dict(read_state_dict(path), str(path), num_classes, image_size, **fields)
    module = create_pretrained_timm(str(source))
    return from_timm(module, num_classes=num_classes, image_size=image_size, **fields)


def create_pretrained_timm(name: str) -> nn.Module:
    """timm's pretrained model ``name``; the only place this package touches the network."""
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"{name!r} is neither a file nor a timm model name; "
            "list ViT names with: python -c \"import timm; print(timm.list_models('vit_*', pretrained=True))\""
        )
    offline = bool(os.environ.get("HF_HUB_OFFLINE"))  # the hub then serves its cache only
    advice = (
        "Pretrained weights need the network once. Connect and retry, or download the checkpoint "
        "on another machine and pass its .safetensors/.npz path instead."
    )
    if not offline and (reason := _hub_unreachable()):
        raise RuntimeError(
            f"could not download the pretrained weights of {name!r}: {reason}.\n{advice} "
            "Set HF_HUB_OFFLINE=1 to use weights already in the local Hugging Face cache."
        )
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as e:  # hub refused, not cached, bad cache: all end the same way for a user
        hint = " (HF_HUB_OFFLINE is set, and they are not in the local cache)" if offline else ""
        raise RuntimeError(
            f"could not download the pretrained weights of {name!r}{hint}: {type(e).__name__}: {e}\n{advice}"
        ) from e


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub can't be reached, or None. The hub's own client retries
    for about a minute before giving up; this answers in seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port} is unreachable ({e})"
    return None


def timm_preprocessing(module: nn.Module) -> dict[str, Any]:
    """Mean, std, interpolation and crop a timm model's pretrained weights expect."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    return dict(
        mean=list(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=list(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


# --------------------------------------------------------------------------------------
# Google .npz (the paper's released checkpoints)
# --------------------------------------------------------------------------------------
# Two layouts exist. The original (google-research/vision_transformer) names blocks
# Transformer/encoderblock_{i} with sub-modules LayerNorm_0, MultiHeadDotProductAttention_1,
# LayerNorm_2, MlpBlock_3; big_vision uses LayerNorm_0, MultiHeadDotProductAttention_0,
# LayerNorm_1, MlpBlock_0, keeps pos_embedding at the top level, and may stack ("scan")
# all blocks into one Transformer/encoderblock with a leading depth axis.

_ORIGINAL = dict(mha="MultiHeadDotProductAttention_1", ln2="LayerNorm_2", mlp="MlpBlock_3")
_BIG_VISION = dict(mha="MultiHeadDotProductAttention_0", ln2="LayerNorm_1", mlp="MlpBlock_0")


def _strip_npz_prefix(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in ("opt/target/", "params/img/", "params/"):
        if f"{prefix}embedding/kernel" in w:
            return {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
    if "embedding/kernel" not in w:
        raise ValueError("not a ViT .npz checkpoint: no embedding/kernel array")
    return w


class _Reads(dict):
    """A dict that remembers which keys were read, so arrays nobody mapped can be named."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def npz_to_state_dict(
    w: dict[str, np.ndarray], new_head: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Google arrays -> (timm-layout state dict, architecture fields).

    Every array must be mapped: one this model has no place for (an attention-pooling head,
    ...) is refused with the list, not dropped, so nothing loads approximately. The one
    exception is the paper's ``pre_logits`` layer (the ImageNet-21k checkpoints' extra Dense +
    tanh before the head) when ``new_head`` replaces the head anyway: the paper drops it for
    fine-tuning too (§3.1, Appendix B.1.1), so it is dropped with a warning."""
    w = _Reads(_strip_npz_prefix(w))
    sd, arch = _npz_arrays(w)
    unmapped = sorted(set(w) - w.read)
    dropped = [k for k in unmapped if k.startswith("pre_logits/")]
    if new_head and dropped:
        import warnings

        warnings.warn(
            f"dropped {', '.join(dropped)}: the head is replaced, as the paper does when fine-tuning", stacklevel=3
        )
        unmapped = [k for k in unmapped if k not in dropped]
    if unmapped:
        shown = ", ".join(unmapped[:12]) + (f" ... ({len(unmapped)} in all)" if len(unmapped) > 12 else "")
        raise ValueError(
            f"the .npz holds arrays this ViT has no place for: {shown}. It is another architecture "
            "(e.g. a pre-logits layer or an attention-pooling head); it is refused rather than loaded approximately"
        )
    return sd, arch


# One key map, read top to bottom like timm's _load_weights: split up, the mapping from
# Google's names to ours would no longer be seen in one place.
def _npz_arrays(w: _Reads) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    big_vision = scanned or "pos_embedding" in w
    names = _BIG_VISION if big_vision else _ORIGINAL
    if scanned:
        depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        block = lambda i, k: w[f"Transformer/encoderblock/{k}"][i]  # noqa: E731
    else:
        depth = len({int(m.group(1)) for k in w if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
        block = lambda i, k: w[f"Transformer/encoderblock_{i}/{k}"]  # noqa: E731

    kernel = w["embedding/kernel"]  # (P, P, C, D), HWIO
    sd = {
        "patch_embed.proj.weight": t(kernel.transpose(3, 2, 0, 1)),  # -> (D, C, P, P)
        "patch_embed.proj.bias": t(w["embedding/bias"]),
    }
    if "cls" in w:
        sd["cls_token"] = t(w["cls"]).reshape(1, 1, -1)
    pos = w["pos_embedding"] if "pos_embedding" in w else w["Transformer/posembed_input/pos_embedding"]
    sd["pos_embed"] = t(pos).reshape(1, -1, kernel.shape[-1])
    mha, dim = names["mha"], kernel.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = t(block(i, "LayerNorm_0/scale"))
        sd[p + "norm1.bias"] = t(block(i, "LayerNorm_0/bias"))
        # query/key/value kernels are (D, h, d): flatten heads, transpose to (h*d, D), stack as qkv.
        qkv = ("query", "key", "value")
        sd[p + "attn.qkv.weight"] = torch.cat([t(block(i, f"{mha}/{n}/kernel")).reshape(dim, -1).T for n in qkv])
        if _has(w, scanned, i, f"{mha}/query/bias"):
            sd[p + "attn.qkv.bias"] = torch.cat([t(block(i, f"{mha}/{n}/bias")).reshape(-1) for n in qkv])
        sd[p + "attn.proj.weight"] = t(block(i, f"{mha}/out/kernel")).reshape(-1, dim).T  # (h, d, D) -> (D, h*d)
        sd[p + "attn.proj.bias"] = t(block(i, f"{mha}/out/bias"))
        sd[p + "norm2.weight"] = t(block(i, f"{names['ln2']}/scale"))
        sd[p + "norm2.bias"] = t(block(i, f"{names['ln2']}/bias"))
        for r in range(2):
            sd[p + f"mlp.fc{r + 1}.weight"] = t(block(i, f"{names['mlp']}/Dense_{r}/kernel")).T
            sd[p + f"mlp.fc{r + 1}.bias"] = t(block(i, f"{names['mlp']}/Dense_{r}/bias"))
    sd["norm.weight"] = t(w["Transformer/encoder_norm/scale"])
    sd["norm.bias"] = t(w["Transformer/encoder_norm/bias"])
    if "head/kernel" in w and w["head/kernel"].shape[-1] > 0:
        sd["head.weight"] = t(w["head/kernel"]).T
        sd["head.bias"] = t(w["head/bias"])
    elif "head/bias" in w:
        w["head/bias"]  # an empty head (no classes): nothing to load, but read, not unmapped

    q = block(0, f"{mha}/query/kernel")  # (D, h, d)
    n_pos = sd["pos_embed"].shape[1] - int("cls" in w)
    side = int(round(n_pos**0.5))
    arch = dict(
        image_size=(side * kernel.shape[0], side * kernel.shape[1]),
        patch_size=kernel.shape[0],
        in_chans=kernel.shape[2],
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        dim=dim,
        depth=depth,
        heads=q.shape[1],
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        class_token="cls" in w,
        pool="token" if "cls" in w else "avg",
    )
    return sd, arch


def _has(w: dict, scanned: bool, i: int, key: str) -> bool:
    return (f"Transformer/encoderblock/{key}" if scanned else f"Transformer/encoderblock_{i}/{key}") in w


def load_npz(
    path: str | os.PathLike,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    **fields,
) -> ViT:
    """A ViT with the weights of a Google ``.npz`` checkpoint (original or big_vision layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    head = next((a.shape[-1] for k, a in arrays.items() if k.endswith("head/kernel")), 0)
    sd, arch = npz_to_state_dict(arrays, new_head=num_classes is not None and num_classes != head)
    return _build_and_load(arch, sd, str(path), num_classes, image_size, **fields)


def save_npz(model: ViT, path: str | os.PathLike) -> None:
    """Write ``model`` in the original Google layout (google-research/vision_transformer)."""
    cfg = model.config
    _patch_stem_only(cfg, "the Google layout")
    if cfg.fc_norm:
        raise ValueError("the Google layout has no post-pooling LayerNorm (fc_norm=True)")
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    D, h, d = cfg.dim, cfg.heads, cfg.dim // cfg.heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # (D, C, P, P) -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if cfg.class_token:
        w["cls"] = sd["cls_token"]
    if cfg.num_classes:
        w["head/kernel"] = sd["head.weight"].T
        w["head/bias"] = sd["head.bias"]
    m = _ORIGINAL["mha"]
    for i in range(cfg.depth):
        p, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"] = sd[p + "norm1.weight"], sd[p + "norm1.bias"]
        qkv_w = sd[p + "attn.qkv.weight"].reshape(3, h, d, D)  # (3D, D) -> 3 x (h, d, D)
        for j, n in enumerate(("query", "key", "value")):
            w[f"{b}{m}/{n}/kernel"] = qkv_w[j].transpose(2, 0, 1)  # -> (D, h, d)
            if cfg.qkv_bias:
                w[f"{b}{m}/{n}/bias"] = sd[p + "attn.qkv.bias"].reshape(3, h, d)[j]
        w[f"{b}{m}/out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(h, d, D)
        w[f"{b}{m}/out/bias"] = sd[p + "attn.proj.bias"]
        w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"] = sd[p + "norm2.weight"], sd[p + "norm2.bias"]
        for r in range(2):
            w[f"{b}MlpBlock_3/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            w[f"{b}MlpBlock_3/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **w)
    os.replace(tmp, path)
