"""Every setting of a training run, typed, in one place: what it means, its flag, its default.

    recipe (a partial config chosen from the data) -> flags the user gave -> TrainConfig

``train.py``'s command line is generated from these fields (``add_flags``), so a setting
is added once, here. A field whose default is None is chosen by the recipe; ``resume``
says whether ``--resume`` may change it ("fixed": it defines the run, "free": it only says
how to run it). The resolved config is saved in ``config.json``; what the run decides as it
goes (the time budget's length and EMA decay) lives in the trainer's checkpointed state.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields


def setting(help: str, default=None, choices: tuple[str, ...] | None = None, group: str = "settings", **meta):
    """A config field with what its command-line flag needs."""
    return field(default=default, metadata=dict(help=help, choices=choices, group=group, flag=True, **meta))


def derived(default=None):
    """A field the run fills in itself (no flag)."""
    return field(default=default, metadata=dict(flag=False))


@dataclass(frozen=True)
class TrainConfig:
    # ----- architecture (the recipe picks; pretrained weights fix it) -------------------
    model: str | None = setting("named variant such as Ti/16, S/16, B/16 (sets width, depth, heads, patch)")
    image_size: int | None = setting("input height and width in pixels")
    patch_size: int | None = setting("patch size P")
    dim: int | None = setting("token width D")
    depth: int | None = setting("number of encoder blocks")
    heads: int | None = setting("attention heads")
    mlp_dim: int | None = setting("MLP hidden width")
    pool: str | None = setting("token (class token, the paper) or avg (mean of patch tokens)", choices=("token", "avg"))
    stem: str | None = setting(
        "patch (the paper's linear patch embedding) or conv (a small CNN stem, Xiao et al. 2021)",
        choices=("patch", "conv"),
    )
    stem_depth: int | None = setting(
        "3x3 convolutions per stage of the conv stem: 1, one stride-2 convolution (Xiao et al.); 2, the recipe's, adds "
        "a stride-1 one after each (learns faster from scratch, see the README)"
    )
    # ----- schedule -------------------------------------------------------------------------
    epochs: int | None = setting(
        "epochs; given without --time-budget, it turns the time budget off; with it, the most epochs the budget may fit"
    )
    time_budget: float | None = setting(
        "minutes: fit the number of epochs to this wall-clock budget (0: off; from scratch on a CPU the default is "
        "8, and the recipe's grid, SAM and mixup follow it)"
    )
    batch_size: int | None = setting("images per optimizer step per process (before accumulation)")
    lr: float | None = setting("peak learning rate")
    min_lr_ratio: float | None = setting("final learning rate as a fraction of the peak")
    weight_decay: float | None = setting("AdamW weight decay")
    warmup_epochs: int | None = setting("linear warmup epochs")
    label_smoothing: float | None = setting("label smoothing")
    # ----- augmentation and regularisation ----------------------------------------------------
    augment: str | None = setting(
        "trivial (TrivialAugment), randaugment, affine (a small rotation, shift and scale: for glyphs) or none",
        choices=("trivial", "randaugment", "affine", "none"),
    )
    scale_min: float | None = setting("smallest area fraction of the random resized crop")
    hflip: float | None = setting("horizontal flip probability (0 for text, digits, arrows ...)")
    mixup: float | None = setting(
        "mixup alpha (0: off); training from scratch, the recipe sets 0.8 for fewer than 500 glyph-sized training "
        "images with no time "
        "budget or one of 8 minutes or more (+0.7 to +0.8 points at 10 and 20 digits a class; see the README)"
    )
    cutmix: float | None = setting("cutmix alpha (0: off)")
    erase: float | None = setting("random erasing probability")
    drop_path: float | None = setting("stochastic depth rate of the last block")
    dropout: float | None = setting("dropout after the position embedding and dense layers")
    clip_grad: float | None = setting("gradient norm clipping (0: off)")
    sam: float | None = setting(
        "sharpness-aware minimisation radius rho (0: off; Foret et al. 2021): each step takes its gradient at "
        "weights moved rho along the first gradient, so a step costs about two; the recipe sets 0.1 for 1,000-4,999 "
        "glyph-sized training images in a CPU budget of 5 minutes or more (+0.82 on the digits in 10; see the README)"
    )
    ema: bool | None = setting("keep an exponential moving average of the weights")
    ema_decay: float | None = setting("decay of the weights' EMA (default: from the run's length)")
    layer_decay: float | None = setting("layer-wise LR decay for fine-tuning (1: off)")
    mirror_average: bool | None = setting(
        "predict from the image and its mirror, logits averaged (default: when trained with --hflip)"
    )
    members: int | None = setting(
        "models averaged into the run's one model (their logits), each trained from its own seed on the same split; "
        "1: one. Given, they share the time budget (the first an N-th of it, the next ones what is left). Default, "
        "from scratch: a second one when the recipe's whole schedule ended with more time left in the budget than 1.1 "
        "times what it took (tiny data; see the README); each member "
        "costs one more forward pass"
    )
    # ----- preprocessing --------------------------------------------------------------------
    interpolation: str | None = setting("resize interpolation", choices=("bicubic", "bilinear", "nearest", "lanczos"))
    crop_pct: float | None = setting("evaluation centre crop fraction")
    mean: list[float] | None = setting("normalisation mean (RGB)", nargs=3)
    std: list[float] | None = setting("normalisation std (RGB)", nargs=3)
    # ----- the run -------------------------------------------------------------------------
    seed: int = setting("seed for the split, the weights and the data order", 0, group="run")
    val_fraction: float = setting("share of each class held out for validation", 0.15, group="run")
    grad_accum: int = setting("micro-batches per optimizer step", 1, group="run")
    precision: str = setting(
        "auto: bf16 autocast on GPUs that support it, fp32 otherwise", "auto", ("auto", "fp32", "bf16"), group="run"
    )
    compile: bool = setting("torch.compile the model", False, group="run")
    workers: int | None = setting("data loader processes (default: from the CPUs)", group="run", resume="free")
    # ----- filled in by the run ---------------------------------------------------------------
    device: str = derived("cpu")
    pretrained: str | None = derived()
    data: str | None = derived()  # the data folder, resolved
    ema_decay_auto: bool = derived(False)  # the EMA's horizon follows the run's length
    epochs_fitted: int | None = derived()  # the length the time budget chose
    epochs_note: str | None = derived()  # why the epochs cap a budgeted run is what it is, when the recipe chose it
    time_budget_note: str | None = derived()  # why the budget is off, when it is
    hflip_note: str | None = derived()  # what the mirror check found (vit.recipe.MirrorCheck)
    mixup_note: str | None = derived()  # why the recipe turned mixup on or off, for tiny glyph-sized data

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, saved: bool = False) -> TrainConfig:
        """``saved``: a config.json of an earlier version may hold fields no longer used; they are
        ignored. Otherwise (a recipe, say) an unknown field is a mistake, and an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown and not saved:
            raise ValueError(f"unknown training settings: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> TrainConfig:
        """Refuse values no run can use, naming the flag; None (the recipe picks) always passes."""
        rules = {
            "positive": ("image_size", "patch_size", "stem_depth", "dim", "depth", "heads", "mlp_dim", "epochs",
                         "batch_size", "grad_accum", "lr", "members"),
            "a share in (0, 1)": ("val_fraction",),
            "a probability in [0, 1]": ("hflip", "erase"),
            "in (0, 1]": ("scale_min", "crop_pct", "min_lr_ratio"),
            "in [0, 1)": ("label_smoothing", "dropout", "drop_path", "ema_decay"),
            "0 or more": ("time_budget", "weight_decay", "warmup_epochs", "mixup", "cutmix", "clip_grad", "sam",
                          "workers"),
        }  # fmt: skip
        ok = {
            "positive": lambda v: 0 < v < math.inf,
            "a share in (0, 1)": lambda v: 0 < v < 1,
            "a probability in [0, 1]": lambda v: 0 <= v <= 1,
            "in (0, 1]": lambda v: 0 < v <= 1,
            "in [0, 1)": lambda v: 0 <= v < 1,
            "0 or more": lambda v: 0 <= v < math.inf,  # inf (like nan) is no number a run can use
        }
        bad = [
            f"--{name.replace('_', '-')} {getattr(self, name)} (must be {rule})"
            for rule, names in rules.items()
            for name in names
            if getattr(self, name) is not None and not ok[rule](getattr(self, name))
        ]
        if (self.stem_depth or 1) > 1 and self.stem not in (None, "conv"):  # None: the recipe's, a conv stem
            bad.append(f"--stem-depth {self.stem_depth} (the patch stem has no depth: give it with --stem conv)")
        if bad:
            raise ValueError("settings no run can use: " + ", ".join(bad))
        return self

    def shown(self) -> str:
        """The settings, one line, as printed at the start of a run."""
        hidden = {
            "data",
            "time_budget_note",
            "hflip_note",
            "ema_decay_auto",
            "epochs_fitted",
            "epochs_note",
            "mixup_note",
            "model",
        }
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        if self.time_budget:  # the budget fits the length, and the EMA follows it
            shown["epochs"] = f"fitted to the budget (at most {self.epochs})"
            if self.ema_decay_auto:
                shown["ema_decay"] = "auto (follows the fitted length)"
        return ", ".join(f"{k}={v}" for k, v in shown.items())


ARCHITECTURE = ("model", "dim", "depth", "heads", "mlp_dim", "patch_size", "stem", "stem_depth", "pool")


def flag_fields() -> list:
    return [f for f in fields(TrainConfig) if f.metadata.get("flag")]


def _base_type(annotation) -> type:
    """``int | None`` -> int, ``list[float] | None`` -> float (with nargs), ``bool`` -> bool."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    t = args[0] if isinstance(annotation, types.UnionType) and args else annotation
    return typing.get_args(t)[0] if typing.get_origin(t) is list else t


def add_flags(parser: argparse.ArgumentParser, groups: dict[str, str]) -> None:
    """One flag per config field, in argument groups titled ``groups[field group]``. Every flag
    defaults to None, meaning "not given", so given flags can be told from defaults."""
    hints = typing.get_type_hints(TrainConfig)
    made = {key: parser.add_argument_group(title) for key, title in groups.items()}
    for f in flag_fields():
        m, typ = f.metadata, _base_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        default = f" (default {f.default})" if f.default is not None and f.default is not False else ""
        kwargs = dict(dest=f.name, default=None, help=m["help"] + default)
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=typ, choices=m["choices"], nargs=m.get("nargs"))
        made[m["group"]].add_argument(name, **kwargs)


def given(args: argparse.Namespace) -> dict:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in flag_fields() if getattr(args, f.name) is not None}


def changed_on_resume(saved: TrainConfig, flags: dict) -> list[str]:
    """Given flags that would change a run's fixed settings, as "--flag VALUE (the run has X)"."""
    out = []
    for f in flag_fields():
        if f.name not in flags or f.metadata.get("resume") == "free":
            continue
        value, old = flags[f.name], getattr(saved, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model":
            out.append(f"{flag} (a run's architecture is fixed)")
            continue
        if (f.name == "time_budget" and value == 0) or (f.name == "layer_decay" and value == 1):
            value = None  # the off values the run stores as None
        if f.name == "stem_depth" and old is None and saved.stem == "conv":
            old = 1  # a conv-stem run from before the setting: depth 1
        same = [float(v) for v in value] == [float(v) for v in old or []] if f.name in ("mean", "std") else value == old
        if not same:
            out.append(f"{flag} {value} (the run has {old})")
    return out
