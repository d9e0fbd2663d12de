"""The training loop: one function per job, and state that resumes exactly.

Everything random is a function of (seed, epoch, step) or (seed, epoch, sample): data
order, augmentation, dropout, mixup. A checkpoint holds model, optimizer, schedule, EMA
and the position in the epoch, so a resumed run continues as if never stopped.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vit import files, report
from vit.budget import TimeBudget
from vit.config import TrainConfig
from vit.data import EpochSampler, ignore_stop_signals, sample_seed
from vit.model import ViT
from vit.recipe import sign_test
from vit.run import RunDir

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


def bn_stem(model: nn.Module) -> nn.Module | None:
    """The model's input stem (``patch_embed``) when it holds all the model's BatchNorm layers
    (the conv stem), else None: the part an averaged model's BatchNorm statistics come from."""

    def count(module: nn.Module) -> int:
        return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

    stem = getattr(model, "patch_embed", None)
    return stem if stem is not None and 0 < count(stem) == count(model) else None


# The averaged stem's BatchNorm statistics are measured again, before each validation, on the
# epoch's last training batches (each rank its own): at most this many, and no more images than
# this unless one batch holds more (a bound on the memory they hold: about 300 MB at 224 px).
EMA_BN_BATCHES, EMA_BN_IMAGES = 8, 512


def ema_decay_for(steps: int) -> float:
    """An EMA that averages over about the last 5% of the optimizer steps (within .99-.9998)."""
    return round(min(0.9998, max(0.99, 1 - 20 / max(steps, 1))), 5)


def rank(score: dict) -> tuple[float, float]:
    """How validation scores compare: accuracy, then loss."""
    return score["acc"], -score["loss"]


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
    best_correct: torch.Tensor | None = None  # which validation images the best epoch got right
    kept: str = ""  # why the kept weights are those of best_epoch, once the run has ended
    fitted: bool = False  # the time budget has chosen total_epochs
    ema_decay: float | None = None  # the EMA's decay now (it follows a fitted length)
    bad_steps: int = 0  # skipped steps in a row, their gradient not a finite number
    sums: dict = field(default_factory=lambda: dict(loss=0.0, correct=0.0, seen=0.0, wait=0.0, step=0.0, lr=0.0))


class Diverged(FloatingPointError):
    """Raised when ``Trainer.MOST_BAD_STEPS`` steps in a row had a gradient that was not finite,
    or when the weights' validation loss is not: the run cannot go on as it is."""


class Stop(Exception):
    """Raised when SIGINT/SIGTERM asked the run to stop and a checkpoint was saved."""


class StopSignals:
    """SIGINT and SIGTERM, while the run is inside this context, ask it to stop at the next
    safe point instead of killing it; a second Ctrl-C stops at once. Outside the main thread
    (where Python allows no handlers) it does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        def handler(signum, frame):
            if self.received is not None:
                raise KeyboardInterrupt
            self.received = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def make_loaders(train_ds, val_ds, sampler: EpochSampler, cfg: TrainConfig, device: torch.device):
    """The training loader (seeded sampler, persistent workers) and the validation loader.
    Workers ignore Ctrl-C: the main process decides to stop and shuts them down itself."""
    workers = cfg.workers
    common = dict(
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals if workers else None,
    )
    train = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=False,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        **common,
    )
    val = DataLoader(val_ds, batch_size=max(64, cfg.batch_size), shuffle=False, **common)
    return train, val


class Trainer:
    """Train -> evaluate -> keep the best -> log, epoch after epoch, with exact resume.

    ``budget``: fit the number of epochs to a wall-clock budget (``cfg.epochs`` is then an
    upper bound). What the run decides as it goes (that length, the EMA decay that follows
    it when ``cfg.ema_decay_auto``) lives in ``State``, which the checkpoint holds; the
    config is only read.
    """

    def __init__(
        self,
        model: ViT,
        cfg: TrainConfig,
        train_ds,
        val_ds,
        run_dir: Path,
        device: torch.device,
        d: Dist,
        budget: TimeBudget | None = None,
        started: float | None = None,
        log=print,
    ):
        self.cfg, self.run_dir, self.device, self.d = cfg, Path(run_dir), device, d
        self.budget, self.log = budget, log
        self.said_epochs: int | None = None  # the run's length as last logged (set_total_epochs)
        self.started = time.perf_counter() if started is None else started
        self.model = model.to(device)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.sampler = EpochSampler(len(train_ds), cfg.seed, True, d.rank, d.world)
        self.loader, self.val_loader = make_loaders(train_ds, val_ds, self.sampler, cfg, device)
        self.batches_per_epoch = math.ceil(len(self.sampler) / cfg.batch_size)  # per rank: the sampler pads
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.opt = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr, betas=(0.9, 0.999),
            fused=device.type == "cuda",
        )  # fmt: skip
        self.ema = self.ema_stem = None
        if cfg.ema:
            decay = get_ema_multi_avg_fn(cfg.ema_decay)
            self.ema = AveragedModel(self.model, multi_avg_fn=decay, use_buffers=True)
            self.ema_stem = bn_stem(self.ema.module)
        per_rank = -(-len(train_ds) // d.world)
        self.bn_batches = max(1, min(EMA_BN_BATCHES, EMA_BN_IMAGES // cfg.batch_size, -(-per_rank // cfg.batch_size)))
        self.recent: deque[torch.Tensor] = deque(maxlen=self.bn_batches)  # the epoch's last batches (ema_batchnorm)
        self.net = self.model
        if d.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.fwd = torch.compile(self.net) if cfg.compile else self.net
        self.bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.mix = self._mixer()
        self.state = State(total_epochs=cfg.epochs, ema_decay=cfg.ema_decay)
        self.signals = StopSignals()
        self.weights_metadata: dict[str, str] = {}  # written into model.safetensors beside the weights

    # ----- pieces --------------------------------------------------------------------
    def _mixer(self):
        from torchvision.transforms import v2 as T

        k = self.model.config.num_classes
        ops = []
        if self.cfg.mixup > 0:
            ops.append(T.MixUp(alpha=self.cfg.mixup, num_classes=k))
        if self.cfg.cutmix > 0:
            ops.append(T.CutMix(alpha=self.cfg.cutmix, num_classes=k))
        return T.RandomChoice(ops) if ops else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def set_total_epochs(self, epochs: int, per_epoch: float) -> None:
        """A new length for the run (from the time budget); every rank follows rank 0's clock."""
        if self.d.world > 1:
            t = torch.tensor([epochs], device=self.device)
            dist.broadcast(t, 0)
            epochs = int(t.item())
        s = self.state
        if epochs == s.total_epochs and s.fitted:
            return
        s.total_epochs, s.fitted = epochs, True
        if self.cfg.ema_decay_auto and self.ema is not None:
            s.ema_decay = ema_decay_for(epochs * self.steps_per_epoch)
            self.ema.multi_avg_fn = get_ema_multi_avg_fn(s.ema_decay)
        capped_now = epochs == self.budget.max_epochs != self.said_epochs  # the cap is always news
        if self.d.main and (TimeBudget.worth_saying(epochs, self.said_epochs) or capped_now):
            self.said_epochs = epochs
            capped = ""
            ends = time.perf_counter() - self.started + (epochs - s.epoch) * per_epoch
            if epochs == self.budget.max_epochs and ends < 0.9 * self.budget.seconds:
                why = f" ({self.budget.cap_note})" if self.budget.cap_note else ""
                capped = (
                    f"; {epochs} is the cap{why}, so the run should end after about {ends / 60:.1f} min "
                    "(--epochs N with --time-budget sets a longer cap)"
                )
            self.log(
                f"Time budget {self.budget.seconds / 60:g} min: about {per_epoch:.1f}s per epoch, so {epochs} "
                f"epoch{'s' if epochs != 1 else ''} (of at most {self.budget.max_epochs}){capped}"
            )

    def stop_requested(self) -> bool:
        """Whether to stop here. Under DDP the ranks agree (any rank's signal stops all of them at
        the same step), so none is left waiting in an all-reduce that the others never join."""
        local = self.signals.received is not None
        if self.d.world == 1:
            return local
        t = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def set_lr(self) -> float:
        s = self.state
        total = s.total_epochs * self.steps_per_epoch
        warmup = min(self.cfg.warmup_epochs * self.steps_per_epoch, total // 5)  # never most of a short run
        f = lr_factor(s.global_step, warmup, total, self.cfg.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * f * g["lr_scale"]
        return self.cfg.lr * f

    # ----- checkpoints ---------------------------------------------------------------
    def checkpoint(self) -> dict:
        return dict(
            model=self.model.state_dict(),
            optimizer=self.opt.state_dict(),
            ema=self.ema.state_dict() if self.ema else None,
            state=dict(self.state.__dict__),
        )

    def save_checkpoint(self) -> None:
        if self.d.main:
            files.torch_save(self.run_dir / RunDir.CHECKPOINT, self.checkpoint())

    def load_checkpoint(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        old = ck.get("config") or {}  # checkpoints of earlier versions kept the budget's decisions there
        earlier = {"ema_decay": old.get("ema_decay", self.cfg.ema_decay), "fitted": bool(old.get("epochs_fitted"))}
        self.state = State(**{**earlier, **ck["state"]})
        if self.ema is not None:
            self.ema.multi_avg_fn = get_ema_multi_avg_fn(self.state.ema_decay)

    def save_best(self, which: str) -> None:
        model = self.ema.module if which == "ema" else self.model
        files.save_safetensors(
            self.run_dir / RunDir.WEIGHTS,
            model.state_dict(),
            metadata={"format": "pt", "weights": which, **self.weights_metadata},
        )

    # ----- training ------------------------------------------------------------------
    MOST_BAD_STEPS = 5  # skipped steps in a row (gradient not finite) after which the run stops

    def train_step(self, batches) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (learning rate, seconds
        waited for data). Its randomness (dropout, stochastic depth, mixup) is seeded by (seed,
        rank, epoch, step, micro-batch), after the micro-batch is loaded: loading in this process
        (``--workers 0``) seeds the CPU generator per image, so a seed drawn before it would leave
        the step's draws to the last image's seed, and a run resumed with another ``--workers``
        would differ."""
        s, cfg = self.state, self.cfg
        lr = self.set_lr()
        wait = 0.0
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # the step's micro-batches, for SAM's second pass
        sums = dict(loss=0.0, correct=0.0, seen=0.0)  # counted only if the step is taken
        buffers = [b.detach().clone() for b in self.model.buffers()]  # BatchNorm's statistics, if it is not
        micros = self.micro_batches()
        try:
            for micro in range(micros):
                tw = time.perf_counter()
                try:
                    x, y = next(batches)
                except StopIteration:
                    break
                wait += time.perf_counter() - tw
                torch.manual_seed(
                    sample_seed(cfg.seed + 7 * self.d.rank, s.epoch, 10**7 + s.step_in_epoch * cfg.grad_accum + micro)
                )
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if self.ema_stem is not None:
                    self.recent.append(x)
                target = y
                if self.mix is not None:
                    x, target = self.mix(x, y)
                logits, loss = self.forward_backward(x, target, last=micro == micros - 1)
                if cfg.sam:
                    seen.append((x, target))
                sums["loss"] += loss.item() * len(y)
                sums["correct"] += (logits.argmax(1) == y).sum().item()
                sums["seen"] += len(y)
        except RuntimeError:  # the loader's workers ended by a signal: the step did not happen
            self.restore(buffers)
            raise
        if seen:
            self.sam_gradient(seen)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = nn.utils.get_total_norm([p.grad for p in params])
        if torch.isfinite(norm):  # the same on every rank: DDP has averaged the gradients
            s.bad_steps = 0
            if cfg.clip_grad:
                nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, norm)
            self.opt.step()
            for k, v in sums.items():
                s.sums[k] += v
        else:  # an overflow: skip the step rather than let a NaN into the weights or the statistics
            s.bad_steps += 1
            s.sums["skipped"] = s.sums.get("skipped", 0.0) + 1
            s.sums["skipped_images"] = s.sums.get("skipped_images", 0.0) + sums["seen"]
            self.restore(buffers)
        self.opt.zero_grad(set_to_none=True)
        if s.bad_steps >= self.MOST_BAD_STEPS:
            raise Diverged(
                f"training diverged at epoch {s.epoch + 1}, step {s.step_in_epoch + 1}: the gradient was not a "
                f"finite number in {s.bad_steps} steps in a row (none of them was taken). Train again in a new "
                f"--out with a lower --lr (this run's is {cfg.lr:g}){self.or_clip()}"
            )
        if self.ema is not None and not s.bad_steps:
            self.ema.update_parameters(self.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return lr, wait

    def restore(self, buffers: list[torch.Tensor]) -> None:
        """Put back the model's buffers (BatchNorm's statistics) as they were before a step."""
        with torch.no_grad():
            for b, v in zip(self.model.buffers(), buffers):
                b.copy_(v)

    def or_clip(self) -> str:
        """The other remedy for an overflow, where the run has not taken it."""
        return "" if self.cfg.clip_grad else " or with --clip-grad 1"

    def micro_batches(self) -> int:
        """Micro-batches in the current step: ``grad_accum``, fewer in an epoch's last step when
        the epoch's batches do not divide evenly (every rank has as many)."""
        left = self.batches_per_epoch - self.state.step_in_epoch * self.cfg.grad_accum
        return max(1, min(self.cfg.grad_accum, left))

    def forward_backward(self, x: torch.Tensor, target: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's loss and its gradient, added to the step's; under DDP the ranks
        average the step's gradient on its ``last`` micro-batch."""
        cfg = self.cfg
        ctx = self.net.no_sync() if (self.d.world > 1 and not last) else nullcontext()
        with ctx, self.autocast():
            logits = self.fwd(x)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
        (loss / cfg.grad_accum).backward()
        return logits, loss

    def sam_gradient(self, seen: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Sharpness-aware minimisation (Foret et al. 2021): replace the step's gradient g by the
        gradient at w + rho g / |g| on the same images, then put the weights back. The second
        pass leaves BatchNorm's running statistics alone (it sees perturbed weights), and under
        DDP every rank moves the same way, since g is already averaged over the ranks."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        with torch.no_grad():
            scale = self.cfg.sam / (nn.utils.get_total_norm([p.grad for p in params]) + 1e-12)
            original = [p.detach().clone() for p in params]
            for p in params:
                p.add_(p.grad * scale.to(p.dtype))
            buffers = [b.detach().clone() for b in self.model.buffers()]  # BatchNorm's statistics
        self.opt.zero_grad(set_to_none=True)
        try:
            for micro, (x, target) in enumerate(seen):
                self.forward_backward(x, target, last=micro == len(seen) - 1)
        finally:
            with torch.no_grad():
                for p, w in zip(params, original):
                    p.copy_(w)
            self.restore(buffers)

    def first_estimate(self) -> None:
        """The run's first length, from its first six steps (the time budget)."""
        s = self.state
        if self.budget is None or s.fitted or s.epoch != 0:
            return
        if s.step_in_epoch == min(6, self.steps_per_epoch):
            step = s.sums["step"] / s.step_in_epoch
            share = len(self.val_ds) / max(len(self.train_ds), 1)
            share *= 2 if self.model.config.mirror_average else 1  # validation's two views
            elapsed = time.perf_counter() - self.started
            self.set_total_epochs(self.budget.first_estimate(step, self.steps_per_epoch, share, elapsed),
                                  self.budget.epoch_guess(step, self.steps_per_epoch, share))  # fmt: skip

    def train_epoch(self) -> dict:
        """The rest of the current epoch (all of it, unless resuming mid-epoch); raises ``Stop``
        after saving a checkpoint when the ranks agree to stop."""
        s, cfg = self.state, self.cfg
        self.net.train()
        self.sampler.set_epoch(s.epoch, start=s.step_in_epoch * cfg.grad_accum * cfg.batch_size)
        bar = tqdm(
            total=self.steps_per_epoch, initial=s.step_in_epoch, desc=f"epoch {s.epoch + 1}/{s.total_epochs}",
            disable=not (self.d.main and sys.stderr.isatty()), leave=False, dynamic_ncols=True, unit="step",
        )  # fmt: skip
        batches, t_epoch, seen0 = iter(self.loader), time.perf_counter(), s.sums["seen"]
        while s.step_in_epoch < self.steps_per_epoch:
            t0, before = time.perf_counter(), dict(s.sums)
            try:
                lr, wait = self.train_step(batches)
            except Diverged:
                bar.close()
                raise
            except RuntimeError:  # e.g. SIGTERM to the process group ended the loader's workers
                if self.signals.received is None:
                    raise
                s.sums = before  # the step did not happen: save the state from before it
                self.opt.zero_grad(set_to_none=True)
                bar.close()
                self.save_checkpoint()
                raise Stop() from None
            s.sums["wait"] += wait
            s.sums["lr"] = lr
            s.sums["step"] += time.perf_counter() - t0
            s.step_in_epoch += 1
            s.global_step += 1
            seen = max(s.sums["seen"], 1)
            bar.set_postfix(
                loss=f"{s.sums['loss'] / seen:.3f}", acc=f"{s.sums['correct'] / seen:.3f}", lr=f"{lr:.2e}",
                img_s=f"{(s.sums['seen'] - seen0) * self.d.world / (time.perf_counter() - t_epoch):.0f}",
            )  # fmt: skip
            bar.update(1)
            if not s.fitted:
                self.first_estimate()
                if s.fitted:  # the bar's "epoch 1/N" follows the length the budget just chose
                    bar.set_description(f"epoch {s.epoch + 1}/{s.total_epochs}", refresh=False)
            if self.stop_requested():
                bar.close()
                self.save_checkpoint()
                raise Stop()
        bar.close()
        if s.sums.get("skipped") and self.d.main:
            self.log(
                f"epoch {s.epoch + 1}: skipped {s.sums['skipped']:.0f} step(s) whose gradient was not a finite number "
                f"(an overflow); if this goes on, train again with a lower --lr{self.or_clip()}"
            )
        seen = s.sums["seen"] or math.nan  # every step skipped: no loss to report
        images = s.sums["seen"] + s.sums.get("skipped_images", 0.0)
        return dict(
            train_loss=s.sums["loss"] / seen,
            train_acc=s.sums["correct"] / seen,
            data_wait=s.sums["wait"] / max(s.sums["step"], 1e-9),
            images_per_s=images * self.d.world / max(s.sums["step"], 1e-9),
            lr=s.sums.get("lr", 0.0),
        )

    # ----- evaluation and selection ----------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, loader=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (N, K) and labels (N,) over the validation set (or ``loader``)."""
        model.eval()
        probs, labels = [], []
        for x, y in loader or self.val_loader:
            with self.autocast():
                logits = model(x.to(self.device))
            probs.append(logits.float().softmax(-1).cpu())
            labels.append(y)
        return torch.cat(probs), torch.cat(labels)

    def ema_batchnorm(self) -> None:
        """The averaged conv stem's BatchNorm statistics, measured under its own weights
        (``torch.optim.swa_utils.update_bn``) on the epoch's last training batches, not only
        averaged from the raw model's: an average of statistics does not fit an average of
        weights that are still moving. A 1-minute run on 100 digits ended with averaged weights
        that scored 44.9% on test with averaged statistics and 95.1% with statistics re-measured
        on its training images (a one-off check of the same weights; the raw model's last
        weights: 95.1%). Once an epoch, on batches kept as they went by (before mixup or
        cutmix; a short last batch counts as much as a full one): a pass after every step
        cost a fifth of the epochs on 32 px shapes. Batches a resumed run did not see are made
        again (augmentation is a function of seed, epoch and image), so it measures the same."""
        if self.ema_stem is None:
            return
        order, size, epoch = self.sampler.indices(), self.cfg.batch_size, self.sampler.epoch
        total = -(-len(order) // size)  # the epoch's batches on this rank
        with torch.random.fork_rng(devices=[]):  # the dataset seeds the CPU generator per image
            earlier = [
                torch.stack([self.train_ds[i, epoch][0] for i in order[j * size : (j + 1) * size]]).to(self.device)
                for j in range(total - self.bn_batches, total - len(self.recent))
            ]
        with self.autocast():
            update_bn([*earlier, *self.recent], self.ema_stem)
        self.recent.clear()

    def evaluate(self) -> dict:
        """Validation loss and accuracy of the raw weights and, if kept, their EMA (its conv
        stem's BatchNorm statistics measured first: ``ema_batchnorm``)."""
        self.ema_batchnorm()
        out = {}
        candidates = [("raw", self.model)] + ([("ema", self.ema.module)] if self.ema is not None else [])
        for name, m in candidates:
            p, y = self.predict(m)
            correct = p.argmax(1) == y
            out[name] = dict(
                loss=F.nll_loss(p.clamp_min(1e-12).log(), y).item(), acc=correct.float().mean().item(), correct=correct
            )
        return out

    def check_finite(self, scores: dict) -> None:
        """Raise ``Diverged`` when the raw weights, or their validation loss, are not finite numbers
        on some rank: steps with finite gradients can still have moved the weights out of range (a
        learning rate far too high), and no such weights may be kept."""
        bad = not math.isfinite(scores["raw"]["loss"]) or not all(
            torch.isfinite(t).all() for t in self.model.state_dict().values() if t.is_floating_point()
        )  # a BatchNorm variance of inf, say, can still give a finite loss
        if self.d.world > 1:  # each rank's BatchNorm statistics are its own: agree on it
            t = torch.tensor([float(bad)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            bad = bool(t.item())
        if bad:
            raise Diverged(
                f"training diverged by epoch {min(self.state.epoch + 1, self.state.total_epochs)}: its weights "
                f"(or their validation loss) are not finite numbers. Train again in a new --out with a lower "
                f"--lr (this run's is {self.cfg.lr:g}){self.or_clip()}"
            )

    def select(self, scores: dict) -> bool:
        """Keep the better of raw and EMA if it beats every earlier epoch (accuracy, then loss);
        weights whose validation loss is not finite never."""
        s = self.state
        scores = {k: v for k, v in scores.items() if math.isfinite(v["loss"])}
        if not scores:
            return False
        name = max(scores, key=lambda k: rank(scores[k]))
        best = scores[name]
        if rank(best) <= (s.best_acc, -s.best_loss):
            return False
        s.best_acc, s.best_loss, s.best_epoch, s.best_weights = best["acc"], best["loss"], s.epoch + 1, name
        s.best_correct = best["correct"]
        if self.d.main:
            self.save_best(name)
        return True

    def settle(self, scores: dict) -> None:
        """At the end of the run: keep the last epoch's averaged (EMA) weights (its raw ones
        without an EMA, or the better of the two on validation when the EMA has averaged too
        few steps to have left the first weights behind), unless other weights were clearly
        better on the same validation images (a one-sided sign test at 5% on the images where
        the two disagree). A small validation split drawn from the training folder soon
        reaches 100% and then cannot tell epochs (or raw from averaged weights) apart, while
        the images a model meets later (new fonts, new writers) still gain from the rest of
        the schedule: on letters in fonts not in training, the last EMA weights scored 99.42%
        against the best-validation epoch's 98.46% (benchmarks/learning_5min_bestval_cpu.json)."""
        s = self.state
        scores = {k: v for k, v in scores.items() if math.isfinite(v["loss"])}  # check_finite kept "raw"
        name = "ema" if "ema" in scores else "raw"
        if name == "ema" and s.global_step < 3 / (1 - (s.ema_decay or 0.0)):
            # an EMA of too few steps is still mostly the first weights: the better of the two
            name = max(scores, key=lambda k: (*rank(scores[k]), k == "ema"))
        last = scores[name]
        if s.best_epoch == s.epoch and s.best_weights == name:
            s.kept = f"the last epoch ({name} weights), also the best on validation"
            return
        if s.best_correct is None:  # resumed from a checkpoint of an earlier version
            s.kept = f"epoch {s.best_epoch} ({s.best_weights} weights), the best on validation"
            return
        other_right = int((s.best_correct & ~last["correct"]).sum())
        last_right = int((~s.best_correct & last["correct"]).sum())
        p = sign_test(other_right, other_right + last_right)
        said = (
            f"of the validation images the two disagree on, epoch {s.best_epoch}'s {s.best_weights} weights "
            f"({s.best_acc:.1%}) got {other_right} right and the last epoch's {name} weights ({last['acc']:.1%}) "
            f"{last_right}"
        )
        if other_right > last_right and p < 0.05:
            s.kept = f"epoch {s.best_epoch} ({s.best_weights} weights), clearly better on validation: {said}"
            s.kept += f" (sign test p={p:.2g})"
            return
        s.kept = f"the last epoch ({name} weights), as good within noise: {said}"
        s.best_acc, s.best_loss, s.best_epoch, s.best_weights = last["acc"], last["loss"], s.epoch, name
        s.best_correct = last["correct"]
        if self.d.main:
            self.save_best(name)

    def log_epoch(self, row: dict, improved: bool) -> None:
        if not self.d.main:
            return
        report.append_metrics(self.run_dir / RunDir.METRICS, row)
        mixed = "mixed_" if self.mix is not None else ""  # the training scores are on blended images
        self.log(
            f"epoch {row['epoch']:>3}/{self.state.total_epochs}  {mixed}loss {row['train_loss']:.4f}  "
            f"{mixed}acc {row['train_acc']:.3f}  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.3f}"
            + (f"  ema_val_acc {row['ema_val_acc']:.3f}" if row["ema_val_acc"] != "" else "")
            + f"  {row['images_per_s']:.0f} img/s  data wait {row['data_wait']:.0%}"
            + ("  *best" if improved else "")
        )

    # ----- the whole run -------------------------------------------------------------
    def fit(self, resumed: bool = False) -> State:
        """Train -> evaluate -> select -> log, to the last epoch. Raises ``Stop`` (after saving a
        checkpoint) on SIGINT/SIGTERM. A resumed run keeps the length its budget gave it."""
        s = self.state
        mark, scores = time.perf_counter(), None
        with self.signals:
            while s.epoch < s.total_epochs:
                t0 = time.perf_counter()
                train = self.train_epoch()
                try:
                    scores = self.evaluate()
                except RuntimeError:  # the validation loader's workers ended by a signal
                    if self.signals.received is None:
                        raise
                    self.save_checkpoint()  # training of this epoch is done; resume validates it
                    raise Stop() from None
                self.check_finite(scores)
                improved = self.select(scores)
                row = dict(
                    epoch=s.epoch + 1,
                    **{k: round(v, 6) for k, v in train.items()},
                    val_loss=round(scores["raw"]["loss"], 6),
                    val_acc=round(scores["raw"]["acc"], 6),
                    ema_val_loss=round(scores["ema"]["loss"], 6) if "ema" in scores else "",
                    ema_val_acc=round(scores["ema"]["acc"], 6) if "ema" in scores else "",
                    seconds=round(time.perf_counter() - t0, 2),
                )
                s.epoch, s.step_in_epoch, s.sums = s.epoch + 1, 0, State().sums
                if self.budget is not None and not resumed:
                    # An epoch's time runs from the last refit to this one, so it includes the
                    # previous epoch's log and checkpoint save, which the budget must pay for too.
                    now = time.perf_counter()
                    took, mark = now - mark, now
                    epochs = self.budget.after_epoch(took, s.epoch, s.total_epochs, now - self.started)
                    self.set_total_epochs(epochs, self.budget.per_epoch())
                self.log_epoch(row, improved)
                self.save_checkpoint()
                if self.stop_requested() and s.epoch < s.total_epochs:  # a signal during validation
                    raise Stop()
            if not s.kept:
                if scores is None:  # resumed after the last epoch: validate it again, on its batches
                    self.sampler.set_epoch(max(s.epoch - 1, 0))
                    scores = self.evaluate()
                    self.check_finite(scores)
                self.settle(scores)
                self.save_checkpoint()
        return s
