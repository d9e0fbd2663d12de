"""Train or fine-tune a ViT on a folder of images, one sub-folder per class.

    python train.py --data PATH --out RUN_DIR                 # from scratch, recipe from the data
    python train.py --data PATH --out RUN_DIR --pretrained vit_small_patch16_224.augreg_in21k
    python train.py --resume RUN_DIR                          # continue a stopped run
    python train.py --eval RUN_DIR --data OTHER_PATH          # the same report on another folder
    torchrun --nproc_per_node 4 train.py --data PATH --out RUN_DIR   # several GPUs (or CPUs)

RUN_DIR receives model.safetensors (best weights), config.json (model, labels in class
order, preprocessing, resolved settings), metrics.csv, split.json, checkpoint.pt
(resumable) and the report (report.md and PNGs).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

SETTINGS = (  # (flag name, type, help); None as default means "the recipe picks"
    ("model", str, "named variant such as Ti/16, S/16, B/16 (sets width, depth, heads, patch)"),
    ("image_size", int, "input height and width in pixels"),
    ("patch_size", int, "patch size P"),
    ("dim", int, "token width D"),
    ("depth", int, "number of encoder blocks"),
    ("heads", int, "attention heads"),
    ("mlp_dim", int, "MLP hidden width"),
    ("pool", str, "token (class token, the paper) or avg (mean of patch tokens)"),
    ("stem", str, "patch (the paper's linear patch embedding) or conv (its hybrid: a small CNN stem)"),
    ("epochs", int, "epochs (an upper bound when a time budget is set)"),
    ("time_budget", float, "minutes: fit the number of epochs to this wall-clock budget (0: off)"),
    ("batch_size", int, "images per optimizer step per process (before accumulation)"),
    ("lr", float, "peak learning rate"),
    ("min_lr_ratio", float, "final learning rate as a fraction of the peak"),
    ("weight_decay", float, "AdamW weight decay"),
    ("warmup_epochs", int, "linear warmup epochs"),
    ("label_smoothing", float, "label smoothing"),
    ("augment", str, "trivial (TrivialAugment), randaugment or none"),
    ("scale_min", float, "smallest area fraction of the random resized crop"),
    ("hflip", float, "horizontal flip probability (0 for text, digits, arrows ...)"),
    ("mixup", float, "mixup alpha (0: off)"),
    ("cutmix", float, "cutmix alpha (0: off)"),
    ("erase", float, "random erasing probability"),
    ("drop_path", float, "stochastic depth rate of the last block"),
    ("dropout", float, "dropout after the position embedding and dense layers"),
    ("clip_grad", float, "gradient norm clipping (0: off)"),
    ("ema_decay", float, "decay of the weights' exponential moving average"),
    ("layer_decay", float, "layer-wise LR decay for fine-tuning (1: off)"),
    ("interpolation", str, "resize interpolation: bicubic, bilinear, nearest or lanczos"),
    ("crop_pct", float, "evaluation centre crop fraction"),
)

# Settings that pretrained weights decide, so they cannot be given with --pretrained.
ARCHITECTURE = ("model", "dim", "depth", "heads", "mlp_dim", "patch_size", "stem", "pool")


def ema_decay_for(steps: int) -> float:
    """An EMA that averages over about the last 5% of the optimizer steps (within .99-.9998)."""
    return round(min(0.9998, max(0.99, 1 - 20 / max(steps, 1))), 5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train.py",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io_ = p.add_argument_group("what to do")
    io_.add_argument("--data", type=Path, help="image folder: ROOT/<class>/* or ROOT/{train,val}/<class>/*")
    io_.add_argument("--out", type=Path, help="run folder to create")
    io_.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    io_.add_argument("--eval", type=Path, metavar="RUN_DIR", help="evaluate RUN_DIR's model on --data")
    io_.add_argument(
        "--pretrained",
        metavar="NAME|PATH",
        help="timm model name (downloads once) or .safetensors/.pth/.npz checkpoint to fine-tune",
    )
    rec = p.add_argument_group("settings (default: chosen from the data and printed)")
    for name, typ, help_ in SETTINGS:
        rec.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    rec.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="keep an EMA of weights")
    rec.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (RGB)")
    rec.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (RGB)")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on GPUs that support it, fp32 otherwise",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--val-fraction", type=float, default=0.15, help="share of each class held out for validation")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--workers", type=int, default=None, help="data loader processes (default: from the CPUs)")
    run.add_argument("--strict", action="store_true", help="stop on unusable files instead of skipping them")
    run.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit per image")
    run.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep decoded images in memory (default: when they fit in 4 GiB)",
    )
    return p


def log(msg: str = "") -> None:
    print(msg, flush=True)


def describe_scan(scan, train, val, notes) -> None:
    from vit.data import class_table

    table, warn = class_table(scan.classes, train + val)
    log(f"Dataset {scan.root}: {len(scan.classes)} classes, {len(train)} train / {len(val)} validation images")
    log(table)
    if warn:
        log(f"warning: {warn}")
    for n in notes:
        log(f"note: {n}")
    if scan.skipped:
        log(f"skipped {len(scan.skipped)} unusable files:")
        for rel, why in scan.skipped[:25]:
            log(f"  {rel}: {why}")
        if len(scan.skipped) > 25:
            log(f"  ... and {len(scan.skipped) - 25} more (all listed in RUN_DIR/skipped.json)")


def resolve(args, scan, n_train: int, device: str, preprocessing: dict | None) -> dict:
    """Recipe defaults from the data, then every flag the user gave on top."""
    from vit import recipe
    from vit.model import PRESETS

    if args.pretrained:
        cfg = recipe.finetune_recipe(n_train, preprocessing)
    else:
        cfg = recipe.scratch_recipe(n_train, scan.native_side(), device)
    if args.model:
        name, _, patch = args.model.partition("/")
        if name not in PRESETS or not patch.isdigit():
            raise ValueError(f"--model {args.model!r}: use NAME/PATCH with NAME in {sorted(PRESETS)}, e.g. S/16")
        cfg.update(PRESETS[name], patch_size=int(patch))
    for name, _, _ in SETTINGS + (("ema", None, None), ("mean", None, None), ("std", None, None)):
        value = getattr(args, name)
        if value is not None and name != "model":
            cfg[name] = value
    if cfg.get("time_budget") == 0:
        cfg["time_budget"] = None
    if cfg.get("layer_decay") == 1:
        cfg["layer_decay"] = None
    steps = cfg["epochs"] * math.ceil(n_train / cfg["batch_size"] / args.grad_accum)
    cfg.setdefault("ema_decay", None)
    if cfg["ema_decay"] is None:
        cfg["ema_decay"] = ema_decay_for(steps)
    from vit.runtime import usable_cpus

    cpus = usable_cpus()
    workers = args.workers if args.workers is not None else (min(4, cpus - 1) if cpus > 2 else 1)
    cfg.update(
        seed=args.seed,
        grad_accum=args.grad_accum,
        compile=args.compile,
        precision=args.precision,
        device=device,
        workers=workers,
        val_fraction=args.val_fraction,
        pretrained=args.pretrained,
        data=str(scan.root),
    )
    return cfg


def build_model(cfg: dict, num_classes: int):
    """A fresh ViT, or pretrained weights with a new head at the run's input size."""
    from vit import ViT, ViTConfig
    from vit.convert import from_timm

    fields = dict(dropout=cfg["dropout"], drop_path=cfg["drop_path"])
    if cfg["pretrained"]:
        src = cfg.get("_pretrained_module") or cfg["pretrained"]
        return from_timm(src, num_classes=num_classes, image_size=cfg["image_size"], **fields)
    for k in ("dim", "depth", "heads", "mlp_dim", "patch_size", "image_size"):
        if cfg.get(k) is None:
            raise ValueError(f"missing model setting {k}")
    pool = cfg.get("pool") or "token"
    return ViT(
        ViTConfig(
            image_size=cfg["image_size"],
            patch_size=cfg["patch_size"],
            num_classes=num_classes,
            dim=cfg["dim"],
            depth=cfg["depth"],
            heads=cfg["heads"],
            mlp_dim=cfg["mlp_dim"],
            stem=cfg.get("stem") or "patch",
            # Average pooling goes with no class token and a LayerNorm after pooling (timm's layout).
            pool=pool,
            class_token=pool == "token",
            fc_norm=pool == "avg",
            **fields,
        )
    )


def pretrained_preprocessing(args, cfg_out: dict) -> dict:
    """Preprocessing that the pretrained weights expect (mean, std, interpolation, crop)."""
    from pathlib import Path as P

    from vit.convert import create_pretrained_timm, timm_preprocessing

    src = args.pretrained
    if P(src).suffix in (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt") or P(src).exists():
        google = P(src).suffix == ".npz"
        mean, std = ([0.5] * 3, [0.5] * 3) if google else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        log(f"note: {src} carries no preprocessing; using mean {mean} std {std} (override with --mean/--std)")
        return dict(mean=mean, std=std, interpolation="bicubic", crop_pct=0.875, image_size=224)
    module = create_pretrained_timm(src)
    cfg_out["_pretrained_module"] = module
    prep = timm_preprocessing(module)
    prep["image_size"] = module.patch_embed.img_size[0]
    return prep


def model_preprocessing(cfg: dict, model_cfg) -> dict:
    return dict(
        image_size=list(model_cfg.image_size),
        mean=list(cfg["mean"]),
        std=list(cfg["std"]),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
    )


def make_datasets(scan, train, val, cfg: dict, model_cfg):
    from vit.data import FolderDataset, eval_transform, train_transform

    size = tuple(model_cfg.image_size)
    tt = train_transform(
        size,
        cfg["mean"],
        cfg["std"],
        cfg["interpolation"],
        cfg["augment"],
        cfg["scale_min"],
        cfg["hflip"],
        cfg["erase"],
    )
    et = eval_transform(size, cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"])
    return FolderDataset(scan, train, tt, cfg["seed"]), FolderDataset(scan, val, et, cfg["seed"])


def run_report(trainer, val_ds, classes, run_dir: Path, title: str) -> dict:
    from vit import report

    probs, labels = trainer.predict(trainer.model)
    return report.write_report(
        run_dir, classes, probs.numpy(), labels.numpy(), val_ds.load, metrics_csv=run_dir / "metrics.csv", title=title
    )


def train(args) -> int:
    import torch

    from vit import files
    from vit.data import DataError, scan_folder, split_train_val
    from vit.engine import Stop, Trainer, init_distributed, resolve_device
    from vit.model import ViTConfig

    resume = args.resume is not None
    if resume:
        run_dir = args.resume
        if not (run_dir / "checkpoint.pt").is_file() or not (run_dir / "config.json").is_file():
            raise DataError(f"{run_dir} holds no resumable run (no checkpoint.pt / config.json)")
        saved = json.loads((run_dir / "config.json").read_text())
        given = [n for n, _, _ in SETTINGS if getattr(args, n) is not None] + (
            ["--pretrained"] if args.pretrained else []
        )
        if given:
            raise DataError(f"--resume continues with the run's own settings; drop {', '.join(given)}")
        data_root = args.data or Path(saved["train"]["data"])
    else:
        if args.data is None or args.out is None:
            raise DataError("pass --data PATH and --out RUN_DIR (or --resume RUN_DIR, or --eval RUN_DIR --data PATH)")
        shape = [n for n in ARCHITECTURE if getattr(args, n) is not None]
        if args.pretrained and shape:
            flags = ", ".join("--" + n.replace("_", "-") for n in shape)
            raise DataError(f"{flags}: the pretrained weights fix the architecture; leave these out with --pretrained")
        run_dir = args.out
        if (run_dir / "checkpoint.pt").exists() or (run_dir / "config.json").exists():
            raise DataError(
                f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --out"
            )
        data_root = args.data

    d = init_distributed(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    device = resolve_device(args.device, d)
    say = log if d.main else (lambda *a: None)
    t_start = time.perf_counter()
    from vit.imageio import DEFAULT_MAX_PIXELS

    scan = scan_folder(
        data_root, strict=args.strict, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, cache=args.cache
    )
    if resume:
        split = json.loads((run_dir / "split.json").read_text())
        if scan.classes != saved["labels"]:
            raise DataError(f"the classes in {data_root} ({scan.classes}) differ from the run's ({saved['labels']})")
        usable = {rel: lab for rel, lab in scan.train + (scan.val or [])}
        missing = [r for r, _ in split["train"] + split["val"] if r not in usable]
        if missing:
            raise DataError(f"{len(missing)} images of the saved split are gone or unusable, e.g. {missing[0]}")
        train_items = [tuple(x) for x in split["train"]]
        val_items = [tuple(x) for x in split["val"]]
        notes = []
        cfg = saved["train"]
        cfg["device"], cfg["workers"] = device.type, args.workers if args.workers is not None else cfg["workers"]
    else:
        train_items, val_items, notes = split_train_val(scan, args.val_fraction, args.seed)
        cfg = {}
        prep = pretrained_preprocessing(args, cfg) if args.pretrained else None
        cfg = {**resolve(args, scan, len(train_items), device.type, prep), **cfg}
    if d.main:
        describe_scan(scan, train_items, val_items, notes)

    if resume:
        model_cfg = ViTConfig.from_dict(saved["model"])
        from vit import ViT

        model = ViT(model_cfg)
    else:
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg, len(scan.classes))
        model_cfg = model.config
        cfg.pop("_pretrained_module", None)
    train_ds, val_ds = make_datasets(scan, train_items, val_items, cfg, model_cfg)
    trainer = Trainer(model, cfg, train_ds, val_ds, run_dir, device, d)

    run_config = dict(
        model=model_cfg.to_dict(),
        labels=scan.classes,
        preprocessing=model_preprocessing(cfg, model_cfg),
        train=cfg,
        data=dict(
            root=str(scan.root), train_images=len(train_items), val_images=len(val_items), skipped=len(scan.skipped)
        ),
        world_size=d.world,
    )
    if resume:
        trainer.load_checkpoint(run_dir / "checkpoint.pt")
        say(f"Resuming {run_dir} at epoch {trainer.state.epoch + 1}, step {trainer.state.step_in_epoch}")
    elif d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(
            run_dir / "split.json",
            dict(seed=args.seed, val_fraction=args.val_fraction, train=train_items, val=val_items),
        )
        files.write_json(run_dir / "skipped.json", [dict(file=r, reason=w) for r, w in scan.skipped])
        files.write_json(run_dir / "config.json", run_config)
    if d.main and not resume:
        shown = {k: v for k, v in cfg.items() if k not in ("data",)}
        say(
            f"Model: {model_cfg.depth} blocks, width {model_cfg.dim}, {model_cfg.heads} heads, "
            f"{model_cfg.image_size[0]}x{model_cfg.image_size[1]} input, patch {model_cfg.patch_size} "
            f"({model.num_params() / 1e6:.2f}M parameters) on {device.type}"
            + (f" x {d.world} processes" if d.world > 1 else "")
        )
        say("Settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    def set_epochs(tr, epochs: int, per_epoch: float) -> None:
        if d.world > 1:  # every process follows rank 0's clock
            t = torch.tensor([epochs], device=device)
            torch.distributed.broadcast(t, 0)
            epochs = int(t.item())
        if epochs == tr.state.total_epochs and cfg.get("epochs_fitted"):
            return
        tr.state.total_epochs = epochs
        cfg["epochs_fitted"] = epochs
        if args.ema_decay is None and tr.ema is not None:  # the EMA's horizon follows the run's length
            cfg["ema_decay"] = ema_decay_for(epochs * tr.steps_per_epoch)
            tr.set_ema_decay(cfg["ema_decay"])
        say(
            f"Time budget {cfg['time_budget']:g} min: about {per_epoch:.1f}s per epoch, so {epochs} epochs "
            f"(of at most {cfg['epochs']})"
        )
        if d.main:
            files.write_json(run_dir / "config.json", {**run_config, "train": cfg})

    def fit_to_budget(step_time: float, tr) -> None:
        """A first estimate from the first few steps, so the schedule has a length from the start."""
        if not cfg.get("time_budget") or cfg.get("epochs_fitted"):
            return
        per_epoch = step_time * tr.steps_per_epoch * (1 + 0.35 * len(val_ds) / max(len(train_ds), 1))
        left = cfg["time_budget"] * 60 - (time.perf_counter() - t_start)
        set_epochs(tr, max(1, min(cfg["epochs"], int(left / per_epoch))), per_epoch)

    clock = dict(t=0.0, epoch_seconds=[])  # t: when the current epoch began

    def refit_to_budget(tr) -> None:
        """After each epoch, measured epoch times (training and validation; their median, so one
        slow epoch does not decide) replace the first estimate, which runs long because the
        first steps are slow. In the first half of the run the length may grow or shrink; after
        that it may only shrink, so a machine that slows down does not overrun the budget. A
        resumed run keeps the length it was given."""
        now = time.perf_counter()
        clock["epoch_seconds"].append(now - clock["t"])
        clock["t"] = now
        if not cfg.get("time_budget") or resume:
            return
        per_epoch = statistics.median(clock["epoch_seconds"])
        left = cfg["time_budget"] * 60 - (now - t_start)
        done, total = tr.state.epoch, tr.state.total_epochs
        fits = done + int(left / per_epoch)
        epochs = min(cfg["epochs"], fits) if done < total / 2 else min(total, fits)
        set_epochs(tr, max(done, epochs), per_epoch)

    try:
        clock["t"] = time.perf_counter()
        state = trainer.fit(say, on_calibrated=fit_to_budget, on_epoch_end=refit_to_budget)
    except Stop:
        say(f"\nStopped by signal; checkpoint saved. Continue with: python train.py --resume {run_dir}")
        return 130
    if d.main:
        from safetensors.torch import load_file

        trainer.model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
        scores = run_report(trainer, val_ds, scan.classes, run_dir, "Validation report")
        result = dict(
            best_epoch=state.best_epoch,
            val_acc=round(state.best_acc, 4),
            weights=state.best_weights,
            macro_f1=scores["macro"]["f1"],
            ece=scores["ece"],
            train_minutes=round((time.perf_counter() - t_start) / 60, 2),
        )
        files.write_json(run_dir / "config.json", {**run_config, "train": cfg, "result": result})
        say(
            f"Best validation accuracy {state.best_acc:.2%} at epoch {state.best_epoch} ({state.best_weights} "
            f"weights); report in {run_dir / 'report.md'}"
        )
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return 0


def evaluate(args) -> int:
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from vit import ViT, ViTConfig, report
    from vit.data import DataError, FolderDataset, eval_transform, scan_folder
    from vit.imageio import DEFAULT_MAX_PIXELS

    run_dir = args.eval
    if args.data is None:
        raise DataError("--eval RUN_DIR needs --data PATH: the folder to evaluate on")
    if not (run_dir / "config.json").is_file() or not (run_dir / "model.safetensors").is_file():
        raise DataError(f"{run_dir} holds no trained model (config.json and model.safetensors)")
    run = json.loads((run_dir / "config.json").read_text())
    labels = run["labels"]
    scan = scan_folder(
        args.data,
        strict=args.strict,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        cache=args.cache,
        min_classes=1,
        min_per_class=1,
    )
    items = scan.val if scan.val is not None else scan.train
    unknown = sorted(set(scan.classes) - set(labels))
    if unknown:
        raise DataError(f"{args.data} has classes the model does not know: {unknown} (it knows {labels})")
    items = [(rel, labels.index(scan.classes[lab])) for rel, lab in items]
    model = ViT(ViTConfig.from_dict(run["model"]))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    p = run["preprocessing"]
    ds = FolderDataset(
        scan, items, eval_transform(tuple(p["image_size"]), p["mean"], p["std"], p["crop_pct"], p["interpolation"])
    )
    probs, ys = [], []
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=64):
            probs.append(model(x).softmax(-1))
            ys.append(y)
    out = args.out or run_dir / f"eval-{Path(args.data).resolve().name}"
    scores = report.write_report(
        out, labels, torch.cat(probs).numpy(), torch.cat(ys).numpy(), ds.load, title=f"Evaluation on {args.data}"
    )
    log(
        f"{scores['n']} images from {args.data}: accuracy {scores['accuracy']:.2%}, macro F1 "
        f"{scores['macro']['f1']:.3f}; report in {out / 'report.md'}"
    )
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
