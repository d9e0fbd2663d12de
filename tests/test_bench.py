"""The benchmark script runs end to end and records what it claims (no timing asserted)."""

import argparse
import json

import pytest

from tests.conftest import ROOT
from vit.bench import main, train_flops_per_image
from vit.model import ViTConfig


def test_bench_writes_json_and_table(tmp_path):
    res = main(
        [
            "--model",
            "Ti/16",
            "--image-size",
            "32",
            "--batch",
            "2",
            "--repeats",
            "2",
            "--iters",
            "1",
            "--modes",
            "eager",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "bench_cpu_Ti-16.json").read_text())
    assert saved["params"]["ours"] == saved["params"]["timm"] == res["params"]["ours"]
    assert saved["max_abs_logit_diff"] <= 1e-5
    train = saved["modes"]["eager"]["train"]
    assert len(train["runs"]["ours"]) == len(train["runs"]["timm"]) == 2
    assert all(v > 0 for v in train["images_per_s"].values())
    assert saved["modes"]["eager"]["saved_for_backward_bytes"]["ours"] > 0
    table = (tmp_path / "bench_cpu_Ti-16.md").read_text()
    assert "| eager |" in table and "python -m vit.bench" in table and "CPUs" in table


def test_train_flops_match_the_usual_estimate():
    # ViT-B/16 at 224 is 17.6 GMACs forward (timm's table): 35.1 GFLOPs, x3 to train = 105 GFLOPs,
    # which is what makes 3,462 img/s on a 989 TFLOPS card the 37% MFU that timm's numbers imply.
    flops = train_flops_per_image(ViTConfig.preset("B/16"))
    assert 104e9 < flops < 107e9


def test_results_files_name_no_folder_of_this_machine():
    """A results file says how to reproduce it, not where it was made: commands are quoted and
    their paths made relative to the project (or reduced to a file name), in new files and
    in every committed one; every recorded learning.py command parses."""
    import re
    import shlex

    from benchmarks.learning import parser
    from vit.bench import command_line

    line = command_line("python x.py", ["--flags", "--augment affine", "--out", str(ROOT / "benchmarks" / "a.json")])
    assert line == "python x.py --flags '--augment affine' --out benchmarks/a.json"
    assert command_line("python x.py", ["--out", "/somewhere/else/b.json"]) == "python x.py --out b.json"
    assert command_line("python x.py", ["--out=/somewhere/c.json", "--pretrained C:\\Users\\me\\w.npz"]) == (
        "python x.py --out=c.json '--pretrained w.npz'"
    )

    def strings(o):
        if isinstance(o, dict):
            for k, v in o.items():
                yield k
                yield from strings(v)
        elif isinstance(o, list):
            for v in o:
                yield from strings(v)
        elif isinstance(o, str):
            yield o

    absolute = re.compile(r"(^|[\s'\"=`])(/[A-Za-z]|[A-Za-z]:[\\/]|~/|\\\\)")
    files = sorted((ROOT / "benchmarks").glob("*.json")) + sorted((ROOT / "benchmarks").glob("*.md"))
    assert len(files) > 10
    for f in files:
        text = f.read_text(encoding="utf-8")
        lines = list(strings(json.loads(text))) if f.suffix == ".json" else text.splitlines()
        found = [s for s in lines if absolute.search(s)]
        assert not found, f"{f.name}: {found[:3]}"
        for s in lines:
            if s.startswith("python benchmarks/learning.py "):
                parser().parse_args(shlex.split(s)[2:])  # exits on a command that does not parse


def test_learning_runs_the_splits_asked_for(tmp_path, monkeypatch):
    """benchmarks/learning.py --first-seed F --seeds N: splits F .. F+N-1, each once, in the
    results, the summary and the recorded command; impossible counts are refused."""
    import benchmarks.learning as bl

    seen = []

    def one_split(name, seed, work, budget, per_class, methods, *rest):
        seen.append((name, seed))
        scores = {m: {"test_acc": 0.9 + seed / 100} for m in methods}
        return {"seed": seed, "train_images": 9, "test_images": 3, **scores}

    monkeypatch.setattr(bl, "one_split", one_split)
    out = tmp_path / "fresh splits.json"
    argv = ["--only", "digits", "--methods", "svm", "--seeds", "2", "--first-seed", "5", "--out", str(out)]
    assert bl.main(argv) == 0
    assert seen == [("digits", 5), ("digits", 6)]
    doc = json.loads(out.read_text())
    assert [r["seed"] for r in doc["results"]["digits"]] == [5, 6]
    assert doc["summary"]["digits"]["svm"]["mean"] == 0.955 and "--first-seed 5" in doc["command"]
    for bad in (["--seeds", "0"], ["--first-seed", "-1"]):
        with pytest.raises(SystemExit):
            bl.main([*argv, *bad])
    assert len(seen) == 2
    # into the same file, splits 0-1: kept beside 5-6, in order, all four in the summary
    assert bl.main([*argv[:4], "--seeds", "2", "--first-seed", "0", "--out", str(out)]) == 0
    assert seen[2:] == [("digits", 0), ("digits", 1)]
    doc = json.loads(out.read_text())
    assert [r["seed"] for r in doc["results"]["digits"]] == [0, 1, 5, 6]
    assert doc["summary"]["digits"]["svm"]["mean"] == 0.93
    # another method on one of them: summed over the splits that have it, and says how many
    assert bl.main(["--only", "digits", "--methods", "cnn", "--seeds", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["digits"]["cnn"] == {"mean": 0.9, "std": 0.0, "n": 1}
    assert doc["summary"]["digits"]["svm"]["mean"] == 0.93 and "n" not in doc["summary"]["digits"]["svm"]
    assert "| 90.00 ± 0.00 (n=1) |" in bl.table(doc) and "| 93.00 ± " in bl.table(doc)
    with pytest.raises(SystemExit):  # runs of another budget are not pooled into the file
        bl.main([*argv[:4], "--budget", "3", "--out", str(out)])


def test_ood_choice_reads_both_views_of_a_mirror_model():
    """benchmarks/ood_choice.py scores what the model and the exported file score: for a model
    that averages each image with its mirror, every feature is the same for an image and its
    mirror, and the logits are the model's own."""
    import numpy as np
    import torch
    from PIL import Image

    from benchmarks.ood_choice import features
    from vit import ViT

    torch.manual_seed(0)
    cfg = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64, num_classes=3, stem="conv")
    model = ViT(ViTConfig(**cfg, pool="avg", class_token=False, mirror_average=True)).eval()
    prep = dict(image_size=[16, 16], mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic", crop_pct=1.0)
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    images = [Image.fromarray(a), Image.fromarray(np.ascontiguousarray(a[:, ::-1]))]
    f = features(model, prep, images)
    for key in ("taps", "head", "logits"):
        assert np.allclose(f[key][0], f[key][1], atol=1e-5), key
    single = features(ViT(ViTConfig(**cfg, pool="avg", class_token=False)).eval(), prep, images)
    assert not np.allclose(single["taps"][0], single["taps"][1], atol=1e-3)  # the check can fail
    with torch.no_grad():
        x = torch.from_numpy(np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images]))
        assert np.allclose(f["logits"], model(x).double().numpy(), atol=1e-5)


def test_the_baselines_schedule_fills_its_budget(monkeypatch):
    """benchmarks/learning.py's ordinary recipe (the ResNet-18's and timm ViT's) refits its
    length from the measured epochs, so a slow first epoch does not end the run early."""
    import time

    import numpy as np
    import torch

    from benchmarks.learning import ordinary_recipe

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 2, 64)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    epochs, randperm = [], torch.randperm

    def counted(n, *a, **k):  # each epoch starts with one permutation of the images
        epochs.append(n)
        return randperm(n, *a, **k)

    def slow_first_epoch(module, args):  # its one step takes a third of the budget
        if module.training and len(epochs) == 1:
            time.sleep(1.0)

    monkeypatch.setattr(torch, "randperm", counted)
    model.register_forward_pre_hook(slow_first_epoch)
    t0 = time.perf_counter()
    out = ordinary_recipe(model, x, y, x[:8], y[:8], budget_s=3.0, side=32, seed=0, lr=1e-3)
    assert time.perf_counter() - t0 >= 0.9 * 3.0 and out["epochs"] > 10


def test_stem_latency_times_each_depth_against_the_first(tmp_path, monkeypatch):
    """benchmarks/mirror_latency.py --stem-depths: a row per input size and depth, each depth's
    ratio against the first depth's plain file, and a command that names the flags given."""
    import benchmarks.mirror_latency as ml

    monkeypatch.setattr(ml, "RECIPE_SIZES", ((8, 2),))  # one of the recipe's sizes: quick
    out = tmp_path / "stem latency.json"
    doc = ml.main(["--stem-depths", "1", "2", "--rounds", "2", "--calls", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == doc
    assert [(r["input"], r["stem_depth"]) for r in doc["rows"]] == [("8 px / patch 2", 1), ("8 px / patch 2", 2)]
    assert all(r["plain_vs_first"] == 1.0 for r in doc["rows"] if r["stem_depth"] == 1)
    assert all(r["plain_ms"] > 0 and r["mirror_ms"] > 0 for r in doc["rows"])
    assert doc["command"].startswith("python benchmarks/mirror_latency.py --stem-depths 1 2 --rounds 2")
    assert str(tmp_path) not in doc["command"]


def test_latency_sizes_are_the_ones_asked_for(tmp_path):
    """benchmarks/mirror_latency.py --sizes PX/PATCH --encoders DEPTHxWIDTH: a row per size and
    encoder given, in order, repeats once, each against the first row; a size the
    model refuses (the patch does not divide the input, or is no power of 2 for the conv stem) is
    refused when parsed, with the model's reason."""
    import benchmarks.mirror_latency as ml

    out = tmp_path / "grid.json"
    argv = ["--stem-depths", "2", "--sizes", "8/2", "16/2", "--encoders", "6x128", "4X96", "6x128", "--rounds", "1"]
    doc = ml.main([*argv, "--calls", "1", "--out", str(out)])
    assert [(r["input"], r["encoder"]) for r in doc["rows"]] == [
        ("8 px / patch 2", "6x128"), ("8 px / patch 2", "4x96"),
        ("16 px / patch 2", "6x128"), ("16 px / patch 2", "4x96"),
    ]  # fmt: skip
    assert all(r["stem_depth"] == 2 for r in doc["rows"])
    first = doc["rows"][0]["plain_ms"]
    assert doc["rows"][0]["plain_vs_first_row"] == 1.0
    # the ratios come from the unrounded times: the rounded ones carry a relative error of 1e-3 or less
    ratio = [pytest.approx(r["plain_ms"] / first, rel=2e-3, abs=0.011) for r in doc["rows"]]
    assert all(r["plain_vs_first_row"] == want for r, want in zip(doc["rows"], ratio))
    assert ml.encoder("6x96") == (6, 96)
    from vit.recipe import GLYPH_GRID_MODEL, model_for

    # the timed encoders are the recipe's: its small model, and 6x96 its narrowed one for the 8x8 grid
    for cfg, model in ((ml.model_config(16, 2, 2), model_for(0)), (ml.model_config(16, 2, 2, 6, 96), GLYPH_GRID_MODEL)):
        assert dict(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim) == model
    for text, why in (("0x128", "at least one"), ("6x100", "multiple of 32"), ("6", "as in")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            ml.encoder(text)
    assert ml.input_and_patch("16/4") == (16, 4)
    for text, why in (("16/3", "not divisible"), ("24/6", "power of 2"), ("8/1", "power of 2"), ("16/0", "positive"),
                      ("16", "as in")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            ml.input_and_patch(text)


def test_shifted_views_move_the_image_and_repeat_its_edges():
    """benchmarks/budget_spend.py's views: a whole-pixel shift moves every pixel and repeats the
    edge it uncovers; a fraction of a pixel weighs its two neighbours by nearness; none is the image."""
    import torch

    from benchmarks.budget_spend import shifted, view_sets

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(shifted(x, 0, 0), x)
    right = shifted(x, 1, 0)
    assert torch.equal(right[..., 1:], x[..., :-1]) and torch.equal(right[..., 0], x[..., 0])
    up = shifted(x, 0, -2)
    assert torch.equal(up[..., :-2, :], x[..., 2:, :]) and torch.equal(up[..., -1, :], x[..., -1, :])
    assert torch.equal(up[..., -2, :], x[..., -1, :])
    assert torch.allclose(shifted(x, 0.25, 0), 0.75 * x + 0.25 * shifted(x, 1, 0))
    assert torch.allclose(shifted(x, 0, -0.75), 0.25 * x + 0.75 * shifted(x, 0, -1))
    sets = view_sets(4.0)  # a 32 px input from 8 px images: 4 input px per native px
    assert sets["cross 1 px (5 views)"][1] == (4.0, 0) and len(sets["diagonal 0.25 px (3 views)"]) == 3
