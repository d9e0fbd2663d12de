"""Batch-1 CPU latency: PyTorch eager against our ONNX files (fp32, and int8).

    python -m export.bench                   # ViT-Ti/16 and ViT-S/16 at 224 px
    python -m export.bench --models Ti/16 --runs 100

Every engine gets the same number of threads (the CPUs this process may use). The
engines take turns in short blocks, in a rotating order, so slow drift in the machine
hits all of them alike, and onnxruntime's idle threads sleep rather than spin, so they
take no CPU from PyTorch; the median of many runs is reported. Weights are random (speed
does not depend on them); int8 accuracy is gated on real validation data by
``python -m export RUN_DIR --int8``, not here. As an anchor, timm's own model goes through
the same exporter and quantisation, so the int8 gain this CPU allows can be told apart from
what our export does. Writes benchmarks/onnx_latency_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import export_module, ort_session, quantize_int8, save_proto, to_onnx
from vit import files
from vit.bench import command_line, machine
from vit.convert import from_timm, timm_kwargs
from vit.cpus import usable_cpus
from vit.model import ViTConfig

DEFAULT_NAME = "onnx_latency_cpu.json"


def engines_for(variant: str, tmp: Path) -> dict:
    import timm.models.vision_transformer as tvit

    cfg = ViTConfig.preset(variant, num_classes=1000)
    torch.manual_seed(0)
    ref = tvit.VisionTransformer(**timm_kwargs(cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = from_timm(ref).eval()
    paths = {}
    for name, attention in (("fp32", True), ("fp32_logits_only", False)):
        paths[name] = tmp / f"{name}.onnx"
        save_proto(to_onnx(ours, attention), paths[name])
    paths["int8"] = tmp / "int8.onnx"
    quantize_int8(paths["fp32"], paths["int8"])
    # The anchor: timm's own model through the same exporter and the same quantisation.
    paths["timm_fp32"], paths["timm_int8"] = tmp / "timm_fp32.onnx", tmp / "timm_int8.onnx"
    save_proto(export_module(ref, torch.randn(2, 3, 224, 224), ["logits"]), paths["timm_fp32"])
    quantize_int8(paths["timm_fp32"], paths["timm_int8"])
    sessions = {k: ort_session(v, threads=usable_cpus(), spin=False) for k, v in paths.items()}

    def torch_fn(model):
        def run(x):
            with torch.inference_mode():
                model(torch.from_numpy(x))

        return run

    def ort_fn(sess):
        return lambda x: sess.run(None, {"pixel_values": x})

    return {
        "pytorch_eager_ours": torch_fn(ours),
        "pytorch_eager_timm": torch_fn(ref),
        "onnxruntime_fp32": ort_fn(sessions["fp32"]),
        "onnxruntime_fp32_logits_only": ort_fn(sessions["fp32_logits_only"]),
        "onnxruntime_int8": ort_fn(sessions["int8"]),
        "onnxruntime_fp32_timm": ort_fn(sessions["timm_fp32"]),
        "onnxruntime_int8_timm": ort_fn(sessions["timm_int8"]),
    }, {k: round(v.stat().st_size / 2**20, 2) for k, v in paths.items()}


def measure(engines: dict, runs: int, warmup: int, block: int = 5) -> dict[str, list[float]]:
    """Engines take turns in blocks of ``block`` images, in a rotating order; the first image of
    each block is not timed, so no engine pays for the previous one's threads winding down."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for fn in engines.values():
        for _ in range(warmup):
            fn(x)
    names = list(engines)
    times = {n: [] for n in names}
    for i in range(max(1, runs // (block - 1))):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            engines[n](x)
            for _ in range(block - 1):
                t0 = time.perf_counter()
                engines[n](x)
                times[n].append((time.perf_counter() - t0) * 1000)
    return times


def output_path(out: Path) -> Path:
    """``out`` if it names a .json file, else ``out/DEFAULT_NAME``; its folder is created and
    must be writable."""
    path = out if out.suffix == ".json" and not out.is_dir() else out / DEFAULT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise SystemExit(f"error: cannot write to {path.parent}")
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m export.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="Ti/16,S/16")
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks") / DEFAULT_NAME, help=f"a .json file or a folder ({DEFAULT_NAME})"
    )  # fmt: skip
    a = p.parse_args(argv)
    out = output_path(a.out)  # decided before minutes of measuring, not after
    threads = usable_cpus()
    torch.set_num_threads(threads)
    doc = dict(
        machine=machine(),
        threads=threads,
        batch=1,
        image_size=224,
        runs=a.runs,
        command=command_line("python -m export.bench", sys.argv[1:] if argv is None else argv),
        results={},
    )
    for variant in a.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            engines, sizes = engines_for(variant, Path(tmp))
            times = measure(engines, a.runs, a.warmup)
        med = {k: round(statistics.median(v), 2) for k, v in times.items()}
        base = med["pytorch_eager_ours"]
        doc["results"][variant] = dict(
            median_ms=med,
            ratio_to_pytorch_eager={k: round(v / base, 3) for k, v in med.items()},
            p10_ms={k: round(float(np.percentile(v, 10)), 2) for k, v in times.items()},
            p90_ms={k: round(float(np.percentile(v, 90)), 2) for k, v in times.items()},
            file_mib=sizes,
        )
        print(f"ViT-{variant}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), flush=True)
    files.write_json(out, doc)
    print(f"wrote {out}")
    print(markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    lines = [
        "| model | PyTorch eager (ours) | PyTorch eager (timm) | ORT fp32 | ORT fp32, logits only | ORT int8 "
        "| int8 / PyTorch | timm: ORT fp32 | timm: ORT int8 | timm: int8 / PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in doc["results"].items():
        m = r["median_ms"]
        lines.append(
            f"| ViT-{v} | {m['pytorch_eager_ours']:.1f} ms | {m['pytorch_eager_timm']:.1f} ms | "
            f"{m['onnxruntime_fp32']:.1f} ms | {m['onnxruntime_fp32_logits_only']:.1f} ms | "
            f"{m['onnxruntime_int8']:.1f} ms | {r['ratio_to_pytorch_eager']['onnxruntime_int8']:.2f} | "
            f"{m['onnxruntime_fp32_timm']:.1f} ms | {m['onnxruntime_int8_timm']:.1f} ms | "
            f"{m['onnxruntime_int8_timm'] / m['pytorch_eager_timm']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
