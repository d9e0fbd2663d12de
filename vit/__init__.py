"""A Vision Transformer written from the paper, weight-compatible with timm.

>>> from vit import ViT, ViTConfig
>>> model = ViT(ViTConfig.preset("S/16", num_classes=10))
"""

from vit.model import PRESETS, ViT, ViTConfig, resample_pos_embed

__all__ = ["PRESETS", "ViT", "ViTConfig", "resample_pos_embed"]
__version__ = "0.1.0"
