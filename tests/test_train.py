"""train.py end to end on tiny generated folders: outputs, errors, resume, DDP, overrides."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.conftest import ROOT, TINY_MODEL
from vit import ViT, ViTConfig

DETERMINISTIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_loss", "ema_val_acc", "lr")


def run_train(*args) -> int:
    return train.main([str(a) for a in args])


def metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: r[k] for k in DETERMINISTIC_COLUMNS} for r in csv.DictReader(f)]


def test_end_to_end_run_writes_everything(shapes_dir, tmp_path):
    out = tmp_path / "run"
    assert run_train("--data", shapes_dir, "--out", out, "--epochs", "2", "--workers", "0", *TINY_MODEL) == 0
    for name in (
        "model.safetensors",
        "config.json",
        "metrics.csv",
        "split.json",
        "checkpoint.pt",
        "report.md",
        "report.json",
        "curves.png",
        "confusion_matrix.png",
        "mistakes.png",
        "skipped.json",
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["labels"] == ["circle", "cross", "square", "triangle"]
    assert cfg["preprocessing"]["image_size"] == [16, 16]
    m = cfg["model"]  # the recipe's architecture reaches the model (hybrid stem, mean pooling)
    assert (m["stem"], m["pool"], m["class_token"], m["fc_norm"]) == ("conv", "avg", False, True)
    assert cfg["result"]["best_epoch"] in (1, 2)
    model = ViT(ViTConfig.from_dict(cfg["model"]))
    model.load_state_dict(load_file(out / "model.safetensors"))
    assert len(metrics(out)) == 2
    report = json.loads((out / "report.json").read_text())
    assert set(report["per_class"]) == set(cfg["labels"]) and 0 <= report["ece"] <= 1
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # no half-written files left


def test_eval_on_another_folder(shapes_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train("--data", shapes_dir, "--out", out, "--epochs", "1", "--workers", "0", *TINY_MODEL) == 0
    other = tmp_path / "other"
    (other / "square").mkdir(parents=True)
    for p in sorted((shapes_dir / "square").iterdir())[:3]:
        (other / "square" / p.name).write_bytes(p.read_bytes())
    assert run_train("--eval", out, "--data", other) == 0
    rep = json.loads((out / "eval-other" / "report.json").read_text())
    assert rep["n"] == 3 and (out / "eval-other" / "confusion_matrix.png").is_file()
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nope", "--out", "{tmp}/r"], "does not exist"),
        (["--data", "{tmp}/empty", "--out", "{tmp}/r"], "no class folders"),
        (["--out", "{tmp}/r"], "pass --data PATH and --out RUN_DIR"),
        (["--resume", "{tmp}/empty"], "holds no resumable run"),
        (["--eval", "{tmp}/empty", "--data", "{tmp}/empty"], "holds no trained model"),
        (["--data", "{data}", "--out", "{tmp}/r", "--model", "Q/16"], "--model 'Q/16'"),
        (["--data", "{data}", "--out", "{tmp}/r", "--stem", "resnet"], "stem must be 'patch' or 'conv'"),
        (["--data", "{data}", "--out", "{tmp}/r", "--pretrained", "x.npz", "--dim", "64"], "--dim: the pretrained"),
    ],
)
def test_clear_errors_without_traceback(shapes_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, data=shapes_dir) for a in args]
    assert run_train(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_and_abbreviated_flags_are_errors(capsys):
    for bad in (["--learning-rate", "0.1"], ["--epoch", "2"]):
        with pytest.raises(SystemExit) as e:
            train.build_parser().parse_args(["--data", "x", "--out", "y", *bad])
        assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_overrides_reach_the_saved_config(shapes_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        run_train(
            "--data",
            shapes_dir,
            "--out",
            out,
            "--epochs",
            "1",
            "--workers",
            "0",
            "--lr",
            "0.0042",
            "--no-ema",
            "--hflip",
            "0",
            "--augment",
            "none",
            "--image-size",
            "24",
            "--patch-size",
            "6",
            "--stem",
            "patch",
            "--pool",
            "token",
            *TINY_MODEL,
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["train"]
    assert (t["lr"], t["ema"], t["hflip"], t["augment"]) == (0.0042, False, 0, "none")
    assert cfg["model"]["image_size"] == [24, 24] and cfg["model"]["patch_size"] == 6 and cfg["model"]["depth"] == 1
    assert (cfg["model"]["stem"], cfg["model"]["pool"], cfg["model"]["class_token"]) == ("patch", "token", True)
    assert run_train("--data", shapes_dir, "--out", out, "--epochs", "1") == 2  # the run exists: no overwrite


def test_resume_after_sigint_matches_an_uninterrupted_run(shapes_dir, tmp_path):
    common = [
        "--data",
        shapes_dir,
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--mlp-dim",
        "64",
        "--seed",
        "5",
    ]
    full = tmp_path / "full"
    assert run_train(*common, "--out", full, "--workers", "0") == 0

    part = tmp_path / "part"
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, common), "--out", str(part), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:  # stop it once it is training
        if line.startswith("epoch   1/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest
    assert "--resume" in rest
    assert (part / "checkpoint.pt").is_file()
    assert run_train("--resume", part, "--workers", "0") == 0
    assert metrics(part) == metrics(full)
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(shapes_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train("--data", shapes_dir, "--out", out, "--epochs", "1", "--workers", "0", *TINY_MODEL) == 0
    assert run_train("--resume", out, "--lr", "0.1") == 2
    assert "drop lr" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes(shapes_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / "train.py"),
        "--data",
        str(shapes_dir),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        *TINY_MODEL,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2
    assert len(metrics(out)) == 2
    assert (out / "model.safetensors").is_file() and time.time() - t0 < 300
    assert res.stdout.count("Best validation accuracy") == 1  # only rank 0 reports


def test_time_budget_fits_the_whole_schedule_into_it(shapes_dir, tmp_path, capsys):
    """--epochs is only an upper bound under a budget: the run is cut to what fits, and its
    learning-rate schedule still runs to the end (it is fitted, not truncated)."""
    out = tmp_path / "run"
    budget_min = 0.1
    args = ["--data", shapes_dir, "--out", out, "--epochs", "1000", "--workers", "0", *TINY_MODEL]
    assert run_train(*args, "--time-budget", budget_min, "--lr", "0.001", "--min-lr-ratio", "0.01") == 0
    t = json.loads((out / "config.json").read_text())["train"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert 1 <= t["epochs_fitted"] < 1000 and len(rows) == t["epochs_fitted"]
    assert float(rows[-1]["lr"]) < 0.3 * 0.001  # the cosine ran (nearly) to its end
    assert "Time budget 0.1 min" in capsys.readouterr().out
