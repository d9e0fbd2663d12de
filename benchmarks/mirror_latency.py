"""What the exported file's options cost: onnxruntime latency at batch 1, 2 threads,
attention map included, for the CPU recipe's small-data model (6 blocks, width 128, conv
stem, mean pooling) at three input sizes, with and without predicting from the mirror too
(``mirror_average``); with several conv stem depths (``--stem-depths``), each depth at every
input size the CPU recipe picks; or at the input sizes and patches given (``--sizes``), with
the encoders given (``--encoders``: depth and width, heads as wide as the recipe's, an MLP twice the width).

    python benchmarks/mirror_latency.py                      # about a minute; writes benchmarks/mirror_latency_cpu.json
    python benchmarks/mirror_latency.py --stem-depths 1 2 --out benchmarks/stem_latency_cpu.json  # about 5 minutes
    python benchmarks/mirror_latency.py --stem-depths 2 --sizes 8/2 16/2 --out benchmarks/grid_latency_cpu.json  # 30 s
    python benchmarks/mirror_latency.py --stem-depths 2 --sizes 8/2 12/2 16/2 --encoders 6x128 6x96 4x128 \
        --out benchmarks/grid_encoder_latency_cpu.json  # about a minute

The files are timed in rotating blocks (every file once per round, 15 rounds of 40 calls),
so a machine that speeds up or slows down affects them alike; medians of the rounds. Random
weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = ((32, 8), (64, 8), (128, 16))  # (input px, patch): 4x4, 8x8 and 8x8 token grids
# Every (input, patch) vit.recipe.input_size_for gives on a CPU: digit-sized images at 8 px
# (many) and 16 / 2 (few; timed here with the 6x128 model, not the narrower one the recipe
# gives them: --encoders), glyphs at 16 px, 32 and 64 px with a short budget's 4x4 grid and a
# longer one's 8x8, larger images at 128 / 16.
RECIPE_SIZES = ((8, 2), (16, 2), (16, 4), (32, 8), (32, 4), (64, 16), (64, 8), (128, 16))


def input_and_patch(text: str) -> tuple[int, int]:
    """``--sizes``' "PX/PATCH", e.g. "16/2": a 16 px input in 2 px patches."""
    try:
        size, patch = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give an input size and a patch, as in 16/2") from None
    if size < 1 or patch < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the input size and the patch must be positive")
    try:
        model_config(size, patch, 1)  # the model's own checks: the patch divides the input, the stem's power of 2
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return size, patch


def encoder(text: str) -> tuple[int, int]:
    """``--encoders``' "DEPTHxWIDTH", e.g. "6x96": 6 blocks of width 96."""
    try:
        depth, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a depth and a width, as in 6x128") from None
    head = head_width()
    if depth < 1 or width < head or width % head:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one block, and a width that is a multiple of {head}")
    return depth, width


def head_width() -> int:
    """The width of one attention head in the recipe's small model (32)."""
    from vit.recipe import model_for

    small = model_for(0)
    return small["dim"] // small["heads"]


def model_config(size: int, patch: int, stem_depth: int, depth: int | None = None, width: int | None = None):
    """The CPU recipe's small-data model (``vit.recipe.model_for``: 6 blocks of width 128) at
    one input size, patch and conv stem depth, or with another depth and width, its heads as
    wide as the recipe's and its MLP as many times the width."""
    from vit import ViTConfig
    from vit.recipe import model_for

    small = model_for(0)
    depth, width = depth or small["depth"], width or small["dim"]
    return ViTConfig(
        image_size=size, patch_size=patch, num_classes=10, dim=width, depth=depth,
        heads=width // head_width(), mlp_dim=width * small["mlp_dim"] // small["dim"],
        stem="conv", stem_depth=stem_depth, class_token=False, pool="avg", fc_norm=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    import onnxruntime as ort
    import torch

    from export.onnx_export import to_onnx
    from vit import ViT
    from vit.bench import command_line, machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--stem-depths", type=int, nargs="+", default=[1],
                   help="conv stem depths to time (default 1); more than one: at every recipe input size, "
                        "each against the first depth")  # fmt: skip
    p.add_argument("--sizes", type=input_and_patch, nargs="+", default=None, metavar="PX/PATCH",
                   help="input sizes and patches to time, e.g. 8/2 16/2 (default: three sizes; with "
                        "several --stem-depths every size the recipe picks)")  # fmt: skip
    p.add_argument("--encoders", type=encoder, nargs="+", default=[(6, 128)], metavar="DEPTHxWIDTH",
                   help="encoders to time at every size and stem depth (default 6x128, the recipe's small model); "
                        "with --sizes or several encoders, each row against the first row's plain file")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "mirror_latency_cpu.json")
    a = p.parse_args(argv)
    a.encoders = list(dict.fromkeys(a.encoders))
    several = len(a.stem_depths) > 1
    sizes = list(dict.fromkeys(a.sizes)) if a.sizes else RECIPE_SIZES if several else SIZES
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    files = {}
    for (size, patch), depth, blocks in itertools.product(sizes, a.stem_depths, a.encoders):
        cfg = model_config(size, patch, depth, *blocks)
        x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
        for mirror in (False, True):
            torch.manual_seed(0)
            model = ViT(dataclasses.replace(cfg, mirror_average=mirror)).eval()
            proto = to_onnx(model, attention=True).SerializeToString()
            session = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])
            for _ in range(30):
                session.run(None, {"pixel_values": x})
            files[(size, patch, depth, blocks, mirror)] = (session, x, [])
    for _ in range(a.rounds):
        for session, x, times in files.values():
            t = time.perf_counter()
            for _ in range(a.calls):
                session.run(None, {"pixel_values": x})
            times.append((time.perf_counter() - t) / a.calls * 1e3)
    rows = []
    against_first_row = bool(a.sizes) or len(a.encoders) > 1
    first_row = None
    for (size, patch), depth, blocks in itertools.product(sizes, a.stem_depths, a.encoders):
        base = float(np.median(files[(size, patch, a.stem_depths[0], blocks, False)][2]))
        plain, both = (float(np.median(files[(size, patch, depth, blocks, m)][2])) for m in (False, True))
        first_row = first_row or plain
        row = dict(input=f"{size} px / patch {patch}", plain_ms=round(plain, 3), mirror_ms=round(both, 3),
                   ratio=round(both / plain, 2))  # fmt: skip
        line = f"{size:>4} px / patch {patch:>2}: {plain:6.3f} ms plain, {both:6.3f} ms with the mirror "
        line += f"({both / plain:.2f}x)"
        if a.stem_depths != [1]:
            row["stem_depth"] = depth
        if a.encoders != [(6, 128)]:
            row["encoder"] = f"{blocks[0]}x{blocks[1]}"
            line += f", {blocks[0]} blocks x {blocks[1]}"
        if several:
            row.update(plain_vs_first=round(plain / base, 2), mirror_vs_first=round(both / base, 2))
            line += f", stem depth {depth}: {plain / base:.2f}x and {both / base:.2f}x"
            line += f" depth {a.stem_depths[0]}'s plain file"
        if against_first_row:
            row["plain_vs_first_row"] = round(plain / first_row, 2)
            line += f"; {plain / first_row:.2f}x the first row's plain file"
        rows.append(row)
        print(line)
    command = command_line("python benchmarks/mirror_latency.py", sys.argv[1:] if argv is None else list(argv))
    doc = {"command": command, "machine": machine(), "rows": rows}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
