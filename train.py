"""Train or fine-tune a ViT on a folder of images, one sub-folder per class.

    python train.py --data PATH --out RUN_DIR                 # from scratch, recipe from the data
    python train.py --data PATH --out RUN_DIR --pretrained vit_small_patch16_224.augreg_in21k
    python train.py --resume RUN_DIR                          # continue a stopped run
    python train.py --eval RUN_DIR --data OTHER_PATH          # the same report on another folder
    python train.py --eval MODEL.onnx --data OTHER_PATH       # ... for an exported file, as the app runs it
    torchrun --nproc_per_node 4 train.py --data PATH --out RUN_DIR   # several GPUs (or CPUs)

RUN_DIR receives model.safetensors (the kept weights), config.json (model, labels in class
order, preprocessing, resolved settings, result), metrics.csv, split.json, skipped.json,
checkpoint.pt (resumable) and the report (report.md and PNGs; test/report.md for a
held-out test/ folder). Settings are vit.config.TrainConfig's fields.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

STOPPED_EARLY = (
    "holds a run that stopped before its first checkpoint, so there is nothing to resume: delete that folder "
    "and start again, or pick another --out"
)


def build_parser() -> argparse.ArgumentParser:
    from vit.config import add_flags

    p = argparse.ArgumentParser(
        prog="python train.py",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io_ = p.add_argument_group("what to do")
    io_.add_argument(
        "--data",
        type=Path,
        help="image folder: ROOT/<class>/*, or ROOT/train/<class>/* with val/ and test/ beside it",
    )
    io_.add_argument("--out", type=Path, help="run folder to create")
    io_.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    io_.add_argument(
        "--eval",
        type=Path,
        metavar="RUN_DIR|MODEL.onnx",
        help="evaluate a run's model, or an exported ONNX file (int8 too), on --data",
    )
    io_.add_argument(
        "--pretrained",
        metavar="NAME|PATH",
        help="timm model name (downloads once), a run folder of ours, or a .safetensors/.pth/.npz file to fine-tune",
    )
    add_flags(p, {"settings": "settings (default: chosen from the data and printed)", "run": "run"})
    run = p.add_argument_group("machine and data")
    run.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: a CUDA GPU if there is one"
    )
    run.add_argument("--strict", action="store_true", help="stop on unusable files instead of skipping them")
    run.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit per image, up or down")
    run.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep decoded images in memory (default: when they fit in 4 GiB)",
    )
    return p


def log(msg: str = "") -> None:
    print(msg, flush=True)


def describe_scan(scan, split) -> None:
    from vit.data import class_table

    table, warn = class_table(scan.classes, split.train + split.val)
    test = f" / {len(split.test)} test" if split.test else ""
    log(f"Dataset {scan.root} ({scan.layout})")
    log(f"{len(scan.classes)} classes, {len(split.train)} train / {len(split.val)} validation{test} images")
    log(table)
    if warn:
        log(f"warning: {warn}")
    for n in split.notes:
        log(f"note: {n}")
    for title, rows in (("used anyway", scan.notes), ("skipped", scan.skipped)):
        if rows:
            log(f"{title}: {len(rows)} files{':' if title == 'skipped' else ' (noted):'}")
            for rel, why in rows[:25]:
                log(f"  {rel}: {why}")
            if len(rows) > 25:
                log(f"  ... and {len(rows) - 25} more (all listed in RUN_DIR/skipped.json)")


# --------------------------------------------------------------------------------------
# Settings: recipe defaults, then flags; on resume, the run's own
# --------------------------------------------------------------------------------------


def resolve(args, scan, train_items: list, device: str, preprocessing: dict | None, world: int):
    """Recipe defaults from the data (a partial config), then every flag the user gave on top."""
    from vit import recipe
    from vit.config import TrainConfig, given
    from vit.cpus import usable_cpus
    from vit.engine import ema_decay_for
    from vit.model import ViTConfig

    n_train = len(train_items)
    flags = given(args)
    # an explicit --epochs without --time-budget is a request for that many epochs: the recipe
    # is the one for a run without a budget (no SAM, which is for long budgets)
    epochs_only = "epochs" in flags and "time_budget" not in flags
    recipe_budget = 0 if epochs_only else args.time_budget  # what the scratch recipe's rules are given
    shared = None  # given members share the whole budget; the recipe is the one for a share of it
    if (args.members or 1) > 1 and recipe_budget != 0 and not args.pretrained:
        shared = recipe_budget if recipe_budget is not None else recipe.default_budget(device)
        recipe_budget = shared / args.members if shared else recipe_budget
    if args.pretrained:
        partial = recipe.finetune_recipe(n_train, preprocessing)
    else:
        partial = recipe.scratch_recipe(n_train, scan.native_side(), device, recipe_budget)
    if args.model:
        preset = ViTConfig.preset(args.model)  # one parser of "S/16" for the whole project
        partial.update({k: getattr(preset, k) for k in ("dim", "depth", "heads", "mlp_dim", "patch_size")})
    chosen_size = "image_size" in flags and flags["image_size"] != partial.get("image_size")
    if chosen_size and "patch_size" not in flags and not args.pretrained and not args.model:
        size = flags["image_size"]  # the patch follows the size chosen, not the images' own
        budget = partial.get("time_budget")
        patch = partial["patch_size"] = recipe.patch_for(size, device, budget)
        ideal_size, ideal = recipe.input_size_for(size, device, budget, n_train)  # the recipe's for images this size
        refused = patch < 2 and flags.get("stem", partial["stem"]) == "conv"
        if patch < ideal or refused:

            def whole(n: int) -> bool:  # size n takes the recipe's own patch for it
                return recipe.patch_for(n, device, budget) == recipe.input_size_for(n, device, budget, n_train)[1]

            near = min((n for n in range(8, 2 * size + 9) if whole(n)), key=lambda n: (abs(n - size), n))
            p = recipe.patch_for(near, device, budget)
            g = near // p
            if refused:
                raise ValueError(
                    f"--image-size {size}: the conv stem needs a patch of 2, 4, 8 ... px that divides the size into a "
                    f"grid of at least 4x4, and {size} has none; use --image-size {near} (patch {p}, the recipe's), "
                    "or give --patch-size with --stem patch"
                )
            log(
                f"Note: --image-size {size} takes patch {patch} at most (a power of 2 that divides it), a "
                f"{size // patch}x{size // patch} token grid, finer than the recipe's for images this size (patch "
                f"{ideal} at {ideal_size} px): each step costs several times "
                f"more. --image-size {near} (patch {p}, {g}x{g}), or --patch-size, chooses otherwise"
            )
    values = {**partial, **flags}
    if shared and "time_budget" not in flags:
        values["time_budget"] = shared  # the run's budget is the whole one, which its models share
    if not args.pretrained and not args.model:
        # the encoder follows the input the run gets: a chosen size or patch may leave the grid
        # the recipe's narrowed model was measured on (vit.recipe.model_for_input)
        model = recipe.model_for_input(n_train, scan.native_side(), values["image_size"], values["patch_size"])
        if any(k in flags for k in ("dim", "heads", "mlp_dim")):
            model = recipe.model_for(n_train)  # a width of one's own: the rest from the usual small model
        values.update({k: flags.get(k, v) for k, v in model.items()})
    if values.get("stem") != "conv" and "stem_depth" not in flags:
        values["stem_depth"] = None  # the recipe's conv stem depth; --stem patch has none
    if epochs_only and not args.pretrained and recipe.default_budget(device):
        values["time_budget_note"] = "off: --epochs was given without --time-budget"
    if values.get("time_budget") == 0:
        values["time_budget"] = None
    if values.get("time_budget") and "epochs" not in flags and not args.pretrained:
        values["epochs"] = recipe.BUDGET_MAX_EPOCHS  # from scratch, the budget decides the length,
        values["epochs_note"] = recipe.CAP_NOTE  # up to the recipe's cap
    if "mixup" not in flags and not args.pretrained:
        values["mixup_note"] = recipe.mixup_note(n_train, scan.native_side(), device, recipe_budget)
    if "hflip" not in flags and values["hflip"] > 0:
        check = recipe.mirror_check(*scan.thumbnails(train_items), seed=values.get("seed") or 0)
        if check.hurts:
            values["hflip"] = 0.0
        values["hflip_note"] = f"{'off' if check.hurts else 'on'}: {check.sentence()}"
    elif "hflip" not in flags:
        values["hflip_note"] = f"off: the recipe leaves it out for images of {recipe.GLYPH_SIDE} px or less (glyphs)"
    if values.get("mirror_average") is None:
        # A model that learned from mirror images predicts from both the image and its mirror: on
        # the shapes at 32 and 64 px, better on all 6 splits by 0.6-3.8 points, at 1.3-1.8 times
        # the exported file's latency (benchmarks/learning_2min_mirror_shapes_cpu.json, mirror_latency_cpu.json).
        values["mirror_average"] = values["hflip"] > 0
    if values.get("layer_decay") == 1:
        values["layer_decay"] = None
    if (values.get("members") or 1) > 1 and (args.pretrained or world > 1):
        raise ValueError(
            "--members: an ensemble's members start from other seeds, which only a run from scratch on one process "
            "has; leave --members out with --pretrained or torchrun"
        )
    values["ema_decay_auto"] = values.get("ema_decay") is None
    if values["ema_decay_auto"]:
        accum = values.get("grad_accum") or TrainConfig().grad_accum
        steps = values["epochs"] * math.ceil(n_train / (values["batch_size"] * world) / accum)
        values["ema_decay"] = ema_decay_for(steps)
    if values.get("workers") is None:
        cpus = usable_cpus()
        if device == "cpu" and cpus <= 2 and scan.images is not None:
            # Images in memory on a 2-core CPU: a loader process only takes cores from the model.
            # Loading in the training process: 11-18% more training images a second (median over
            # the epochs; 32 px shapes and 8 px digits, two runs of each).
            values["workers"] = 0
        else:
            values["workers"] = min(4, cpus - 1) if cpus > 2 else 1
    pretrained = args.pretrained
    if pretrained and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    values.update(device=device, data=str(scan.root), pretrained=pretrained)
    return TrainConfig.from_dict(values).validate()


def model_preprocessing(cfg, model_cfg):
    """The run's evaluation preprocessing: the model's input size, the settings' normalisation."""
    from vit.imageio import Preprocessing

    return Preprocessing(model_cfg.image_size, cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct)


def planned_cache(args, saved: dict | None, prep: dict | None, device: str) -> dict:
    """How cached images are shrunk, known before the scan: to the run's input size, crop and
    interpolation when they are given or saved, else to the largest input the recipe may pick."""
    from vit.data import cache_side_for
    from vit.recipe import input_size_for

    if saved is not None:
        from vit.imageio import Preprocessing

        p = Preprocessing.from_dict(saved["preprocessing"])
        return dict(cache_side=cache_side_for(p.image_size, p.crop_pct), cache_interpolation=p.interpolation)
    prep = prep or {}
    crop = args.crop_pct or prep.get("crop_pct") or 1.0
    size = args.image_size or prep.get("image_size") or input_size_for(10**6, device)[0]
    size = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = args.interpolation or prep.get("interpolation") or "bicubic"
    return dict(cache_side=cache_side_for(size, crop), cache_interpolation=interpolation)


def make_datasets(scan, split, cfg, model_cfg):
    from vit.data import EvalTransform, FolderDataset, train_transform

    size = tuple(model_cfg.image_size)
    tt = train_transform(
        size,
        cfg.mean,
        cfg.std,
        cfg.interpolation,
        cfg.augment,
        cfg.scale_min,
        cfg.hflip,
        cfg.erase,
    )
    et = EvalTransform(model_preprocessing(cfg, model_cfg))
    return (
        FolderDataset(scan, split.train, tt, cfg.seed),
        FolderDataset(scan, split.val, et, cfg.seed),
        FolderDataset(scan, split.test, et, cfg.seed) if split.test else None,
    )


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def start_run(args, device: str, world: int):
    """(run, cfg, scan, split, model, resumed) for a new run or a resumed one."""
    from vit.data import DataError

    if args.resume is not None:
        return resume_run(args, device)
    if args.data is None or args.out is None:
        raise DataError("pass --data PATH and --out RUN_DIR (or --resume RUN_DIR, or --eval RUN_DIR --data PATH)")
    return new_run(args, device, world)


class Finished(Exception):
    """--resume on a run that has finished: nothing to do, which is no error."""


def resume_run(args, device: str):
    """The run's own settings, split and architecture, checked against what is on disk now."""
    from vit import ViT, ViTConfig
    from vit.config import TrainConfig, changed_on_resume, given
    from vit.data import DataError, Split, scan_folder
    from vit.imageio import DEFAULT_MAX_PIXELS
    from vit.run import RunDir

    run = RunDir(args.resume)
    if not run.is_resumable():
        if (run / run.CONFIG).is_file():
            raise DataError(f"{run} {STOPPED_EARLY}")
        raise DataError(f"{run} holds no resumable run (no checkpoint.pt / config.json)")
    saved = run.config()
    cfg = TrainConfig.from_dict(saved["train"], saved=True)
    if cfg.mirror_average is None:  # a run from before the setting: its model says
        cfg = replace(cfg, mirror_average=bool(saved["model"].get("mirror_average", False)))
    changed = (["--pretrained"] if args.pretrained else []) + changed_on_resume(cfg, given(args))
    if changed:
        raise DataError(f"--resume continues with the run's own settings; drop {', '.join(changed)}")
    if "result" in saved and not members_to_train(run, cfg):  # the last thing a run writes
        raise Finished(f"{run} finished training: nothing to resume; its report is {run / 'report.md'}")
    cache = planned_cache(args, saved, None, device)
    scan = scan_folder(
        run.data_root(args.data), args.strict, args.max_pixels or DEFAULT_MAX_PIXELS, args.cache, **cache
    )
    if scan.classes != saved["labels"]:
        raise DataError(f"the classes in {scan.root} ({scan.classes}) differ from the run's ({saved['labels']})")
    items = run.split_items({rel for rel, _ in scan.train + (scan.val or []) + (scan.test or [])})
    split = Split(items["train"], items["val"], items["test"], [])
    workers = cfg.workers if args.workers is None else args.workers
    cfg = replace(cfg, device=device, data=str(scan.root), workers=workers)
    return run, cfg, scan, split, ViT(ViTConfig.from_dict(saved["model"])), True


def new_run(args, device: str, world: int):
    """Check the flags, scan and split the folder, resolve the settings, build the model."""
    import torch

    from vit.build import build_model, pretrained_preprocessing
    from vit.config import ARCHITECTURE, TrainConfig, given
    from vit.data import DataError, scan_folder, split_train_val
    from vit.imageio import DEFAULT_MAX_PIXELS
    from vit.run import RunDir

    shape = [n for n in ARCHITECTURE if getattr(args, n) is not None]
    if args.pretrained and shape:
        flags = ", ".join("--" + n.replace("_", "-") for n in shape)
        raise DataError(f"{flags}: the pretrained weights fix the architecture; leave these out with --pretrained")
    TrainConfig.from_dict(given(args)).validate()  # before minutes of scanning
    if args.pretrained and (args.members or 1) > 1:  # before any download
        raise DataError(
            "--members: an ensemble's members start from other seeds, which only a run from scratch has; leave "
            "--members out with --pretrained"
        )
    run = RunDir(args.out)
    if run.is_resumable():
        raise DataError(f"{run} already holds a run: continue it with --resume {run}, or pick another --out")
    if run.exists():
        raise DataError(f"{run} {STOPPED_EARLY}")
    prep, module = pretrained_preprocessing(args.pretrained, log) if args.pretrained else (None, None)
    cache = planned_cache(args, None, prep, device)
    scan = scan_folder(
        args.data, args.strict, args.max_pixels or DEFAULT_MAX_PIXELS, args.cache, thumbs=args.hflip is None, **cache
    )
    defaults = TrainConfig()
    val_fraction = args.val_fraction if args.val_fraction is not None else defaults.val_fraction
    split = split_train_val(scan, val_fraction, args.seed if args.seed is not None else defaults.seed)
    cfg = resolve(args, scan, split.train, device, prep, world)
    scan.thumbs.clear()  # only the recipe's checks needed them
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, scan.classes, module)
    coarse_grid_note(model.config)
    return run, cfg, scan, split, model, False


def coarse_grid_note(model_cfg) -> None:
    """Say so when a patch size leaves a grid coarser than the recipe's coarsest (4x4): with a
    token or two per side, attention has almost nothing to relate (1x1: nothing at all)."""
    gh, gw = model_cfg.grid_size
    if min(gh, gw) >= 4:
        return
    h, w = model_cfg.image_size
    what = "one token: attention has nothing to relate" if gh * gw == 1 else "coarser than any of the recipe's"
    fits = [p for p in range(min(h, w) // 4, 1, -1) if h % p == 0 and w % p == 0]
    instead = f"--patch-size {fits[0]} gives {h // fits[0]}x{w // fits[0]}" if fits else (
        f"no patch of 2 px or more divides {h}x{w} into 4x4 or more: --image-size {max(8, round(min(h, w) / 8) * 8)} "
        "takes the recipe's"
    )  # fmt: skip
    log(
        f"Note: --patch-size {model_cfg.patch_size} at {h}x{w} px leaves a {gh}x{gw} token grid ({what}); the "
        f"recipe's grids are 4x4 or finer: {instead}"
    )


def train(args) -> int:
    """Start (or resume) the run, fit it, then write its report: train.py's whole job."""
    import torch

    from vit.budget import TimeBudget
    from vit.engine import Diverged, Stop, Trainer, init_distributed, resolve_device

    t_start = time.perf_counter()
    d = init_distributed(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    device = resolve_device(args.device, d)
    say = log if d.main else (lambda *a: None)
    try:
        try:
            run, cfg, scan, split, model, resumed = start_run(args, device.type, d.world)
        except Finished as e:
            say(str(e))
            return 0
        if d.main:
            describe_scan(scan, split)
        train_ds, val_ds, test_ds = make_datasets(scan, split, cfg, model.config)
        share = cfg.members or 1  # members given: they share the budget
        budget = (
            TimeBudget(cfg.time_budget * 60 / share, cfg.epochs, cap_note=cfg.epochs_note) if cfg.time_budget else None
        )
        if resumed and d.world > 1 and ((cfg.members or 1) > 1 or (run / run.MEMBERS).is_dir()):
            raise ValueError(f"{run}: an ensemble's models train on one process; resume it without torchrun")
        if resumed and "result" in run.config():  # its first model is done: the ensemble's others are not
            say(f"{run} finished {len(finished_members(run))} of its models; continuing its ensemble")
            return grow_or_stop(run, cfg, run.config(), scan, split, (train_ds, val_ds, test_ds), device, d, None, say)
        trainer = Trainer(model, cfg, train_ds, val_ds, run.path, device, d, budget, t_start, say)
        trainer.weights_metadata = weights_metadata(model, scan.classes, cfg)
        run_config = dict(
            model=model.config.to_dict(),
            labels=scan.classes,
            preprocessing=model_preprocessing(cfg, model.config).to_dict(),
            train=cfg.to_dict(),
            data=dict(
                root=str(scan.root),
                layout=scan.layout,
                train_images=len(split.train),
                val_images=len(split.val),
                test_images=len(split.test),
                skipped=len(scan.skipped),
                max_pixels=scan.max_pixels,
            ),  # fmt: skip
            world_size=d.world,
        )
        if resumed:
            trainer.load_checkpoint(run / run.CHECKPOINT)
            if trainer.state.epoch >= trainer.state.total_epochs:  # stopped before its report was written
                what = "writing its report" if trainer.state.kept else "choosing its weights and writing its report"
                say(f"{run} finished its {trainer.state.epoch} epochs; {what}")
            else:
                say(f"Resuming {run} at epoch {trainer.state.epoch + 1}, step {trainer.state.step_in_epoch}")
        elif d.main:
            write_new_run(run, run_config, scan, split, cfg)
            describe_start(model, cfg, device, d.world)
            if not cfg.pretrained and (note := little_data_note(split.train, scan.classes)):
                log(f"note: {note}")
        try:
            state = trainer.fit(resumed)
        except Stop:
            say(f"\nStopped by signal; checkpoint saved. Continue with: python train.py --resume {run}")
            leave_process_group(d)
            return 130
        except Diverged as e:
            if d.main:
                print(f"error: {e}", file=sys.stderr)
            leave_process_group(d)
            return 1
        leave_process_group(d)
        if d.main and budget is not None and not resumed:
            log(budget_use(budget, state, time.perf_counter() - t_start))
        if d.main:  # alone now: the report may take longer than a collective's timeout
            finish_run(run, run_config, trainer, state, (val_ds, test_ds), scan.classes, t_start)
            # what the budget has paid for: a resumed run's is what its epochs took (metrics.csv), which
            # leaves out its set-up and the part of an epoch a stop lost
            spent = time.perf_counter() - t_start if not resumed else sum(float(r["seconds"]) for r in run.metrics())
            clock = (time.perf_counter() - spent, budget, state)
            trainer = model = None  # the first model's trainer (optimizer, EMA, loaders) is not needed again
            return grow_or_stop(run, cfg, run_config, scan, split, (train_ds, val_ds, test_ds), device, d, clock, say)
        return 0
    finally:
        if d.world > 1 and torch.distributed.is_initialized():  # an error before training ended
            torch.distributed.destroy_process_group()


def budget_use(budget, state, elapsed: float) -> str:
    """How much of its time budget a run used, and why, when it left more than 10% of it."""
    used = f"Training used {elapsed / 60:.2f} of its {budget.seconds / 60:g} min budget"
    why = unspent_reason(budget, state, elapsed)
    return f"{used}: {why}" if why else used


def unspent_reason(budget, state, elapsed: float) -> str | None:
    """Why a run with a time budget ended with more than 10% of it left, if it did."""
    if not budget.unspent(elapsed):
        return None
    if state.total_epochs >= budget.max_epochs:
        why = f"{budget.cap_note}; " if budget.cap_note else ""
        return f"it reached its cap of {budget.max_epochs} epochs ({why}--epochs N with --time-budget sets another)"
    if budget.held:
        return (
            f"its epochs sped up after the half-way point by less than the {budget.LATE_GROWTH:.0%} that "
            "lengthens a run that late (a longer schedule would raise the learning rate again)"
        )
    return "its last epochs ran faster than the ones its length was fitted from"


def leave_process_group(d) -> None:
    """Every rank leaves together (a rank torn down early can abort its peer), before rank 0
    writes the report on its own."""
    import torch.distributed as dist

    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def write_new_run(run, run_config: dict, scan, split, cfg) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_split(split.train, split.val, split.test, cfg.seed, cfg.val_fraction)
    run.write_skipped(scan.skipped, scan.notes)
    run.write_config(run_config)


def short_budget_grid(cfg, m, device: str) -> bool:
    """Whether the recipe chose a 4x4 grid because the CPU budget is short (vit.recipe.input_size_for)."""
    from vit.recipe import input_size_for

    side = min(m.image_size)
    short, usual = input_size_for(side, device, cfg.time_budget), input_size_for(side, device, 0)
    # the recipe's own size and patch for this budget, where a longer budget gives a finer grid
    return not cfg.pretrained and short == (side, m.patch_size) and short != usual


def describe_start(model, cfg, device, world: int) -> None:
    m = model.config
    log(
        f"Model: {m.depth} block{'s' if m.depth != 1 else ''}, width {m.dim}, {m.heads} heads, "
        f"{m.image_size[0]}x{m.image_size[1]} input, patch {m.patch_size} ({m.grid_size[0]}x{m.grid_size[1]} tokens"
        + (", coarser for a short budget" if short_budget_grid(cfg, m, device.type) else "")
        + f"), {model.num_params() / 1e6:.2f}M parameters on {device.type}"
        + (f" x {world} processes" if world > 1 else "")
    )
    log("Settings: " + cfg.shown())
    if cfg.time_budget and (cfg.members or 1) > 1:
        each = cfg.time_budget / cfg.members
        log(
            f"Time budget: {cfg.time_budget:g} min, shared by {cfg.members} models: the first {each:.3g}, the "
            "others what is left "
            f"(at most {cfg.epochs} epochs)"
        )
    elif cfg.time_budget:
        log(f"Time budget: {cfg.time_budget:g} min (at most {cfg.epochs} epochs)")
    else:
        log(f"Time budget: {cfg.time_budget_note or 'off'}")
    if cfg.hflip_note:
        log(f"Horizontal flip: {cfg.hflip_note} (--hflip sets it)")
    if cfg.mixup_note:
        log(f"Mixup: {cfg.mixup_note} (--mixup sets it)")


def little_data_note(train_items: list, classes: list[str], enough: int = 50) -> str | None:
    """What to expect when a class has few training images (Teachable Machine's territory)."""
    from collections import Counter

    counts = Counter(y for _, y in train_items)
    fewest = min(counts.get(i, 0) for i in range(len(classes)))
    if fewest >= enough:
        return None
    return (
        f"{fewest} training images in the smallest class: from scratch, a ViT learns little from so few "
        "(see the README's tiny-data table); fine-tuning pretrained weights (--pretrained NAME, downloaded "
        "once) usually does much better"
    )


def finish_run(run, run_config: dict, trainer, state, datasets, classes: list[str], t_start: float) -> None:
    """The kept weights' validation report, the held-out test (if any), and the result in config.json."""
    from safetensors.torch import load_file

    from vit import report

    val_ds, test_ds = datasets
    trainer.model.load_state_dict(load_file(str(run / run.WEIGHTS)))
    probs, labels = trainer.predict(trainer.model)
    scores = report.write_report(
        run.path, classes, probs.numpy(), labels.numpy(), val_ds.load, metrics_csv=run / run.METRICS,
        title="Validation report",
        # under mixup or cutmix the training curves score blended images against one of their labels
        train_label="train (mixed images)" if trainer.cfg.mixup or trainer.cfg.cutmix else "train",
    )  # fmt: skip
    result = dict(
        best_epoch=state.best_epoch,
        val_acc=round(state.best_acc, 4),
        weights=state.best_weights,
        kept=state.kept,
        macro_f1=scores["macro"]["f1"],
        ece=scores["ece"],
        train_minutes=round((time.perf_counter() - t_start) / 60, 2),
    )
    if test_ds is not None:
        result.update(held_out_test(trainer, test_ds, classes, run.path))
    fitted = state.total_epochs if state.fitted else None  # what the time budget decided, for the record
    run.write_config(
        {**run_config, "train": replace(trainer.cfg, epochs_fitted=fitted, ema_decay=state.ema_decay).to_dict(),
         "result": result}
    )  # fmt: skip
    log(f"Kept the weights of {state.kept}")
    log(
        f"Validation accuracy {state.best_acc:.2%} (epoch {state.best_epoch}, {state.best_weights} "
        f"weights); report in {run / 'report.md'}"
    )
    if note := learned_little(state.best_acc, labels.numpy(), len(classes), state.total_epochs):
        log(f"Warning: {note}")
    if test_ds is not None:
        log(
            f"Held-out test accuracy {result['test_acc']:.2%} on {result['test_images']} images "
            f"(never used for any choice); report in {run / 'test' / 'report.md'}"
        )


def learned_little(acc: float, labels, num_classes: int, epochs: int, margin: float = 0.05) -> str | None:
    """A warning when the kept weights are hardly better on validation than always answering
    its largest class: the run learned next to nothing (too short, or labels that mean nothing)."""
    import numpy as np

    if len(labels) == 0:
        return None
    majority = np.bincount(labels, minlength=num_classes).max() / len(labels)
    if acc >= majority + margin * (1 - majority):
        return None
    return (
        f"validation accuracy {acc:.1%} is hardly better than always answering the largest class ({majority:.1%}): "
        f"the model learned next to nothing in {epochs} epoch{'s' if epochs != 1 else ''}. Give it more time "
        "(--time-budget MINUTES, or more --epochs), and check that each class folder holds what its name says"
    )


def held_out_test(trainer, test_ds, classes: list[str], run_dir: Path) -> dict:
    """The chosen weights on test/, once, after every choice was made; its own report."""
    from torch.utils.data import DataLoader

    from vit import report

    loader = DataLoader(test_ds, batch_size=64, shuffle=False)
    probs, labels = trainer.predict(trainer.model, loader)
    scores = report.write_report(
        run_dir / "test", classes, probs.numpy(), labels.numpy(), test_ds.load, title="Held-out test report"
    )
    return dict(test_acc=round(scores["accuracy"], 4), test_images=scores["n"], test_macro_f1=scores["macro"]["f1"])


# --------------------------------------------------------------------------------------
# An ensemble: members 1, 2 ... trained on the run's split from other seeds, logits averaged
# --------------------------------------------------------------------------------------


def weights_metadata(model, classes: list[str], cfg) -> dict[str, str]:
    """What a copied weights file still says about itself."""
    return dict(
        vit_config=json.dumps(model.config.to_dict()),
        labels=json.dumps(classes),
        preprocessing=json.dumps(model_preprocessing(cfg, model.config).to_dict()),
    )


def finished_members(run) -> list:
    """The run's finished models in order: itself, then members/1, members/2 ... while they have a result."""
    done, i = [run], 1
    while run.member(i).is_trained() and "result" in run.member(i).config():
        done.append(run.member(i))
        i += 1
    return done


def members_to_train(run, cfg) -> bool:
    """Whether a finished run's ensemble has models to train or continue: one it started and did
    not finish, or fewer than --members asked for, unless the run stopped adding them (its
    budget ran out, or a model diverged: ``members_stopped`` in its result)."""
    if run.pending_member() is not None:
        return True
    config = run.config()
    done = len(finished_members(run))
    if done - 1 != len(config.get("members", [])):  # stopped before the ensemble's report was written
        return True
    result = config.get("result", {})
    planned = max(cfg.members or 1, result.get("members_planned", 1))
    return not result.get("members_stopped") and planned > done


def spent_seconds(run) -> float:
    """What a resumed run's finished models took of its budget: the first model's epochs
    (metrics.csv; its set-up and report are left out) and the others' training minutes."""
    first = sum(float(r.get("seconds") or 0) for r in run.metrics())
    return first + 60 * sum(m.config()["result"].get("train_minutes", 0) for m in finished_members(run)[1:])


def members_planned(cfg, clock) -> tuple[int, str | None]:
    """How many models the run's ensemble has, its first included, and why, when the recipe
    chose more than one. ``clock``: (start, budget, state) of the first model, ``start`` such
    that ``perf_counter() - start`` is what the budget has paid for; None when not known."""
    from vit.recipe import AUTO_MEMBERS, MEMBER_MARGIN

    if cfg.members is not None:
        return cfg.members, None
    if clock is None or cfg.pretrained or not cfg.epochs_note:  # the recipe's cap ended the schedule
        return 1, None
    t_start, budget, state = clock
    took = time.perf_counter() - t_start
    if budget is None or state.total_epochs < budget.max_epochs:
        return 1, None
    if budget.seconds - took < MEMBER_MARGIN * took:
        return 1, (
            f"one model: the whole schedule took {took / 60:.2f} of the {budget.seconds / 60:g} min budget, and a "
            f"second one needs {MEMBER_MARGIN:g} times that left"
        )
    return AUTO_MEMBERS, (
        f"the whole schedule ({state.total_epochs} epochs) took {took / 60:.1f} of the {budget.seconds / 60:g} min "
        "budget, so a second model trains from another seed on the same images in the rest, and the two are "
        "averaged (--members 1 leaves it out)"
    )


def grow_or_stop(run, *args) -> int:
    """``grow_ensemble``, and the exit status: a model stopped by a signal says so as the first
    model does (a model that diverged is left out, and the models before it kept)."""
    from vit.engine import Stop

    try:
        grow_ensemble(run, *args)
    except Stop:
        log(f"\nStopped by signal; checkpoint saved. Continue with: python train.py --resume {run}")
        return 130
    return 0


def grow_ensemble(run, cfg, run_config: dict, scan, split, datasets, device, d, clock, say) -> None:
    """Train (or continue) the run's other models, each a whole run in RUN/members/i, then
    write the ensemble's report and result. ``clock`` as for ``members_planned``."""
    import shutil

    from vit.config import TrainConfig
    from vit.engine import Diverged

    if d.world > 1:
        return
    wanted, why = members_planned(cfg, clock)
    result = run.config().get("result", {})
    started = run.started_members()
    # what an earlier start of the run planned, or started
    wanted = max(wanted, result.get("members_planned", 1), 1 + max((int(m.path.name) for m in started), default=0))
    if wanted == 1 and why:
        log(f"Ensemble: {why}")
    if wanted == 1 or "members_stopped" in result:
        return
    if why:
        log(f"Ensemble: {why}")
    if result.get("members_planned") != wanted:  # before any member starts: a resume keeps the plan
        run.write_config({**run.config(), "result": {**result, "members_planned": wanted}})
    if clock is None:  # resumed: the budget has paid for what the finished models took
        clock = (time.perf_counter() - spent_seconds(run), None, None)
    total = (cfg.time_budget or 0) * 60
    stopped, grown = None, False
    for i in range(1, wanted):
        member = run.member(i)
        if member.is_trained() and "result" in member.config():
            continue  # finished before a stop
        resumed = member.is_resumable()
        if resumed:
            saved = member.config()
            mcfg = replace(TrainConfig.from_dict(saved["train"], saved=True), device=cfg.device, workers=cfg.workers)
        else:
            shutil.rmtree(member.path, ignore_errors=True)  # one that stopped before its first checkpoint
            seconds = (total - (time.perf_counter() - clock[0])) / (wanted - i)
            if total and seconds < 0.5 * total / wanted:
                log(f"Ensemble: {seconds / 60:.1f} min of the budget left, too little for model {i + 1}; it has {i}")
                stopped = "budget"
                break
            minutes = round(seconds / 60, 2) if total else None
            mcfg = replace(cfg, seed=cfg.seed + 100 * i, time_budget=minutes, members=1)
        try:
            train_member(run, i, wanted, mcfg, run_config, scan, split, device, d, resumed)
        except Diverged as e:
            shutil.rmtree(member.path, ignore_errors=True)
            log(f"Ensemble: model {i + 1} diverged ({e}); it is left out, and the run keeps the {i} before it")
            stopped = "diverged"
            break
        grown = True
    if grown or stopped or "members" not in run.config():
        finish_ensemble(run, cfg, datasets, scan.classes, device, stopped)
    n = len(finished_members(run))
    if why and n > 1 and total - (time.perf_counter() - clock[0]) > 0.1 * total:
        log(
            f"Training used {(time.perf_counter() - clock[0]) / 60:.2f} of its {total / 60:g} min budget: the whole "
            f"schedules of {n} models, the most the recipe trains (each costs the file one more forward pass)"
        )


def train_member(run, i: int, n: int, mcfg, run_config: dict, scan, split, device, d, resumed: bool) -> None:
    """Model ``i`` of ``n``: a whole run in RUN/members/i on the run's split."""
    import torch

    from vit import ViT, ViTConfig
    from vit.budget import TimeBudget
    from vit.build import build_model
    from vit.engine import Trainer

    member, t0 = run.member(i), time.perf_counter()
    if resumed:
        config = {k: v for k, v in member.config().items() if k != "result"}
        model = ViT(ViTConfig.from_dict(config["model"]))
    else:
        torch.manual_seed(mcfg.seed)
        model = build_model(mcfg, scan.classes)
        config = {k: v for k, v in run_config.items() if k not in ("result", "members")}
        config.update(model=model.config.to_dict(), train=mcfg.to_dict())
    train_ds, val_ds, test_ds = make_datasets(scan, split, mcfg, model.config)  # augmentation from its own seed
    budget = TimeBudget(mcfg.time_budget * 60, mcfg.epochs, cap_note=mcfg.epochs_note) if mcfg.time_budget else None
    trainer = Trainer(model, mcfg, train_ds, val_ds, member.path, device, d, budget, t0, log)
    trainer.weights_metadata = weights_metadata(model, scan.classes, mcfg)
    if resumed:
        trainer.load_checkpoint(member / member.CHECKPOINT)
        log(f"Model {i + 1} of {n}: resuming {member} at epoch {trainer.state.epoch + 1}")
    else:
        member.path.mkdir(parents=True, exist_ok=True)
        saved = run.split()  # the run's own split, drawn with the run's seed
        member.write_split(split.train, split.val, split.test, saved["seed"], saved["val_fraction"])
        member.write_skipped(scan.skipped, scan.notes)
        member.write_config(config)
        minutes = f", {mcfg.time_budget:g} min of the budget" if mcfg.time_budget else ""
        log(f"Model {i + 1} of {n}: seed {mcfg.seed}{minutes}, in {member}")
    state = trainer.fit(resumed)
    finish_run(member, config, trainer, state, (val_ds, test_ds), scan.classes, t0)


def finish_ensemble(run, cfg, datasets, classes: list[str], device, stopped: str | None = None) -> None:
    """The finished models' averaged logits on validation (and test/): the run's report and
    result are the ensemble's, and config.json lists its members. ``stopped``: why the run
    adds no more ("budget", "diverged"), kept in the result so --resume does not either."""
    import torch
    from torch.utils.data import DataLoader

    from vit import report
    from vit.model import Ensemble

    _, val_ds, test_ds = datasets
    finished = finished_members(run)
    saved = run.config()
    first = saved["result"].get("first_model", saved["result"])  # finished again: its first model's own result
    first = {k: v for k, v in first.items() if k not in ("members_planned", "members_stopped")}
    if len(finished) < 2:
        if stopped:
            run.write_config({**saved, "result": {**saved["result"], "members_stopped": stopped}})
        return
    model = Ensemble([m.load_one() for m in finished]).to(device).eval()

    def predict(ds):
        with torch.inference_mode():
            batches = [(model(x.to(device)).float().softmax(-1).cpu(), y) for x, y in DataLoader(ds, batch_size=64)]
        return torch.cat([p for p, _ in batches]).numpy(), torch.cat([y for _, y in batches]).numpy()

    n, mixed = len(finished), cfg.mixup or cfg.cutmix
    probs, labels = predict(val_ds)
    scores = report.write_report(
        run.path, classes, probs, labels, val_ds.load, metrics_csv=run / run.METRICS,
        title=f"Validation report: an ensemble of {n} models (the curves are the first model's)",
        train_label="train (mixed images)" if mixed else "train",
    )  # fmt: skip
    results = [first] + [m.config()["result"] for m in finished[1:]]
    result = dict(
        first,
        first_model=first,
        members=n,
        members_planned=saved["result"].get("members_planned", n),
        val_acc=round(scores["accuracy"], 4),
        macro_f1=scores["macro"]["f1"],
        ece=scores["ece"],
        member_val_acc=[r["val_acc"] for r in results],
        train_minutes=round(sum(r["train_minutes"] for r in results), 2),  # the models one after another
        **({"members_stopped": stopped} if stopped else {}),
    )
    if test_ds is not None:
        probs, labels = predict(test_ds)
        tested = report.write_report(
            run / "test", classes, probs, labels, test_ds.load, title=f"Held-out test report: an ensemble of {n} models"
        )
        result.update(
            test_acc=round(tested["accuracy"], 4), test_images=tested["n"], test_macro_f1=tested["macro"]["f1"]
        )
        result["member_test_acc"] = [r.get("test_acc") for r in results]
    run.write_config(
        {**saved, "members": [m.path.relative_to(run.path).as_posix() for m in finished[1:]], "result": result}
    )
    alone = ", ".join(f"{a:.2%}" for a in result["member_val_acc"])
    log(
        f"Ensemble of {n} models: validation accuracy {result['val_acc']:.2%} (the models alone: {alone}); "
        f"report in {run / 'report.md'}"
    )
    if test_ds is not None:
        alone = ", ".join(f"{a:.2%}" for a in result["member_test_acc"])
        log(
            f"Held-out test accuracy {result['test_acc']:.2%} on {result['test_images']} images (the models alone: "
            f"{alone}); report in {run / 'test' / 'report.md'}"
        )


# --------------------------------------------------------------------------------------
# Evaluation on another folder: a run's weights, or an exported ONNX file
# --------------------------------------------------------------------------------------


def evaluate(args) -> int:
    from vit.evaluation import evaluate as evaluate_folder

    evaluate_folder(args.eval, args.data, args.out, args.strict, args.max_pixels, log)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vit.data import DataError

    if args.eval is not None and args.resume is not None:
        print("error: use --eval or --resume, not both", file=sys.stderr)
        return 2
    try:
        return evaluate(args) if args.eval is not None else train(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not str(e).startswith("could not download"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
