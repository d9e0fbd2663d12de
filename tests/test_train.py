"""train.py end to end on tiny generated folders: outputs, errors, resume, DDP, overrides."""

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    m = cfg["model"]  # the recipe's architecture reaches the model (two-convolution hybrid stem, mean pooling)
    assert (m["stem"], m["stem_depth"], m["pool"], m["class_token"], m["fc_norm"]) == ("conv", 2, "avg", False, True)
    r = cfg["result"]
    assert r["best_epoch"] in (1, 2) and r["kept"].startswith(("the last epoch", f"epoch {r['best_epoch']} ("))
    model = ViT(ViTConfig.from_dict(cfg["model"]))
    model.load_state_dict(load_file(out / "model.safetensors"))
    # the file holds the kept weights: the validation accuracy the config reports is theirs
    from vit.data import EvalTransform, FolderDataset, scan_folder
    from vit.imageio import Preprocessing

    scan = scan_folder(shapes_dir)
    val = [(rel, y) for rel, y in json.loads((out / "split.json").read_text())["val"]]
    ds = FolderDataset(scan, val, EvalTransform(Preprocessing.from_dict(cfg["preprocessing"])))
    with torch.no_grad():
        right = sum(int(model.eval()(x[None]).argmax(1).item() == y) for x, y in (ds[i] for i in range(len(ds))))
    assert right / len(ds) == pytest.approx(r["val_acc"], abs=1e-4)
    assert len(metrics(out)) == 2
    report = json.loads((out / "report.json").read_text())
    assert set(report["per_class"]) == set(cfg["labels"]) and 0 <= report["ece"] <= 1
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # no half-written files left


def test_averaged_weights_keep_batchnorm_statistics_of_their_own(shapes_dir, tmp_path):
    """The EMA's conv stem keeps the BatchNorm statistics its own averaged weights give, not an
    average of the raw model's, which do not fit averaged weights that are still moving: after a
    run whose weights moved far (a high learning rate, no clipping, a short average), the
    variances the averaged model stores fit those its first convolution gives on the training
    images at least as well as the raw model's fit its own (worst channel's log ratio: 0.18
    against the raw model's 0.23 here; an average of the raw model's statistics was 0.45). The
    resume test checks that a resumed run measures the same statistics."""
    from vit.data import EvalTransform, FolderDataset, scan_folder
    from vit.engine import bn_stem
    from vit.imageio import Preprocessing

    out = tmp_path / "run"
    args = ("--epochs", "10", "--workers", "0", "--lr", "0.1", "--ema-decay", "0.95", "--warmup-epochs", "0",
            "--clip-grad", "0")  # fmt: skip
    assert run_train("--data", shapes_dir, "--out", out, *args, *TINY_MODEL) == 0
    cfg = json.loads((out / "config.json").read_text())
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in ck["ema"].items() if k.startswith("module.")}
    scan = scan_folder(shapes_dir)
    train_items = [(rel, y) for rel, y in json.loads((out / "split.json").read_text())["train"]]
    data = FolderDataset(scan, train_items, EvalTransform(Preprocessing.from_dict(cfg["preprocessing"])))
    x = torch.stack([data[i][0] for i in range(len(data))])
    off = {}  # how far each model's stored variances are from its own, the worst channel (log ratio)
    for name, weights in (("raw", ck["model"]), ("ema", ema)):
        model = ViT(ViTConfig.from_dict(cfg["model"])).eval()
        model.load_state_dict(weights)
        conv, bn = model.patch_embed.stem[0], model.patch_embed.stem[1]
        with torch.no_grad():
            var = conv(x).var(dim=(0, 2, 3))
        off[name] = float((bn.running_var / var).log().abs().max())
    assert off["ema"] <= off["raw"] < math.log(2), off
    assert bn_stem(model) is model.patch_embed
    assert bn_stem(ViT(ViTConfig.from_dict({**cfg["model"], "stem": "patch", "stem_depth": 1}))) is None


def bare_trainer(model: ViT, data, tmp_path, **settings):
    """A Trainer on in-memory data with the scratch recipe's settings and ``settings`` over them
    (one process, CPU, no workers, no EMA): for tests of single steps."""
    from vit.config import TrainConfig
    from vit.engine import Dist, Trainer
    from vit.recipe import scratch_recipe

    side = model.config.image_size[0]
    recipe = scratch_recipe(len(data), side, "cpu", 0)
    recipe = {k: v for k, v in recipe.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig.from_dict({**recipe, "ema": False, "workers": 0, "epochs": 1, **settings})
    return Trainer(model, cfg, data, data, tmp_path, torch.device("cpu"), Dist())


def test_sam_steps_with_the_gradient_at_the_perturbed_weights(tmp_path):
    """--sam RHO: the optimizer steps from the weights w with the gradient taken at
    w + RHO g / |g| (g: the gradient at w, on the same images), and BatchNorm's statistics move
    once a step, as without SAM, not again for the perturbed pass."""
    import copy

    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    arch = dict(image_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64, stem="conv",
                stem_depth=2, class_token=False, pool="avg", fc_norm=True)  # fmt: skip
    model = ViT(ViTConfig(**arch))  # no dropout, no stochastic depth: both passes are deterministic
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer = bare_trainer(model, TensorDataset(x, y), tmp_path, sam=0.5, clip_grad=0.0, mixup=0.0)  # x as it is
    cfg = trainer.cfg
    reference = copy.deepcopy(model)

    seen = {}

    def step():  # what the optimizer is given
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["grads"] = [p.grad.clone() for p in model.parameters()]

    trainer.opt.step = step
    trainer.train_step(iter([(x, y)]))

    def gradient(net):
        loss = F.cross_entropy(net.train()(x), y, label_smoothing=cfg.label_smoothing)
        return torch.autograd.grad(loss, list(net.parameters()))

    plain = gradient(reference)  # also moves reference's BatchNorm statistics once
    perturbed = copy.deepcopy(reference)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in plain]))
    with torch.no_grad():
        for p, g in zip(perturbed.parameters(), plain):
            p.add_(0.5 * g / norm)
    sharp = gradient(perturbed)
    for got, want in zip(seen["grads"], sharp):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(sharp, plain)) > 1e-3  # SAM's gradient is another
    for k, v in reference.state_dict().items():  # the weights w themselves, and the statistics moved once
        torch.testing.assert_close(seen["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_accumulation_syncs_on_the_last_micro_batch_of_a_short_last_step(tmp_path):
    """With --grad-accum 2 and 5 batches an epoch, the epoch's last step has one micro-batch:
    that one is the step's last, where DDP averages the ranks' gradients (else each rank would
    step with its own gradient there, and the copies would drift apart)."""
    from torch.utils.data import TensorDataset

    class Images(TensorDataset):  # the training sampler yields (index, epoch)
        def __getitem__(self, key):
            return super().__getitem__(key[0])

    arch = dict(image_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64)
    x, y = torch.randn(40, 3, 16, 16), torch.arange(40) % 3
    trainer = bare_trainer(ViT(ViTConfig(**arch)), Images(x, y), tmp_path, batch_size=8, grad_accum=2)
    lasts = []
    plain = trainer.forward_backward
    trainer.forward_backward = lambda x, target, last: (lasts.append(last), plain(x, target, last))[1]
    batches = iter(trainer.loader)
    for _ in range(trainer.steps_per_epoch):
        trainer.train_step(batches)
        trainer.state.step_in_epoch += 1
    assert trainer.steps_per_epoch == 3 and lasts == [False, True, False, True, True]


def test_a_steps_random_draws_do_not_depend_on_how_its_images_were_loaded(tmp_path):
    """Mixup's and stochastic depth's draws are seeded by (seed, rank, epoch, step, micro-batch)
    after each micro-batch is loaded: loading in this process (--workers 0) seeds the CPU
    generator per image, which must change neither them nor, so, a run resumed with other
    --workers. Two loaders that leave the generator in different states give one gradient."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    arch = dict(image_size=16, patch_size=4, num_classes=3, dim=32, depth=2, heads=2, mlp_dim=64, drop_path=0.5)
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 3
    weights = ViT(ViTConfig(**arch)).state_dict()

    def gradient(loader_seed: int, seed: int = 0) -> list[torch.Tensor]:
        model = ViT(ViTConfig(**arch))
        model.load_state_dict(weights)
        trainer = bare_trainer(model, TensorDataset(x, y), tmp_path, mixup=0.8, batch_size=8, grad_accum=2, seed=seed)
        grads = []
        trainer.opt.step = lambda: grads.extend(p.grad.clone() for p in model.parameters())

        def batches():  # two micro-batches, each loaded as --workers 0 loads them
            for i in range(2):
                torch.manual_seed(loader_seed + i)
                yield x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]

        trainer.train_step(batches())
        return grads

    one, other = gradient(1), gradient(2)
    assert all(torch.equal(a, b) for a, b in zip(one, other, strict=True))
    # the run's seed, not the loader, decides the draws
    assert not all(torch.equal(a, b) for a, b in zip(one, gradient(1, seed=1), strict=True))


def test_a_step_whose_gradient_is_not_finite_is_skipped_and_a_run_of_them_stops_training(tmp_path):
    """One NaN in a step's loss leaves the weights, the averaged weights, BatchNorm's statistics
    and the epoch's loss as they were (the step is skipped and counted), the next finite step
    trains as usual, and ``MOST_BAD_STEPS`` skipped steps in a row stop the run with a message
    that says what to do."""
    import copy

    from torch.utils.data import TensorDataset

    from vit.engine import Diverged

    torch.manual_seed(0)
    arch = dict(image_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64, stem="conv",
                stem_depth=2)  # fmt: skip  # BatchNorm's statistics, which a skipped step must not move either
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer = bare_trainer(ViT(ViTConfig(**arch)), TensorDataset(x, y), tmp_path, ema=True, ema_decay=0.9)
    plain, poisoned = trainer.forward_backward, {"on": True}

    def forward_backward(x, target, last):  # NaN in one weight's gradient, as an overflow gives
        logits, loss = plain(x, target, last)
        if poisoned["on"]:
            next(trainer.model.parameters()).grad.view(-1)[0] = math.nan
            loss = loss * math.nan
        return logits, loss

    trainer.forward_backward = forward_backward
    before, ema_before = copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.ema.state_dict())
    trainer.train_step(iter([(x, y)]))
    for k, v in trainer.model.state_dict().items():  # the weights and BatchNorm's statistics
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    for k, v in trainer.ema.state_dict().items():
        torch.testing.assert_close(v, ema_before[k], rtol=0, atol=0, msg=k)
    sums = trainer.state.sums
    assert sums["skipped"] == 1 and sums["seen"] == 0 and math.isfinite(sums["loss"])

    poisoned["on"] = False
    trainer.train_step(iter([(x, y)]))
    params = dict(trainer.model.named_parameters())
    assert trainer.state.bad_steps == 0 and sums["seen"] == 8 and math.isfinite(sums["loss"])
    assert any(not torch.equal(params[k].detach(), before[k]) for k in params)  # this one stepped

    poisoned["on"] = True
    for _ in range(trainer.MOST_BAD_STEPS - 1):
        trainer.train_step(iter([(x, y)]))
    with pytest.raises(Diverged, match=r"--lr \(this run's is [0-9.e-]+\)$"):  # it clips already: lr it is
        trainer.train_step(iter([(x, y)]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_diverging_run_stops_with_a_clear_message(shapes_dir, tmp_path, capsys):
    """A learning rate far too high: the run stops with exit code 1 and says what to change,
    before weights that answer NaN can be kept (and then exported)."""
    out = tmp_path / "run"
    code = run_train("--data", shapes_dir, "--out", out, "--epochs", "1", "--workers", "0", "--lr", "1e30", *TINY_MODEL)
    err = capsys.readouterr().err  # one epoch of 3 steps: fewer than the skipped steps that stop a run
    assert code == 1 and "training diverged by epoch 1" in err and "--lr (this run's is 1e+30)" in err, err[-2000:]
    assert not (out / "model.safetensors").exists()


def test_weights_whose_validation_loss_is_not_finite_are_never_kept(tmp_path):
    """select skips a candidate (here the averaged weights) whose validation loss is NaN, even
    though its accuracy looks best; check_finite stops the run when the raw weights' loss is."""
    from torch.utils.data import TensorDataset

    from vit.engine import Diverged

    arch = dict(image_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer = bare_trainer(ViT(ViTConfig(**arch)), TensorDataset(x, y), tmp_path)
    right = torch.ones(8, dtype=torch.bool)
    scores = {"raw": dict(loss=1.0, acc=0.5, correct=~right), "ema": dict(loss=math.nan, acc=1.0, correct=right)}
    trainer.check_finite(scores)  # the raw weights are fine
    assert trainer.select(scores) and trainer.state.best_weights == "raw" and trainer.state.best_acc == 0.5
    with pytest.raises(Diverged, match="by epoch 1: its weights"):
        trainer.check_finite({**scores, "raw": dict(loss=math.inf, acc=0.5, correct=~right)})
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.inf
    with pytest.raises(Diverged):
        trainer.check_finite(scores)


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
    assert run_train("--eval", out, "--data", shapes_dir, "--out", tmp_path / "own") == 0  # its own folder: said
    assert "were in the run's training or validation split" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nope", "--out", "{tmp}/r"], "does not exist"),
        (["--data", "{tmp}/empty", "--out", "{tmp}/r"], "no class folders"),
        (["--out", "{tmp}/r"], "pass --data PATH and --out RUN_DIR"),
        (["--resume", "{tmp}/empty"], "holds no resumable run"),
        (["--eval", "{tmp}/empty", "--data", "{tmp}/empty"], "holds no trained model"),
        (["--data", "{data}", "--out", "{tmp}/r", "--model", "Q/16"], "unknown variant 'Q/16'"),
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
            "--sam",
            "0.05",
            *TINY_MODEL,
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["train"]
    assert (t["lr"], t["ema"], t["hflip"], t["augment"], t["sam"]) == (0.0042, False, 0, "none", 0.05)
    assert cfg["model"]["image_size"] == [24, 24] and cfg["model"]["patch_size"] == 6 and cfg["model"]["depth"] == 1
    assert (cfg["model"]["stem"], cfg["model"]["pool"], cfg["model"]["class_token"]) == ("patch", "token", True)
    assert run_train("--data", shapes_dir, "--out", out, "--epochs", "1") == 2  # the run exists: no overwrite


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")
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
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
    )
    for line in proc.stdout:  # stop it once it is training: Ctrl-C reaches the loader workers too
        if line.startswith("epoch   1/"):
            os.killpg(proc.pid, signal.SIGINT)
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
    assert "drop --lr 0.1 (the run has 0.001)" in capsys.readouterr().err
    # Item 16: flags outside the recipe's settings are compared too, all listed at once.
    assert run_train("--resume", out, "--seed", "3", "--no-ema", "--grad-accum", "2", "--mean", "0", "0", "0") == 2
    err = capsys.readouterr().err
    for flag in ("--seed 3 (the run has 0)", "--ema False (the run has True)", "--grad-accum 2", "--mean"):
        assert flag in err, flag
    assert run_train("--resume", out, "--seed", "0", "--lr", "0.001", "--workers", "0") == 0  # the same values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_time_budget_fits_the_whole_schedule_into_it(shapes_dir, tmp_path, capsys, monkeypatch):
    """Under a budget the recipe's epochs (vit.recipe.BUDGET_MAX_EPOCHS, raised here so that the
    budget, not the cap, ends the run on any machine) are only an upper bound: the run is cut to
    what fits, and its learning-rate schedule still runs to the end (it is fitted, not truncated)."""
    from vit import recipe

    cap = 100_000
    monkeypatch.setattr(recipe, "BUDGET_MAX_EPOCHS", cap)

    out = tmp_path / "run"
    budget_min = 0.1
    args = ["--data", shapes_dir, "--out", out, "--workers", "0", *TINY_MODEL]  # the recipe's upper bound
    assert run_train(*args, "--time-budget", budget_min, "--lr", "0.001", "--min-lr-ratio", "0.01") == 0
    t = json.loads((out / "config.json").read_text())["train"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert t["epochs"] == cap and 1 <= t["epochs_fitted"] < cap
    assert len(rows) == t["epochs_fitted"]
    assert float(rows[-1]["lr"]) < 0.3 * 0.001  # the cosine ran (nearly) to its end
    assert "Time budget 0.1 min" in capsys.readouterr().out
    seconds = [float(r["seconds"]) for r in rows]
    assert sum(seconds) <= budget_min * 60 + max(seconds), seconds  # kept: at most one epoch over


# no BatchNorm (per-rank statistics) and no mixup (each rank blends the images of its own half
# of the batch): the two ranks then compute what one process does with the whole batch
DDP_ARGS = ["--epochs", "2", "--workers", "0", "--stem", "patch", "--mixup", "0", *TINY_MODEL]
DDP_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(script, *args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]


@pytest.fixture(scope="module")
def ddp_run(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    cmd = torchrun(ROOT / "train.py", "--data", shapes_dir, "--out", out, "--device", "cpu", *DDP_ARGS)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=DDP_ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("Kept the weights of") == 1  # only rank 0 reports
    return out


def test_ddp_two_gloo_processes_equal_one_process_with_the_whole_batch(ddp_run, shapes_dir, tmp_path):
    """2 processes x batch 16 see the same images per step as 1 process x batch 32 (the sampler
    shards each global batch), so the weights must come out the same."""
    cfg = json.loads((ddp_run / "config.json").read_text())
    assert cfg["world_size"] == 2 and len(metrics(ddp_run)) == 2
    single = tmp_path / "single"
    args = [a if a != "16" else "32" for a in DDP_ARGS]  # TINY_MODEL's batch size 16 -> 32
    assert run_train("--data", shapes_dir, "--out", single, *args) == 0
    a, b = load_file(ddp_run / "model.safetensors"), load_file(single / "model.safetensors")
    assert set(a) == set(b)
    # Relative L1 distance. Float rounding differs (two means of 16 vs one of 32), and Adam's
    # first steps turn a sign flip of a near-zero gradient into a full-size step, so a few
    # weights differ by ~lr; batching the images differently moves every weight (~2e-2 here).
    rel = sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(a[k].abs().sum().item() for k in a)
    assert rel < 1e-4, rel
    assert json.loads((single / "config.json").read_text())["train"]["ema_decay"] == cfg["train"]["ema_decay"]


STOP_ONE_RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
import train
from vit import engine

original = engine.Trainer.stop_requested
def stop_requested(self):
    # Rank 1 only, at its first step of the second epoch: say who it is and wait for the signal.
    if os.environ.get("RANK") == "1" and self.state.epoch == 1 and self.state.step_in_epoch == 1:
        print("RANK1", os.getpid(), flush=True)
        time.sleep(3)
    return original(self)
engine.Trainer.stop_requested = stop_requested
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")
def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step(ddp_run, shapes_dir, tmp_path):
    """Item 8: a signal that reaches one rank stops them all at one step (no all-reduce left
    waiting), rank 0 saves, and the resumed run ends exactly like the uninterrupted one."""
    script = tmp_path / "stop_one_rank.py"
    script.write_text(STOP_ONE_RANK.format(root=str(ROOT)))
    out = tmp_path / "part"
    cmd = torchrun(script, "--data", shapes_dir, "--out", out, "--device", "cpu", *DDP_ARGS)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=DDP_ENV)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("RANK1"):
            os.kill(int(line.split()[1]), signal.SIGTERM)
    proc.wait(timeout=120)
    text = "".join(lines)
    assert "Stopped by signal; checkpoint saved" in text, text[-3000:]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ck["state"]["epoch"], ck["state"]["step_in_epoch"]) == (1, 1)
    res = subprocess.run(
        torchrun(ROOT / "train.py", "--resume", out, "--workers", "0", "--device", "cpu"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=DDP_ENV,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert metrics(out) == metrics(ddp_run)
    a, b = load_file(ddp_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


SLOW_VALIDATION = """
import sys, time
sys.path.insert(0, {root!r})
import train
from vit import engine

original = engine.Trainer.evaluate
def evaluate(self):
    if self.state.epoch == 1:  # the second epoch's validation: say so, and take a while
        print("VALIDATING", flush=True)
        time.sleep(2)
    return original(self)
engine.Trainer.evaluate = evaluate
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")
def test_ctrl_c_during_validation_saves_and_resumes_exactly(shapes_dir, tmp_path):
    """Item 8: SIGINT to the whole process group (as Ctrl-C in a terminal sends it), with loader
    workers alive, while validating: a checkpoint, no traceback, and an exact resume."""
    common = ["--data", shapes_dir, "--epochs", "3", *TINY_MODEL, "--seed", "2"]
    full = tmp_path / "full"
    assert run_train(*common, "--out", full, "--workers", "0") == 0
    script = tmp_path / "slow_validation.py"
    script.write_text(SLOW_VALIDATION.format(root=str(ROOT)))
    part = tmp_path / "part"
    cmd = [sys.executable, str(script), *map(str, common), "--out", str(part), "--workers", "1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
    )
    for line in proc.stdout:
        if line.startswith("VALIDATING"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in rest, rest
    assert "--resume" in rest
    assert run_train("--resume", part, "--workers", "0") == 0
    assert metrics(part) == metrics(full)
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


SPAWN = """
import multiprocessing, sys
sys.path.insert(0, {root!r})
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    import train
    sys.exit(train.main(sys.argv[1:]))
"""


def test_training_works_where_workers_are_spawned(shapes_dir, tmp_path):
    """Item 1: macOS, Windows and Python 3.14 start loader workers by spawn or forkserver."""
    script = tmp_path / "spawn_train.py"
    script.write_text(SPAWN.format(root=str(ROOT)))
    out = tmp_path / "run"
    args = ["--data", shapes_dir, "--out", out, "--epochs", "1", "--workers", "1", *TINY_MODEL]
    res = subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("slow_down", [1.0, 1.5, 3.0])
def test_time_budget_keeps_to_the_budget_without_training(slow_down):
    """The budget's arithmetic on simulated clocks: a first estimate that runs long (slow first
    steps), then epochs of 10 s that become ``slow_down`` times slower halfway through."""
    from vit.budget import TimeBudget

    b = TimeBudget(seconds=300, max_epochs=1000)
    elapsed = 5.0  # set-up before training
    planned = b.first_estimate(step_seconds=0.5, steps_per_epoch=30, val_share=0.2, elapsed=elapsed)
    assert planned == int(295 / (15 * 1.07))
    done = 0
    while done < planned:
        took = 10.0 * (slow_down if done >= planned / 2 else 1.0)
        elapsed += took
        done += 1
        planned = b.after_epoch(took, done, planned, elapsed)
    assert elapsed <= 300 + 10 * slow_down  # never more than one epoch over
    assert elapsed >= 300 - 2 * 10 * slow_down  # and the budget is used (within two epochs)


def test_time_budget_is_spent_after_a_slowed_start():
    """A run slowed at its start (another job on the machine) planned few epochs; when the
    epochs speed up, even past half the run, the length grows to spend the budget."""
    from vit.budget import TimeBudget

    b = TimeBudget(seconds=300, max_epochs=1000)
    elapsed, done = 5.0, 0
    planned = first = b.first_estimate(step_seconds=1.0, steps_per_epoch=30, val_share=0.2, elapsed=elapsed)
    while done < planned:
        took = 30.0 if done < 6 else 10.0  # three times slower for the first six epochs
        elapsed, done = elapsed + took, done + 1
        planned = b.after_epoch(took, done, planned, elapsed)
    assert first <= 10 and planned >= 15  # grew past the first plan's half-way point
    assert 0.9 * 300 <= elapsed <= 300 + 10 and not b.unspent(elapsed)


def test_time_budget_does_not_stretch_late_for_wobble():
    """After half the run, epoch times that wobble (4-6 s) do not lengthen it (each growth would
    raise the learning rate again late in the schedule); a machine twice as fast from then on does."""
    import random

    from vit.budget import TimeBudget

    rng = random.Random(0)
    for speedup in (1.0, 2.0):
        b = TimeBudget(seconds=600, max_epochs=1000)
        elapsed, done = 5.0, 0
        planned = b.first_estimate(step_seconds=0.2, steps_per_epoch=30, val_share=0.2, elapsed=elapsed)
        grew_late = 0
        while done < planned:
            took = rng.uniform(4.0, 6.0) / (speedup if done >= 60 else 1.0)
            elapsed, done = elapsed + took, done + 1
            new = b.after_epoch(took, done, planned, elapsed)
            grew_late += done >= planned / 2 and new > planned
            planned = new
        assert (grew_late > 0) == (speedup > 1.0)
        assert elapsed >= 0.9 * 600 or b.held


def test_an_unspent_budget_is_explained():
    """A budgeted run that leaves more than 10% of its budget, and time for another epoch, says
    why: its epoch cap, or the late-growth rule; less than an epoch left is not news."""
    from types import SimpleNamespace

    from train import budget_use, unspent_reason
    from vit.budget import TimeBudget

    b = TimeBudget(seconds=300, max_epochs=1000, epoch_seconds=[20.0] * 6)
    assert unspent_reason(b, SimpleNamespace(total_epochs=12), 285.0) is None  # 5% left
    assert budget_use(b, SimpleNamespace(total_epochs=12), 285.0) == "Training used 4.75 of its 5 min budget"
    said = budget_use(b, SimpleNamespace(total_epochs=12), 265.0)  # 35 s left: room for a 20 s epoch
    assert said.endswith("its last epochs ran faster than the ones its length was fitted from")
    said = budget_use(b, SimpleNamespace(total_epochs=1000), 120.0)
    assert said.startswith("Training used 2.00 of its 5 min budget: it reached its cap of 1000 epochs")
    b.held = True
    said = budget_use(b, SimpleNamespace(total_epochs=9), 240.0)
    assert "sped up after the half-way point by less than the 20%" in said
    b = TimeBudget(seconds=60, max_epochs=1000, epoch_seconds=[25.0])
    assert unspent_reason(b, SimpleNamespace(total_epochs=1), 40.0) is None  # 20 s left: no room for a 25 s epoch
    b = TimeBudget(seconds=300, max_epochs=300, epoch_seconds=[0.4] * 6, cap_note="the recipe's: why")
    said = budget_use(b, SimpleNamespace(total_epochs=300), 130.0)  # the recipe's cap says why it is there
    assert said.endswith("its cap of 300 epochs (the recipe's: why; --epochs N with --time-budget sets another)")


def test_the_recipes_epoch_cap_is_said_where_it_ends_a_run_early(tmp_path, capsys, monkeypatch):
    """Tiny data fills a budget with hundreds of epochs, and past the recipe's cap they did not
    pay (vit.recipe.BUDGET_MAX_EPOCHS, lowered here so the test is quick): a budgeted run from
    scratch stops there, says so at the start with the reason, and a cap of one's own (--epochs
    with --time-budget) has no reason given for it."""
    from PIL import Image

    from vit import recipe
    from vit.recipe import CAP_NOTE

    cap = 4
    monkeypatch.setattr(recipe, "BUDGET_MAX_EPOCHS", cap)

    data = tmp_path / "tiny data"
    for c in range(2):
        (data / f"class {c}").mkdir(parents=True)
        for i in range(8):
            Image.new("L", (8, 8), abs(255 * c - 3 * i)).save(data / f"class {c}" / f"{i}.png")
    model = ["--dim", "16", "--depth", "1", "--heads", "1", "--mlp-dim", "16", "--workers", "0", "--batch-size", "16"]
    out = tmp_path / "run"
    assert run_train("--data", data, "--out", out, "--time-budget", "1", *model) == 0
    t = json.loads((out / "config.json").read_text())["train"]
    said = capsys.readouterr().out
    assert t["epochs"] == t["epochs_fitted"] == cap == len(metrics(out)) and t["epochs_note"] == CAP_NOTE
    assert f"{cap} is the cap ({CAP_NOTE}), so the run should end after about" in said
    assert f"its cap of {cap} epochs ({CAP_NOTE}; --epochs N" in said
    assert run_train("--data", data, "--out", tmp_path / "own", "--time-budget", "1", "--epochs", "3", *model) == 0
    t = json.loads((tmp_path / "own" / "config.json").read_text())["train"]
    assert t["epochs"] == 3 and t["epochs_note"] is None
    assert "3 is the cap, so the run should end" in capsys.readouterr().out


def test_time_budget_says_news_not_every_refit():
    """The length is refitted after every epoch; the log says it only when it moves by 10% (and
    2 epochs) from what it last said, so a jittery clock does not print it at every epoch, while
    a machine that slows down by half is still reported."""
    import random

    from vit.budget import TimeBudget

    rng = random.Random(0)
    b = TimeBudget(seconds=600, max_epochs=1000)
    elapsed, done = 5.0, 0
    planned = b.first_estimate(step_seconds=0.2, steps_per_epoch=30, val_share=0.2, elapsed=elapsed)
    said, lines, changes = planned, 1, 0
    while done < planned:
        took = rng.uniform(4.0, 6.0) * (1.5 if done >= 60 else 1.0)
        elapsed, done = elapsed + took, done + 1
        new = b.after_epoch(took, done, planned, elapsed)
        changes += new != planned
        planned = new
        if TimeBudget.worth_saying(planned, said):
            said, lines = planned, lines + 1
    assert changes >= 10  # the plan moved at many refits ...
    assert 2 <= lines <= 5  # ... and was said at a few: the first fit and the slow-down among them


def test_explicit_epochs_turn_the_budget_off_and_say_so(shapes_dir, tmp_path, capsys):
    """Item 15: the CPU recipe's 8-minute budget does not silently cap an explicit --epochs."""
    out = tmp_path / "run"
    assert run_train("--data", shapes_dir, "--out", out, "--epochs", "2", "--workers", "0", *TINY_MODEL) == 0
    t = json.loads((out / "config.json").read_text())["train"]
    assert t["time_budget"] is None and len(metrics(out)) == 2
    assert "Time budget: off: --epochs was given without --time-budget" in capsys.readouterr().out


def test_printed_settings_say_which_values_the_budget_will_set():
    """With a budget, the epochs (a cap) and the automatic EMA decay are not yet known at the start."""
    from vit.config import TrainConfig

    fitted = TrainConfig(time_budget=5.0, epochs=1000, ema_decay=0.9994, ema_decay_auto=True).shown()
    assert "epochs=fitted to the budget (at most 1000)" in fitted and "ema_decay=auto" in fitted
    assert "0.9994" not in fitted
    chosen = TrainConfig(time_budget=5.0, epochs=1000, ema_decay=0.999, ema_decay_auto=False).shown()
    assert "ema_decay=0.999" in chosen
    plain = TrainConfig(time_budget=None, epochs=30, ema_decay=0.99, ema_decay_auto=True).shown()
    assert "epochs=30" in plain and "ema_decay=0.99" in plain and "fitted" not in plain


@pytest.mark.parametrize(
    "flag, value", [("--pool", "tokn"), ("--stem", "resnet"), ("--augment", "strong"), ("--interpolation", "cubic")]
)
def test_misspelt_choices_fail_at_once(flag, value, capsys):
    """Item 17."""
    with pytest.raises(SystemExit) as e:
        train.build_parser().parse_args(["--data", "x", "--out", "y", flag, value])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_finetuning_from_our_own_run_reads_its_config(run_dir, shapes_dir, tmp_path):
    """Item 6: a run folder (or its weights file) as --pretrained gives the same model, heads
    and conv stem included, and the same logits before any training step."""
    from vit.build import build_model
    from vit.config import TrainConfig
    from vit.run import RunDir

    ref = RunDir(run_dir).load_model()
    labels = json.loads((run_dir / "config.json").read_text())["labels"]
    x = torch.randn(3, 3, 32, 32)
    lone = tmp_path / "copied" / "weights.safetensors"  # copied away from its run: it says what it is
    lone.parent.mkdir()
    lone.write_bytes((run_dir / "model.safetensors").read_bytes())
    for src in (run_dir, run_dir / "model.safetensors", lone):
        cfg = TrainConfig(pretrained=str(src), dropout=0.0, drop_path=ref.config.drop_path, image_size=32)
        model = build_model(cfg, labels).eval()
        assert model.config == ref.config and model.config.heads == 2 and model.config.stem == "conv"
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))
    other = build_model(cfg, ["a", "b", "c"]).eval()  # other classes: the same features, a new head
    with torch.no_grad():
        assert torch.equal(other.forward_features(x)[0], ref.forward_features(x)[0])
        assert torch.equal(other(x), torch.zeros(3, 3))
    out = tmp_path / "ft"
    args = ["--data", shapes_dir, "--out", out, "--pretrained", run_dir, "--epochs", "1", "--workers", "0"]
    assert run_train(*args) == 0
    saved = json.loads((out / "config.json").read_text())
    # the architecture is the run's; stochastic depth and mirror averaging are this run's settings
    want = {
        **ref.config.to_dict(),
        "drop_path": saved["model"]["drop_path"],
        "mirror_average": saved["train"]["mirror_average"],
    }
    assert saved["model"] == want
    assert saved["preprocessing"] == json.loads((run_dir / "config.json").read_text())["preprocessing"]


def test_run_stores_its_data_folder_resolved(shapes_dir, tmp_path, monkeypatch):
    """Item 10: a relative --data still works from another directory, and a moved folder is
    found with --data."""
    import shutil

    from export.onnx_export import export_run
    from vit.run import RunError

    work = tmp_path / "work dir ü"  # a space and a non-ASCII letter, as users' folders have
    work.mkdir()
    shutil.copytree(shapes_dir, work / "data")
    monkeypatch.chdir(work)
    assert run_train("--data", "data", "--out", "run", "--epochs", "1", "--workers", "0", *TINY_MODEL) == 0
    cfg = json.loads((work / "run" / "config.json").read_text())
    assert Path(cfg["data"]["root"]) == (work / "data").resolve() and Path(cfg["train"]["data"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    export_run(work / "run", tmp_path / "m.onnx")
    (work / "data").rename(work / "moved")
    with pytest.raises(RunError, match="pass the folder it was trained on with --data"):
        export_run(work / "run", tmp_path / "m2.onnx")
    export_run(work / "run", tmp_path / "m2.onnx", data=work / "moved")
    assert (tmp_path / "m2.onnx").is_file()


def test_test_folder_is_reported_never_chosen_on_and_carried_into_the_file(shapes_dir, tmp_path, capsys):
    """Item 18: ROOT/test/ is held out; its accuracy reaches config.json, its own report and the
    ONNX metadata, and --eval of the ONNX file on the same folder gives the same number."""
    import shutil

    from export.onnx_export import export_run
    from vit.datasets import make_shapes
    from vit.runtime import Classifier

    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root / "train")
    classes = ("circle", "cross", "square", "triangle")
    shutil.copytree(make_shapes(tmp_path / "fresh", per_class=3, size=16, seed=7, classes=classes), root / "test")
    out = tmp_path / "run"
    assert run_train("--data", root, "--out", out, "--epochs", "2", "--workers", "0", *TINY_MODEL) == 0
    printed = capsys.readouterr().out
    assert "test/ held out as a test set" in printed and "Held-out test accuracy" in printed
    split = json.loads((out / "split.json").read_text())
    assert len(split["test"]) == 12
    assert not {r for r, _ in split["test"]} & {r for r, _ in split["train"] + split["val"]}
    result = json.loads((out / "config.json").read_text())["result"]
    assert result["test_images"] == 12 and 0 <= result["test_acc"] <= 1 and (out / "test" / "report.md").is_file()
    onnx_path = tmp_path / "m.onnx"
    export_run(out, onnx_path)
    meta = Classifier(onnx_path).metadata
    assert meta["test_images"] == "12"
    assert run_train("--eval", onnx_path, "--data", root, "--out", tmp_path / "ev") == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n"] == 12 and report["accuracy"] == pytest.approx(float(meta["test_accuracy"]), abs=1e-4)
    # The file's own temperature is applied: the report's calibration is that of the app's probabilities.
    from vit.report import expected_calibration_error

    clf = Classifier(onnx_path)
    probs = np.stack([p.probs for p in clf.predict_many([root / r for r, _ in split["test"]])])
    labels = np.array([y for _, y in split["test"]])
    assert report["ece"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-4)


def test_the_command_line_is_generated_from_the_typed_config():
    """Every TrainConfig setting has its flag with its help; only given flags count as given."""
    from dataclasses import fields

    from vit.config import TrainConfig, flag_fields, given

    parser = train.build_parser()
    text = parser.format_help()
    for f in flag_fields():
        assert "--" + f.name.replace("_", "-") in text, f.name
    args = parser.parse_args(["--data", "d", "--out", "o", "--lr", "0.1", "--no-ema", "--mean", "0", "0", "0"])
    assert given(args) == {"lr": 0.1, "ema": False, "mean": [0.0, 0.0, 0.0]}
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    assert TrainConfig.from_dict({"learning_rate": 0.1}, saved=True) == TrainConfig()
    derived = {f.name for f in fields(TrainConfig)} - {f.name for f in flag_fields()}
    notes = {"time_budget_note", "hflip_note", "epochs_note", "mixup_note"}
    assert derived == {"device", "pretrained", "data", "ema_decay_auto", "epochs_fitted", *notes}


FAIL_AFTER_START = """
import sys
sys.path.insert(0, {root!r})
import train
from vit import engine

def evaluate(self):
    raise RuntimeError("a failure after the loader's workers started")
engine.Trainer.evaluate = evaluate
sys.exit(train.main(sys.argv[1:]))
"""


def test_an_error_after_workers_started_ends_the_process(shapes_dir, tmp_path):
    """The traceback, then an exit: no process left waiting for its loader workers."""
    script = tmp_path / "fail.py"
    script.write_text(FAIL_AFTER_START.format(root=str(ROOT)))
    args = ["--data", shapes_dir, "--out", tmp_path / "run", "--epochs", "2", "--workers", "1", *TINY_MODEL]
    res = subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert res.returncode != 0 and "a failure after the loader's workers started" in res.stderr


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--val-fraction", "1.5"),
        ("--val-fraction", "0"),
        ("--batch-size", "0"),
        ("--hflip", "2"),
        ("--stem-depth", "0"),
        ("--sam", "-0.1"),
        ("--sam", "inf"),
        ("--lr", "inf"),
    ],
)
def test_settings_no_run_can_use_are_refused_by_name(shapes_dir, tmp_path, capsys, flag, value):
    assert run_train("--data", shapes_dir, "--out", tmp_path / "r", flag, value) == 2
    err = capsys.readouterr().err
    assert "settings no run can use" in err and flag in err and "must be" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_a_stem_depth_without_the_conv_stem_is_refused(shapes_dir, tmp_path, capsys):
    args = ["--data", shapes_dir, "--out", tmp_path / "r", "--stem", "patch", "--stem-depth", "2"]
    assert run_train(*args) == 2
    err = capsys.readouterr().err
    assert "--stem-depth 2" in err and "--stem conv" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_stem_depth_alone_sets_the_recipes_conv_stem(shapes_dir, tmp_path):
    out = tmp_path / "r"
    args = ["--data", shapes_dir, "--out", out, "--epochs", "1", "--workers", "0", "--stem-depth", "3", *TINY_MODEL]
    assert run_train(*args) == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["stem"] == "conv" and model["stem_depth"] == 3
    assert "patch_embed.stem.9.weight" in load_file(out / "model.safetensors")  # 2 stages x 3 conv blocks


def test_a_run_saved_before_the_stem_depth_setting_still_resumes_evaluates_and_exports(shapes_dir, tmp_path):
    """A conv-stem run whose config.json has no stem_depth (saved by an earlier version) is a
    depth-1 stem: its weights load as they are, and --stem-depth 1 on resume is no change."""
    from export.onnx_export import export_run

    out = tmp_path / "run"
    args = ["--data", shapes_dir, "--out", out, "--epochs", "1", "--workers", "0", "--stem-depth", "1", *TINY_MODEL]
    assert run_train(*args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["model"].pop("stem_depth") == 1 and cfg["train"].pop("stem_depth") == 1 and cfg["model"]["stem"] == "conv"
    )
    del cfg["result"]  # as if stopped before its report: the resume builds the model and writes it
    (out / "config.json").write_text(json.dumps(cfg))
    assert run_train("--resume", out, "--stem-depth", "1", "--workers", "0") == 0
    assert "result" in json.loads((out / "config.json").read_text())
    assert run_train("--resume", out, "--stem-depth", "2") == 2
    assert run_train("--eval", out, "--data", shapes_dir, "--out", tmp_path / "eval") == 0
    export_run(out, tmp_path / "old.onnx")
    assert (tmp_path / "old.onnx").stat().st_size > 0


def test_a_run_stopped_before_its_first_checkpoint_says_what_to_do(shapes_dir, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert run_train("--resume", out) == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert run_train("--data", shapes_dir, "--out", out) == 2
    assert "delete that folder and start again" in capsys.readouterr().err


def test_resume_reads_a_checkpoint_of_the_earlier_layout(run_dir, tmp_path):
    """Checkpoints of the previous version kept the budget's length and EMA decay in a config
    entry; a resume must still take them from there."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.onnx"))
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    for key in ("fitted", "ema_decay"):
        ck["state"].pop(key)
    ck["config"] = {"ema_decay": 0.5, "epochs_fitted": ck["state"]["total_epochs"]}
    torch.save(ck, run / "checkpoint.pt")
    config = json.loads((run / "config.json").read_text())
    del config["result"]  # as if stopped while writing its report: the resume writes it
    (run / "config.json").write_text(json.dumps(config))
    assert run_train("--resume", run, "--workers", "0") == 0  # already at its last epoch: it only reports
    t = json.loads((run / "config.json").read_text())["train"]
    assert t["ema_decay"] == 0.5 and t["epochs_fitted"] == ck["state"]["total_epochs"]


def test_resuming_a_finished_run_changes_nothing_and_says_so(run_dir, tmp_path, capsys):
    """--resume on a run that finished (its report written) is not an error, and not a second
    report either: it says the run is finished and where its report is. One stopped while
    writing its report gets the report."""
    import shutil

    run = tmp_path / "done"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.onnx"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_train("--resume", run, "--workers", "0") == 0
    out = capsys.readouterr().out
    assert "finished training: nothing to resume" in out and "Resuming" not in out, out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    config = json.loads((run / "config.json").read_text())
    del config["result"]
    (run / "config.json").write_text(json.dumps(config))
    assert run_train("--resume", run, "--workers", "0") == 0
    assert "finished its 8 epochs; writing its report" in capsys.readouterr().out
    again, first = (json.loads(t)["result"] for t in ((run / "config.json").read_text(), before["config.json"]))
    assert {**again, "train_minutes": 0} == {**first, "train_minutes": 0}  # the same weights, scored again


def held_out_folder(shapes_dir, tmp_path) -> Path:
    """The shapes as ROOT/train/ with a ROOT/test/ of fresh ones beside it."""
    import shutil

    from vit.datasets import make_shapes

    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root / "train")
    classes = ("circle", "cross", "square", "triangle")
    shutil.copytree(make_shapes(tmp_path / "fresh", per_class=3, size=16, seed=7, classes=classes), root / "test")
    return root


def test_a_budget_the_whole_schedule_leaves_unspent_trains_a_second_model_averaged_in(
    shapes_dir, tmp_path, capsys, monkeypatch
):
    """Where the recipe's whole schedule (its epoch cap, lowered here so the test is quick) ended
    with more of the budget left than it took, a second model trains from another seed on the
    same split in the rest, and the run's model, report, result and exported file are the two's
    averaged logits. --members 1 leaves it out, and so does a cap of one's own (--epochs)."""
    from export.onnx_export import export_run, ort_logits
    from vit import recipe
    from vit.model import Ensemble
    from vit.run import RunDir
    from vit.runtime import Classifier

    monkeypatch.setattr(recipe, "BUDGET_MAX_EPOCHS", 2)
    root = held_out_folder(shapes_dir, tmp_path)
    common = ["--data", root, "--time-budget", "5", "--workers", "0", *TINY_MODEL, "--seed", "3"]
    out = tmp_path / "run"
    assert run_train(*common, "--out", out) == 0
    said = capsys.readouterr().out
    assert "Ensemble: the whole schedule (2 epochs) took" in said and "--members 1 leaves it out" in said
    assert "Model 2 of 2: seed 103" in said and "Ensemble of 2 models: validation accuracy" in said
    assert "budget: the whole schedules of 2 models, the most the recipe trains" in said
    run, member = RunDir(out), RunDir(out / "members" / "1")
    config, own = run.config(), member.config()
    assert config["members"] == ["members/1"] and own["train"]["seed"] == 103 and "members" not in own
    # the rest of the budget: all of it but what the first model took
    assert own["train"]["time_budget"] == pytest.approx(5 - config["result"]["first_model"]["train_minutes"], abs=0.05)
    assert own["model"] == config["model"] and config["result"]["members_planned"] == 2
    same = ("train", "val", "test")  # the same images: the scores of the two and of their mean compare
    assert {k: run.split()[k] for k in same} == {k: member.split()[k] for k in same}
    a, b = run.load_one(), member.load_one()
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    model = run.load_model()
    assert isinstance(model, Ensemble) and len(model.members) == 2
    x = torch.randn(5, 3, *a.config.image_size)
    with torch.no_grad():
        assert torch.allclose(model(x), (a(x) + b(x)) / 2, atol=1e-6)

    result = config["result"]
    first = result["first_model"]
    assert result["members"] == 2 and result["member_val_acc"] == [first["val_acc"], own["result"]["val_acc"]]
    assert result["member_test_acc"] == [first["test_acc"], own["result"]["test_acc"]]
    assert result["train_minutes"] == pytest.approx(first["train_minutes"] + own["result"]["train_minutes"], abs=0.02)

    onnx_path = tmp_path / "m.onnx"
    export_run(out, onnx_path)
    clf = Classifier(onnx_path)
    assert clf.metadata["models"] == "2" and "2 models" in clf.metadata["ensemble"]
    tests = run.split()["test"]
    xs = np.stack([clf.preprocess(root / r) for r, _ in tests])
    with torch.no_grad():
        want = model(torch.from_numpy(xs)).numpy()
    assert np.abs(ort_logits(clf.session, xs) - want).max() < 1e-4  # the file is the two models' mean
    acc = float((want.argmax(1) == np.array([y for _, y in tests])).mean())
    assert result["test_acc"] == pytest.approx(acc, abs=1e-4) == float(clf.metadata["test_accuracy"])

    single = tmp_path / "single"
    assert run_train(*common, "--out", single, "--members", "1") == 0
    assert "Ensemble" not in capsys.readouterr().out and not (single / "members").exists()
    assert "members" not in json.loads((single / "config.json").read_text())
    alone = RunDir(single).load_model().state_dict()
    assert all(torch.equal(alone[k], v) for k, v in a.state_dict().items())  # the first model is the same run
    assert run_train(*common, "--out", tmp_path / "own", "--epochs", "2") == 0
    assert "Ensemble" not in capsys.readouterr().out and not (tmp_path / "own" / "members").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_an_ensemble_stopped_in_its_third_model_resumes_exactly(shapes_dir, tmp_path, capsys):
    """--members 3 (given: no budget needed, each model its whole schedule); Ctrl-C while the
    third model trains leaves the first two finished and untouched by --resume, which continues
    the third and ends where an uninterrupted run does."""
    common = ["--data", shapes_dir, "--epochs", "3", *TINY_MODEL, "--seed", "4", "--members", "3"]
    full = tmp_path / "full"
    assert run_train(*common, "--out", full, "--workers", "0") == 0
    assert [len(metrics(r)) for r in (full, full / "members" / "1", full / "members" / "2")] == [3, 3, 3]
    part = tmp_path / "part"
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, common), "--out", str(part), "--workers", "1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
    )
    third = False
    for line in proc.stdout:
        third = third or line.startswith("Model 3 of 3")
        if third and line.startswith("epoch   1/"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in rest, rest
    assert f"--resume {part}" in rest
    config = json.loads((part / "config.json").read_text())
    assert "result" in config and "members" not in config  # the first model is whole; no ensemble yet
    second = {p.name: p.read_bytes() for p in (part / "members" / "1").iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_train("--resume", part, "--workers", "0") == 0
    said = capsys.readouterr().out
    assert "finished 2 of its models; continuing its ensemble" in said and "Model 3 of 3: resuming" in said
    assert "Model 2 of 3" not in said  # the finished second model is left as it was
    assert {p.name: p.read_bytes() for p in (part / "members" / "1").iterdir() if p.is_file()} == second
    for i in ("1", "2"):
        assert metrics(part / "members" / i) == metrics(full / "members" / i)
        a, b = (load_file(r / "members" / i / "model.safetensors") for r in (full, part))
        assert all(torch.equal(a[k], b[k]) for k in a)
    got, want = (json.loads((r / "config.json").read_text()) for r in (part, full))
    assert got["members"] == want["members"] == ["members/1", "members/2"]
    timing = ("train_minutes", "first_model")
    assert {k: v for k, v in got["result"].items() if k not in timing} == {
        k: v for k, v in want["result"].items() if k not in timing
    }
    assert run_train("--resume", part, "--workers", "0") == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_given_members_share_the_budget_and_are_refused_where_they_cannot_differ(
    shapes_dir, run_dir, tmp_path, capsys, monkeypatch
):
    """--members N with a time budget: the first model gets an N-th of it, each next one its share
    of what is left, said at the start. Members start from other seeds: fine-tuning would start
    every one from the same weights, so it is refused."""
    out = tmp_path / "shared"
    args = ["--data", shapes_dir, "--out", out, "--time-budget", "0.2", "--epochs", "2", "--workers", "0"]
    assert run_train(*args, *TINY_MODEL, "--members", "2") == 0
    said = capsys.readouterr().out
    assert "Time budget: 0.2 min, shared by 2 models: the first 0.1, the others what is left" in said
    assert "Time budget 0.1 min: about" in said  # the first model's own
    first = json.loads((out / "config.json").read_text())["result"]["first_model"]["train_minutes"]
    left = json.loads((out / "members" / "1" / "config.json").read_text())["train"]["time_budget"]
    assert 0.2 - first - 0.03 <= left <= 0.2 - first + 0.01  # the rest: the first ended at its 2 epochs
    # no budget given: the CPU's default is the whole run's, and each model's recipe is for its share
    from vit import recipe

    monkeypatch.setattr(recipe, "BUDGET_MAX_EPOCHS", 2)  # the recipe's cap, lowered so the test is quick
    out = tmp_path / "default"
    assert run_train("--data", shapes_dir, "--out", out, "--workers", "0", *TINY_MODEL, "--members", "2") == 0
    assert json.loads((out / "config.json").read_text())["train"]["time_budget"] == 8
    assert "Time budget: 8 min, shared by 2 models: the first 4" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["result"]["members"] == 2
    assert run_train("--data", shapes_dir, "--out", tmp_path / "ft", "--pretrained", run_dir, "--members", "2") == 2
    err = capsys.readouterr().err
    assert "--members" in err and "--pretrained" in err
    # refused before anything is fetched: a timm name is not downloaded first
    assert (
        run_train(
            "--data", shapes_dir, "--out", tmp_path / "t", "--pretrained", "vit_tiny_patch16_224", "--members", "2"
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--members" in err and "download" not in err
