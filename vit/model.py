"""Vision Transformer, written top-down from the paper.

"An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
Dosovitskiy et al., ICLR 2021, arXiv:2010.11929. Equation numbers refer to its §3.1.

Shape legend used in every comment below:
    B batch, C channels, H/W image height/width, P patch size, Gh/Gw patch grid,
    N tokens (patches + class token), D width, h heads, d head dim (D = h * d), K classes.

The module layout and parameter names follow timm's ``VisionTransformer`` wherever the
paper does not dictate a name, so that a reader who knows either can find their way;
``vit.convert`` maps timm, Google ``.npz`` and our state dicts onto each other key by key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    """Everything that decides the architecture. Frozen: a model never changes shape."""

    image_size: tuple[int, int] = (224, 224)  # (H, W); an int means a square image
    patch_size: int = 16  # P: the paper's "16x16 words"; smaller P = more tokens, more compute
    in_chans: int = 3  # C of the input image
    num_classes: int = 1000  # K; 0 means no head (forward returns the pooled features)
    dim: int = 768  # D: token width, constant through the encoder (Eq. 1)
    depth: int = 12  # L: number of encoder blocks (Eq. 2-3)
    heads: int = 12  # h: attention heads; head dim d = D / h (64 in every paper variant)
    mlp_dim: int = 3072  # hidden width of the block MLP (Table 1 "MLP size", 4 * D)
    qkv_bias: bool = True  # the paper's Dense layers all have biases; some variants drop them
    stem: Literal["patch", "conv"] = "patch"  # how images become tokens: see PatchEmbed, ConvStem
    stem_depth: int = 1  # 3x3 convolutions per stage of the conv stem: one stride-2, the rest stride 1
    class_token: bool = True  # prepend x_class (Eq. 1); without it pool must be "avg"
    pool: Literal["token", "avg"] = "token"  # y from z_L^0 (Eq. 4) or the mean of patch tokens
    fc_norm: bool = False  # final LayerNorm after pooling instead of before (timm's "avg" models)
    dropout: float = 0.0  # after the position embedding and every Dense but qkv (paper App. B.1)
    attn_dropout: float = 0.0  # on the attention weights
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate in the last block
    ln_eps: float = 1e-6  # LayerNorm epsilon of the JAX reference (PyTorch's default is 1e-5)
    # Not in the paper: in eval mode, forward averages the logits of the image and its left-right
    # mirror (test-time augmentation), for models trained with random flips. Off: timm's outputs.
    mirror_average: bool = False

    def __post_init__(self) -> None:
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "image_size", size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be an int or (H, W), got {self.image_size!r}")
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(
                f"image_size {size} is not divisible by patch_size {self.patch_size}: "
                "choose an image size that is a multiple of the patch size"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {self.pool!r}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"the conv stem needs a patch size that is a power of 2, got {self.patch_size}")
        if self.stem_depth < 1:
            raise ValueError(f"stem_depth must be 1 or more, got {self.stem_depth}")
        if self.stem_depth > 1 and self.stem != "conv":
            raise ValueError(f"stem_depth {self.stem_depth} needs stem='conv': the patch stem is one linear layer")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True; use pool='avg' without one")

    @property
    def grid_size(self) -> tuple[int, int]:
        """(Gh, Gw): the patch grid, H/P by W/P."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, variant: str, **overrides) -> ViTConfig:
        """A named variant such as "S/16" or "B/32", with any field overridden.

        >>> ViTConfig.preset("B/16", num_classes=10).dim
        768
        """
        try:
            name, patch = variant.split("/")
            widths = PRESETS[name]
            patch_size = int(patch)
        except (ValueError, KeyError):
            raise ValueError(
                f"unknown variant {variant!r}: use NAME/PATCH with NAME in "
                f"{sorted(PRESETS)} and PATCH in {PATCH_SIZES} (e.g. 'S/16')"
            ) from None
        return cls(patch_size=patch_size, **{**widths, **overrides})


# Width, depth, heads and MLP size of each named model.
# B, L, H: the paper's Table 1 (86M, 307M, 632M parameters at P=16).
# Ti, S: DeiT (Touvron et al. 2021, Table 1), the usual small ViTs (5.7M, 22M at P=16).
PRESETS: dict[str, dict[str, int]] = {
    "Ti": dict(dim=192, depth=12, heads=3, mlp_dim=768),
    "S": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
    "B": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
    "L": dict(dim=1024, depth=24, heads=16, mlp_dim=4096),
    "H": dict(dim=1280, depth=32, heads=16, mlp_dim=5120),
}
PATCH_SIZES = (8, 14, 16, 32)


# --------------------------------------------------------------------------------------
# Eq. 1: patch embedding  z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
# --------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Flattened P x P patches times E (Eq. 1), done as a stride-P convolution.

    A Conv2d with kernel = stride = P is exactly "split into patches, flatten, multiply by
    E in R^{(P^2 C) x D}", and it is the layout timm and the JAX code store.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H, W) -> (B, D, Gh, Gw)
        return x.flatten(2).transpose(1, 2)  # -> (B, Gh*Gw, D)


class ConvStem(nn.Module):
    """A convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better").

    Like the paper's hybrid input (§3.1), tokens come from a CNN feature map, but a small one
    trained with the transformer, not a ResNet's: log2(P) stages of 3x3 convolutions
    (BatchNorm, ReLU), widening towards D, then a 1x1 projection to D, so the token grid is
    the same H/P x W/P as with patches. Each stage is a stride-2 convolution followed by
    ``depth - 1`` stride-1 ones (depth 1: Xiao et al.'s stem, that of runs saved before the
    setting, with their layer positions; 2, the recipe's, learns faster, see the README). It
    trains faster and more stably from scratch; at depth 1 it costs a few percent of the
    encoder's compute on an 8x8 grid, 6-12% on a 4x4 one (32 px / patch 8, 64 px / patch 16),
    and depth 2 makes the exported file
    0.92-1.25x as slow as depth 1. Pretrained ViT weights use ``PatchEmbed``; this stem is
    for training from scratch.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int, depth: int = 1):
        super().__init__()
        stages = patch_size.bit_length() - 1  # log2(P)
        layers, c_in = [], in_chans
        for i in range(stages):
            c_out = max(16, dim >> (stages - i))  # D/2^k, ..., D/2
            # One stride-2 convolution per stage halves the grid; depth - 1 more at stride 1 look
            # again at each scale, more like the paper's ResNet hybrid (depth 1: Xiao et al.'s stem).
            for stride in [2] + [1] * (depth - 1):
                layers += [
                    nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.stem(x))  # (B, C, H, W) -> (B, D, Gh, Gw)
        return x.flatten(2).transpose(1, 2)  # -> (B, Gh*Gw, D)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """2-D interpolation of learned position embeddings to another grid (paper §3.2).

    pos_embed: (1, prefix + Gh*Gw, D) -> (1, prefix + new_Gh*new_Gw, D). The class token's
    embedding is kept as is; the patch embeddings are treated as a (D, Gh, Gw) image and
    resized bicubically with antialiasing, the same resampling timm uses, so pretrained
    weights fine-tuned at another resolution match timm's to float precision.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patch positions are not a square grid: pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold {n} positions")
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    orig_dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    # (1, Gh*Gw, D) -> (1, D, Gh, Gw): an image with D channels
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(orig_dtype)  # -> (1, Gh'*Gw', D)
    return torch.cat([prefix, grid], dim=1)


def sincos_pos_embed(grid: tuple[int, int], dim: int, num_prefix_tokens: int) -> torch.Tensor:
    """2-D sin-cos position table (1, prefix + Gh*Gw, D): a quarter of the channels each for
    sin and cos of the column and of the row, at geometric frequencies; prefix rows are 0."""
    if dim % 4:
        return torch.randn(1, num_prefix_tokens + grid[0] * grid[1], dim) * 0.02
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / max(dim // 4 - 1, 1))  # (D/4,)
    r = rows.flatten()[:, None].float() * omega  # (Gh*Gw, D/4)
    c = cols.flatten()[:, None].float() * omega
    table = torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1)  # (Gh*Gw, D)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), table])[None]


# --------------------------------------------------------------------------------------
# Eq. 2: multi-head self-attention  z'_l = MSA(LN(z_{l-1})) + z_{l-1}
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention (paper App. A, Eq. 5-8).

    Two paths give the same result: ``fused=True`` calls PyTorch's
    ``scaled_dot_product_attention`` (flash / memory-efficient kernels); the explicit path
    writes softmax(q k^T / sqrt(d)) v out and can return the attention weights A, which the
    attention map of the app is built from.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool, attn_dropout: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5  # 1 / sqrt(d), Eq. 6
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # U_qkv, Eq. 5, all heads at once
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)  # U_msa, Eq. 8
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int | None = None,
        fused: bool = True,
        return_attn: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) -> (B, Nq, D), and A: (B, h, Nq, N) when return_attn.

        ``num_queries`` keeps only the first Nq tokens as queries (all N are still keys and
        values). The last block of a class-token model needs only the class token's row,
        which saves most of that block's compute and gives the same logits.
        """
        B, N, D = x.shape
        h, d = self.heads, self.head_dim
        if num_queries is None or num_queries >= N:
            qkv = self.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, N, 3D) -> 3 x (B, h, N, d)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :num_queries], w[:D], None if b is None else b[:D])
            q = q.reshape(B, num_queries, h, d).transpose(1, 2)  # (B, Nq, D) -> (B, h, Nq, d)
            kv = F.linear(x, w[D:], None if b is None else b[D:])
            k, v = kv.reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, N, d)

        attn = None
        if fused and not return_attn:
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, Nq, N), Eq. 6
            attn = attn.softmax(dim=-1)
            out = self.attn_drop(attn) @ v  # (B, h, Nq, d), Eq. 7
        out = out.transpose(1, 2).reshape(B, -1, D)  # heads side by side: (B, Nq, h*d)
        out = self.proj_drop(self.proj(out))  # Eq. 8
        return out, (attn if return_attn else None)


# --------------------------------------------------------------------------------------
# Eq. 3: MLP  z_l = MLP(LN(z'_l)) + z'_l
# --------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Two Dense layers with a GELU between them (§3.1, "two layers with a GELU")."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as in the JAX reference and timm
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))  # (B, N, D)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop a sample's whole residual branch.

    Kept branches are scaled by 1 / (1 - rate) so the expected output is unchanged.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask / keep


class Block(nn.Module):
    """One pre-norm encoder block: Eq. 2 then Eq. 3, each with a residual connection."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, cfg.dropout)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int | None = None,
        fused: bool = True,
        return_attn: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) -> (B, Nq, D); see ``Attention`` for ``num_queries``."""
        a, attn = self.attn(self.norm1(x), num_queries, fused, return_attn)
        x = x[:, : a.shape[1]] + drop_path(a, self.drop_path_rate, self.training)  # Eq. 2
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)  # Eq. 3
        return x, attn


# --------------------------------------------------------------------------------------
# Eq. 4 and the whole model:  y = LN(z_L^0), logits = y W_head
# --------------------------------------------------------------------------------------


def with_mirrors(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (2B, C, H, W): the images, then their left-right mirrors (``mirror_average``)."""
    return torch.cat([images, images.flip(-1)])


def mean_of_views(t: torch.Tensor) -> torch.Tensor:
    """(2B, ...) from ``with_mirrors`` -> (B, ...): each image's result averaged with its mirror's."""
    return t.unflatten(0, (2, -1)).mean(0)


class ViT(nn.Module):
    """The Vision Transformer: Eq. 1 -> L x (Eq. 2, Eq. 3) -> Eq. 4 -> linear head.

    >>> model = ViT(ViTConfig.preset("Ti/16", num_classes=10))
    >>> model(torch.randn(2, 3, 224, 224)).shape
    torch.Size([2, 10])
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.patch_size, cfg.in_chans, cfg.dim, cfg.stem_depth)
        else:
            self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        # x_class and E_pos of Eq. 1; E_pos covers the class token too, as in the paper.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        # Stochastic depth rises linearly from 0 in the first block to drop_path in the last.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        # Eq. 4's LayerNorm; models that average patch tokens may apply it after pooling.
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.fc_norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps) if cfg.fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch initialisation, after timm's ``init_weights`` and the paper's JAX code.

        Dense kernels: truncated normal std .02 (timm's choice) with zero biases; patch
        embedding: LeCun normal (as timm's "jax" mode); class token: zeros; head: zeros, so an untrained model predicts
        uniform probabilities (first loss = ln K). The position embedding is still learned,
        as in the paper, but starts as the 2-D sin-cos table of "Better plain ViT baselines"
        (Beyer et al. 2022) instead of noise of std .02: position is then visible from the
        first step, which on small datasets we measured to learn markedly faster.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Conv2d) and m is not self.patch_embed.proj:  # conv stem: He init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        w = self.patch_embed.proj.weight  # (D, C, P, P); fan_in = C*P*P
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()) / 0.87962566103423978)
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.pos_embed.copy_(sincos_pos_embed(self.config.grid_size, self.config.dim, self.config.num_prefix_tokens))
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: images (B, C, H, W) -> tokens z_0 (B, N, D)."""
        H, W = images.shape[-2:]
        if (H, W) != self.config.image_size:
            raise ValueError(
                f"input is {H}x{W} but the model was built for {self.config.image_size[0]}x"
                f"{self.config.image_size[1]}: resize the images, or call "
                f"model.set_image_size(({H}, {W})) to resample the position embeddings"
            )
        x = self.patch_embed(images)  # (B, Gh*Gw, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_pooled(
        self, images: torch.Tensor, fused: bool = True, return_attn: bool = False, taps: list | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eq. 1-4 up to pooling: (B, D), before a LayerNorm that follows pooling (fc_norm), plus
        attention weights per block. ``taps``, if given, receives the patch embedding's tokens
        z_0 averaged, then every block's output pooled as the last is, (B, D) each, depth + 1 in
        all (the out-of-distribution score reads them; see export.ood).

        With class-token pooling only the class token's row of the last block reaches y, so
        that block computes just that one query (keys and values still use every token).
        """
        x = self.embed(images)
        if taps is not None:  # z_0's class token is the same for every image: the patches alone
            taps.append(x[:, self.config.num_prefix_tokens :].mean(1))
        attns = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            nq = 1 if (i == last and self.config.pool == "token") else None
            x, attn = block(x, num_queries=nq, fused=fused, return_attn=return_attn)
            if attn is not None:
                attns.append(attn)
            if taps is not None:
                taps.append(x[:, 0] if self.config.pool == "token" else x[:, self.config.num_prefix_tokens :].mean(1))
        x = self.norm(x)
        if self.config.pool == "token":
            y = x[:, 0]  # z_L^0, Eq. 4
        else:
            y = x[:, self.config.num_prefix_tokens :].mean(dim=1)  # mean over patch tokens
        return y, attns

    def forward_features(
        self, images: torch.Tensor, fused: bool = True, return_attn: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The representation y the head reads (B, D), plus attention weights per block."""
        y, attns = self.forward_pooled(images, fused, return_attn)
        return self.fc_norm(y), attns

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, K); with ``mirror_average``, in eval mode, the mean
        of the logits of each image and its mirror (one batch of 2B through the encoder)."""
        mirrored = self.config.mirror_average and not self.training
        y, _ = self.forward_features(with_mirrors(images) if mirrored else images)
        logits = self.head(self.head_drop(y))
        return mean_of_views(logits) if mirrored else logits

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, K) and each block's attention weights through the explicit path, for the
        image as given (never averaged with its mirror: ``export.Exportable`` does that).

        Every block but a class-token model's last gives (B, h, N, N); that last one gives
        only the class token's row, (B, h, 1, N), which is all attention rollout needs.
        """
        y, attns = self.forward_features(images, fused=False, return_attn=True)
        return self.head(self.head_drop(y)), attns

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Adapt to another input size by resampling E_pos (paper §3.2); weights kept."""
        new = replace(self.config, image_size=image_size)
        with torch.no_grad():
            pe = resample_pos_embed(
                self.pos_embed.data, new.grid_size, self.config.grid_size, self.config.num_prefix_tokens
            )
        self.pos_embed = nn.Parameter(pe)
        self.config = new

    def reset_head(self, num_classes: int) -> None:
        """A new zero-initialised head for K classes (fine-tuning, paper §3.2)."""
        self.config = replace(self.config, num_classes=num_classes)
        self.head = nn.Linear(self.config.dim, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Ensemble(nn.Module):
    """Several ViTs of one architecture, trained on the same images from other seeds, whose
    logits are averaged: a deep ensemble (Lakshminarayanan et al. 2017). ``train.py`` trains a
    second member where a time budget outlasts the recipe's whole schedule (see the README's
    tiny-data section); it costs one forward pass per member.
    """

    def __init__(self, members: list[ViT]):
        super().__init__()
        if not members or len({m.config for m in members}) != 1:
            raise ValueError("an ensemble needs one or more members of one configuration")
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> ViTConfig:
        return self.members[0].config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> the members' mean logits (B, K), each as ``ViT.forward`` gives them."""
        return torch.stack([m(images) for m in self.members]).mean(0)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def members_of(model: nn.Module) -> list[ViT]:
    """An ensemble's members, or ``[model]``."""
    return list(model.members) if isinstance(model, Ensemble) else [model]
