"""A Vision Transformer written from the paper, weight-compatible with timm.

>>> from vit import ViT, ViTConfig
>>> model = ViT(ViTConfig.preset("S/16", num_classes=10))
>>> from vit import from_timm, from_npz  # weights from timm or from Google's .npz files

The model is imported on first use, so that the torch-free parts (``vit.imageio``,
``vit.runtime``) can be used where torch is not installed.
"""

__all__ = ["PRESETS", "ViT", "ViTConfig", "from_npz", "from_timm", "resample_pos_embed"]
__version__ = "0.1.0"

_HOME = {"from_timm": "convert", "from_npz": "convert"}  # everything else lives in vit.model


def __getattr__(name: str):
    if name in __all__:
        from importlib import import_module

        module = import_module(f"vit.{_HOME.get(name, 'model')}")
        return getattr(module, "load_npz" if name == "from_npz" else name)
    raise AttributeError(f"module 'vit' has no attribute {name!r}")
