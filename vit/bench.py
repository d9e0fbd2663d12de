"""Our ViT against timm's VisionTransformer: exactness, speed and memory, same weights.

    python -m vit.bench                       # ViT-S/16, batch 32 on CPU (256 on CUDA)
    python -m vit.bench --model B/16 --modes eager,compile

Both models are built from one config, ours loaded with timm's weights. Each measurement
runs the two models in turn, alternating which goes first, and the reported number is the
median over repeats, so drift in clock speed or background load hits both alike.
Training is forward + backward + AdamW step. CPU runs fp32; CUDA runs bf16 autocast with
fused AdamW. Writes ``benchmarks/bench_<device>.json`` and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath

import torch
from torch import nn

from vit.convert import from_timm, timm_kwargs
from vit.cpus import usable_cpus
from vit.model import ViTConfig

# Dense bf16 tensor-core peak, TFLOPS, for MFU (NVIDIA datasheets, SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "L40S": 362.0}


def portable(arg: str) -> str:
    """``arg`` with no path of this machine in it: a path inside the project relative to it,
    another absolute path (POSIX, Windows or ~) as its file name, anything else as it is;
    ``--opt=PATH`` and words of a quoted argument one by one."""
    import re

    if " " in arg:
        return " ".join(portable(word) for word in arg.split(" "))
    if arg.startswith("-") and "=" in arg:
        opt, value = arg.split("=", 1)
        return f"{opt}={portable(value)}"
    if re.match(r"^([A-Za-z]:[\\/]|\\\\|~)", arg):
        return PureWindowsPath(arg).name if "\\" in arg else Path(arg).name
    path = Path(arg)
    if not path.is_absolute() or not path.name:
        return arg
    try:
        return path.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        return path.name


def command_line(prog: str, argv: list[str]) -> str:
    """The command as a user would type it, for a results file: quoted, and ``portable``, so the
    file says how to reproduce it and nothing about where it was made."""
    import shlex

    return " ".join([prog, *(shlex.quote(portable(a)) for a in argv)])


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if cpu and flags:
                break
    except OSError:
        pass
    relevant = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")  # what CPU kernels use
    info = dict(
        cpu=cpu,
        cpu_flags=[f for f in relevant if f in flags],
        cpus_usable=usable_cpus(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
    )
    import timm

    info["timm"] = timm.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def train_flops_per_image(cfg: ViTConfig) -> float:
    """Matmul FLOPs of one training image (3x forward) for the standard ViT, as MFU counts them."""
    n, d, m = cfg.num_patches + cfg.num_prefix_tokens, cfg.dim, cfg.mlp_dim
    per_block = 2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d  # dense layers + QK^T and AV
    embed = 2 * cfg.num_patches * (cfg.patch_size**2 * cfg.in_chans) * d
    head = 2 * d * cfg.num_classes
    return 3.0 * (cfg.depth * per_block + embed + head)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, autocast) -> int:
    """Bytes of tensors autograd keeps for backward in one forward: the training memory
    that grows with batch size, measured exactly and on any device."""
    total = 0
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights are not activations

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(x).float().sum()
    return total


class Runner:
    """One model, one mode: timed inference and training steps on fixed inputs."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, compile: bool):
        self.model, self.x, self.y, self.device = model.to(device), x, y, device
        self.fn = torch.compile(self.model) if compile else self.model
        cuda = device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=cuda, foreach=None if cuda else True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def infer(self, iters: int) -> float:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            self.sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                self.fn(self.x)
            self.sync()
        return len(self.x) * iters / (time.perf_counter() - t0)

    def train(self, iters: int) -> float:
        self.model.train()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            with self.autocast():
                loss = nn.functional.cross_entropy(self.fn(self.x), self.y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.sync()
        return len(self.x) * iters / (time.perf_counter() - t0)

    def peak_cuda_bytes(self, kind: str) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        getattr(self, kind)(1)
        return torch.cuda.max_memory_allocated()


def interleaved(runners: dict[str, Runner], kind: str, repeats: int, iters: int, warmup: int) -> dict[str, list[float]]:
    for r in runners.values():
        getattr(r, kind)(warmup)
    results = {name: [] for name in runners}
    names = list(runners)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            results[name].append(getattr(runners[name], kind)(iters))
    return results


# The benchmark's protocol in one place (set-up, interleaved measurements, the record), so
# what was measured can be read without jumping between helpers.
def run(args: argparse.Namespace) -> dict:
    import timm.models.vision_transformer as tvit

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = args.batch or (256 if device.type == "cuda" else 32)
    cfg = ViTConfig.preset(args.model, image_size=args.image_size, num_classes=args.num_classes)
    torch.manual_seed(0)
    ref = tvit.VisionTransformer(**timm_kwargs(cfg))
    with torch.no_grad():  # move every weight off its init so the exactness check means something
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = from_timm(ref)
    x = torch.randn(batch, 3, *cfg.image_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    with torch.no_grad():  # exactness: fp32, eval, on a small batch
        ref.eval(), ours.eval()
        xs = x[:4].float().cpu()
        max_diff = (ref(xs) - ours(xs)).abs().max().item()

    result = dict(
        model=args.model,
        config=cfg.to_dict(),
        batch=batch,
        device=device.type,
        precision="bf16 autocast" if device.type == "cuda" else "fp32",
        machine=machine(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command_line("python -m vit.bench", args.argv),
        params={"ours": ours.num_params(), "timm": sum(p.numel() for p in ref.parameters())},
        max_abs_logit_diff=max_diff,
        modes={},
    )
    peak = args.peak_tflops or next(
        (v for k, v in PEAK_BF16_TFLOPS.items() if k in result["machine"].get("gpu", "")), None
    )
    flops = train_flops_per_image(cfg)
    for mode in args.modes.split(","):
        print(f"[{mode}] building runners ...", flush=True)
        runners = {
            "ours": Runner(ours, x, y, device, compile=mode == "compile"),
            "timm": Runner(ref, x, y, device, compile=mode == "compile"),
        }
        entry = {}
        for kind in ("infer", "train"):
            speeds = interleaved(runners, kind, args.repeats, args.iters, args.warmup)
            med = {k: statistics.median(v) for k, v in speeds.items()}
            entry[kind] = dict(
                images_per_s={k: round(v, 2) for k, v in med.items()},
                runs={k: [round(s, 2) for s in v] for k, v in speeds.items()},
                ratio_ours_over_timm=round(med["ours"] / med["timm"], 4),
                peak_cuda_bytes={k: r.peak_cuda_bytes(kind) for k, r in runners.items()},
            )
            if kind == "train" and peak and device.type == "cuda":
                entry[kind]["mfu"] = {k: round(v * flops / (peak * 1e12), 4) for k, v in med.items()}
            print(
                f"[{mode}] {kind}: ours {med['ours']:.1f} img/s, timm {med['timm']:.1f} img/s, "
                f"ratio {med['ours'] / med['timm']:.3f}",
                flush=True,
            )
        autocast = runners["ours"].autocast
        entry["saved_for_backward_bytes"] = (
            {k: saved_activation_bytes(r.model, x, autocast) for k, r in runners.items()} if mode == "eager" else None
        )
        result["modes"][mode] = entry
        del runners
    return result


def markdown(res: dict) -> str:
    m = res["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpus_usable']} CPUs"
    lines = [
        f"ViT-{res['model']} at {res['config']['image_size'][0]}px, batch {res['batch']}, {res['precision']}, "
        f"{where}; torch {m['torch']}, timm {m['timm']}.",
        f"Parameters: ours {res['params']['ours']:,}, timm {res['params']['timm']:,}; "
        f"max |Δ logits| {res['max_abs_logit_diff']:.1e}.",
        "",
        "| mode | inference img/s ours | timm | ratio | training img/s ours | timm | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, e in res["modes"].items():
        i, t = e["infer"], e["train"]
        lines.append(
            f"| {mode} | {i['images_per_s']['ours']:.1f} | {i['images_per_s']['timm']:.1f} | "
            f"**{i['ratio_ours_over_timm']:.3f}** | {t['images_per_s']['ours']:.1f} | "
            f"{t['images_per_s']['timm']:.1f} | **{t['ratio_ours_over_timm']:.3f}** |"
        )
    eager = res["modes"].get("eager")
    if eager and eager["saved_for_backward_bytes"]:
        s = eager["saved_for_backward_bytes"]
        lines += [
            "",
            f"Activation memory saved for backward (one batch): ours {s['ours'] / 2**20:.0f} MiB, "
            f"timm {s['timm'] / 2**20:.0f} MiB.",
        ]
    for mode, e in res["modes"].items():
        p = e["train"]["peak_cuda_bytes"]
        if p.get("ours"):
            lines.append(
                f"Peak CUDA memory, training ({mode}): ours {p['ours'] / 2**30:.2f} GiB, "
                f"timm {p['timm'] / 2**30:.2f} GiB."
            )
        if "mfu" in e["train"]:
            lines.append(
                f"MFU, training ({mode}): ours {e['train']['mfu']['ours']:.1%}, timm {e['train']['mfu']['timm']:.1%}."
            )
    lines.append(f"\nCommand: `{res['command']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m vit.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="S/16", help="variant, e.g. Ti/16, S/16, B/16 (default S/16)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--repeats", type=int, default=5, help="interleaved measurements per model")
    p.add_argument("--iters", type=int, default=None, help="steps per measurement (default 2 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 10 CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU, if not known")
    p.add_argument("--out", default="benchmarks", help="folder for the JSON and markdown results")
    args = p.parse_args(argv)
    args.argv = argv
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.iters = args.iters or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{res['device']}_{res['model'].replace('/', '-')}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / stem}.json and .md")
    return res


if __name__ == "__main__":
    main()
