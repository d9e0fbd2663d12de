"""A Vision Transformer written from the paper, weight-compatible with timm.

>>> from vit import ViT, ViTConfig
>>> model = ViT(ViTConfig.preset("S/16", num_classes=10))

The model is imported on first use, so that the torch-free parts (``vit.imageio``,
``vit.runtime``) can be used where torch is not installed.
"""

__all__ = ["PRESETS", "ViT", "ViTConfig", "resample_pos_embed"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from vit import model

        return getattr(model, name)
    raise AttributeError(f"module 'vit' has no attribute {name!r}")
