"""The training loop: one function per job, and state that resumes exactly.

Everything random is a function of (seed, epoch, step) or (seed, epoch, sample): data
order, augmentation, dropout, mixup. A checkpoint holds model, optimizer, schedule, EMA
and the position in the epoch, so a resumed run continues as if never stopped.
"""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vit import files
from vit.data import EpochSampler, sample_seed
from vit.model import ViT

# --------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return Dist(rank, world, local)


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA GPU is visible: use --device cpu")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------


def param_groups(model: ViT, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups: no decay on biases, norms, position embedding and class token; with
    ``layer_decay`` each block's LR is scaled by layer_decay^(distance from the head)."""
    depth = model.config.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
        g = groups.setdefault(
            (layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay, lr_scale=scale)
        )
        g["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


@dataclass
class State:
    """What a checkpoint restores besides weights."""

    epoch: int = 0  # the epoch in progress (or next to start)
    step_in_epoch: int = 0  # optimizer steps already done in that epoch
    global_step: int = 0
    total_epochs: int = 1
    best_acc: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = -1
    best_weights: str = "raw"
    sums: dict = field(default_factory=lambda: dict(loss=0.0, correct=0.0, seen=0.0, wait=0.0, step=0.0))


class Stop(Exception):
    """Raised when SIGINT/SIGTERM asked the run to stop and a checkpoint was saved."""


class Trainer:
    def __init__(self, model: ViT, cfg: dict, train_ds, val_ds, run_dir: Path, device: torch.device, d: Dist):
        self.cfg, self.run_dir, self.device, self.d = cfg, Path(run_dir), device, d
        self.model = model.to(device)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.sampler = EpochSampler(len(train_ds), cfg["seed"], True, d.rank, d.world)
        workers = cfg["workers"]
        self.loader = DataLoader(
            train_ds,
            batch_size=cfg["batch_size"],
            sampler=self.sampler,
            drop_last=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        self.val_loader = DataLoader(
            val_ds,
            batch_size=max(64, cfg["batch_size"]),
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        self.steps_per_epoch = math.ceil(len(self.sampler) / cfg["batch_size"] / cfg["grad_accum"])
        self.opt = torch.optim.AdamW(
            param_groups(model, cfg["weight_decay"], cfg["layer_decay"]),
            lr=cfg["lr"],
            betas=(0.9, 0.999),
            fused=device.type == "cuda",
        )
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema_decay"]), use_buffers=True)
            if cfg["ema"]
            else None
        )
        self.net = self.model
        if d.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.fwd = torch.compile(self.net) if cfg["compile"] else self.net
        self.bf16 = cfg["precision"] == "bf16" or (
            cfg["precision"] == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.mix = self._mixer()
        self.state = State(total_epochs=cfg["epochs"])
        self.stop_signal: int | None = None

    # ----- pieces --------------------------------------------------------------------
    def _mixer(self):
        from torchvision.transforms import v2 as T

        k = self.model.config.num_classes
        ops = []
        if self.cfg["mixup"] > 0:
            ops.append(T.MixUp(alpha=self.cfg["mixup"], num_classes=k))
        if self.cfg["cutmix"] > 0:
            ops.append(T.CutMix(alpha=self.cfg["cutmix"], num_classes=k))
        return T.RandomChoice(ops) if ops else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def set_ema_decay(self, decay: float) -> None:
        self.ema.multi_avg_fn = get_ema_multi_avg_fn(decay)

    def set_lr(self) -> float:
        s = self.state
        total = s.total_epochs * self.steps_per_epoch
        warmup = min(self.cfg["warmup_epochs"] * self.steps_per_epoch, total // 5)  # never most of a short run
        f = lr_factor(s.global_step, warmup, total, self.cfg["min_lr_ratio"])
        for g in self.opt.param_groups:
            g["lr"] = self.cfg["lr"] * f * g["lr_scale"]
        return self.cfg["lr"] * f

    # ----- checkpoints ---------------------------------------------------------------
    def checkpoint(self) -> dict:
        s = self.state
        return dict(
            model=self.model.state_dict(),
            optimizer=self.opt.state_dict(),
            ema=self.ema.state_dict() if self.ema else None,
            state=dict(s.__dict__),
            config=self.cfg,
        )

    def save_checkpoint(self) -> None:
        if self.d.main:
            files.torch_save(self.run_dir / "checkpoint.pt", self.checkpoint())

    def load_checkpoint(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        self.state = State(**ck["state"])

    # ----- one epoch -----------------------------------------------------------------
    def train_epoch(self, on_calibrated=None) -> dict:
        s, cfg = self.state, self.cfg
        self.net.train()
        start_batch = s.step_in_epoch * cfg["grad_accum"]
        self.sampler.set_epoch(s.epoch, start=start_batch * cfg["batch_size"])
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=s.step_in_epoch,
            desc=f"epoch {s.epoch + 1}/{s.total_epochs}",
            disable=not (self.d.main and sys.stderr.isatty()),
            leave=False,
            dynamic_ncols=True,
            unit="step",
        )
        it = iter(self.loader)
        t_epoch = time.perf_counter()
        seen0 = s.sums["seen"]
        while s.step_in_epoch < self.steps_per_epoch:
            lr = self.set_lr()
            torch.manual_seed(sample_seed(cfg["seed"] + 7 * self.d.rank, s.epoch, 10**7 + s.step_in_epoch))
            t0 = time.perf_counter()
            wait = 0.0
            for micro in range(cfg["grad_accum"]):
                tw = time.perf_counter()
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                wait += time.perf_counter() - tw
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                target = y
                if self.mix is not None:
                    x, target = self.mix(x, y)
                sync = micro == cfg["grad_accum"] - 1 or self.d.world == 1
                ctx = self.net.no_sync() if (self.d.world > 1 and not sync) else nullcontext()
                with ctx, self.autocast():
                    logits = self.fwd(x)
                    loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg["label_smoothing"])
                (loss / cfg["grad_accum"]).backward()
                s.sums["loss"] += loss.item() * len(y)
                s.sums["correct"] += (logits.argmax(1) == y).sum().item()
                s.sums["seen"] += len(y)
            if cfg["clip_grad"]:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad"])
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            s.sums["wait"] += wait
            s.sums["step"] += dt
            s.step_in_epoch += 1
            s.global_step += 1
            seen = s.sums["seen"]
            bar.set_postfix(
                loss=f"{s.sums['loss'] / max(seen, 1):.3f}",
                acc=f"{s.sums['correct'] / max(seen, 1):.3f}",
                lr=f"{lr:.2e}",
                img_s=f"{(seen - seen0) * self.d.world / (time.perf_counter() - t_epoch):.0f}",
            )
            bar.update(1)
            if on_calibrated is not None and s.epoch == 0 and s.step_in_epoch == min(6, self.steps_per_epoch):
                on_calibrated(s.sums["step"] / s.step_in_epoch, self)
            if self.stop_signal is not None:
                bar.close()
                self.save_checkpoint()
                raise Stop()
        bar.close()
        seen = max(s.sums["seen"], 1)
        out = dict(
            train_loss=s.sums["loss"] / seen,
            train_acc=s.sums["correct"] / seen,
            data_wait=s.sums["wait"] / max(s.sums["step"], 1e-9),
            images_per_s=s.sums["seen"] * self.d.world / max(s.sums["step"], 1e-9),
            lr=lr,
        )
        return out

    @torch.no_grad()
    def predict(self, model: nn.Module, loader=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (N, K) and labels (N,) over the validation set."""
        model.eval()
        probs, labels = [], []
        for x, y in loader or self.val_loader:
            with self.autocast():
                logits = model(x.to(self.device))
            probs.append(logits.float().softmax(-1).cpu())
            labels.append(y)
        return torch.cat(probs), torch.cat(labels)

    def evaluate(self) -> dict:
        out = {}
        candidates = [("raw", self.model)] + ([("ema", self.ema.module)] if self.ema is not None else [])
        for name, m in candidates:
            p, y = self.predict(m)
            out[name] = dict(
                loss=F.nll_loss(p.clamp_min(1e-12).log(), y).item(), acc=(p.argmax(1) == y).float().mean().item()
            )
        return out

    # ----- the whole run -------------------------------------------------------------
    def fit(self, log, on_calibrated=None, on_epoch_end=None) -> State:
        s = self.state
        self._install_signals()
        try:
            while s.epoch < s.total_epochs:
                t0 = time.perf_counter()
                tr = self.train_epoch(on_calibrated)
                ev = self.evaluate()
                best_name = max(ev, key=lambda k: (ev[k]["acc"], -ev[k]["loss"]))
                best = ev[best_name]
                row = dict(
                    epoch=s.epoch + 1,
                    **{k: round(v, 6) for k, v in tr.items()},
                    val_loss=round(ev["raw"]["loss"], 6),
                    val_acc=round(ev["raw"]["acc"], 6),
                    ema_val_loss=round(ev["ema"]["loss"], 6) if "ema" in ev else "",
                    ema_val_acc=round(ev["ema"]["acc"], 6) if "ema" in ev else "",
                    seconds=round(time.perf_counter() - t0, 2),
                )
                improved = (best["acc"], -best["loss"]) > (s.best_acc, -s.best_loss)
                if improved:
                    s.best_acc, s.best_loss, s.best_epoch, s.best_weights = (
                        best["acc"],
                        best["loss"],
                        s.epoch + 1,
                        best_name,
                    )
                    if self.d.main:
                        self.save_best(best_name)
                s.epoch += 1
                s.step_in_epoch = 0
                s.sums = State().sums
                if on_epoch_end is not None:
                    on_epoch_end(self)
                if self.d.main:
                    self.append_metrics(row)
                    log(
                        f"epoch {row['epoch']:>3}/{s.total_epochs}  loss {row['train_loss']:.4f}  "
                        f"acc {row['train_acc']:.3f}  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.3f}"
                        + (f"  ema_val_acc {row['ema_val_acc']:.3f}" if row["ema_val_acc"] != "" else "")
                        + f"  {row['images_per_s']:.0f} img/s  data wait {row['data_wait']:.0%}"
                        + ("  *best" if improved else "")
                    )
                self.save_checkpoint()
        finally:
            self._restore_signals()
        return s

    def save_best(self, which: str) -> None:
        model = self.ema.module if which == "ema" else self.model
        files.save_safetensors(
            self.run_dir / "model.safetensors", model.state_dict(), metadata={"format": "pt", "weights": which}
        )

    def append_metrics(self, row: dict) -> None:
        path = self.run_dir / "metrics.csv"
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(row))
        w.writeheader()
        w.writerows(rows)
        files.write_text(path, buf.getvalue())

    def _install_signals(self) -> None:
        self._old = {}

        def handler(signum, frame):
            if self.stop_signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_signals(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
