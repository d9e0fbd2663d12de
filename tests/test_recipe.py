"""The recipe's choices from the data: the mirror check that decides the horizontal flip."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import train
from tests.conftest import TINY_MODEL
from vit.data import THUMB, thumbnail
from vit.recipe import MIXUP_IMAGES, input_size_for, mirror_check, model_for_input, patch_for, scratch_recipe


def hook(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """An 'L'-like stroke drawn by hand: a vertical bar and a foot to the right, jittered."""
    img = Image.new("L", (size, size), int(rng.integers(200, 256)))
    d = ImageDraw.Draw(img)
    x0, y0 = rng.integers(6, 12), rng.integers(4, 9)
    y1, x1 = rng.integers(22, 28), rng.integers(20, 27)
    w = int(rng.integers(2, 5))
    ink = int(rng.integers(0, 60))
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=ink, width=w)
    return img


def blob(rng: np.random.Generator, kind: str, size: int = 32) -> Image.Image:
    """A circle or a square, anywhere: a mirror image is just another circle or square."""
    img = Image.new("L", (size, size), int(rng.integers(200, 256)))
    d = ImageDraw.Draw(img)
    r = int(rng.integers(5, 10))
    cx, cy = rng.integers(r + 1, size - r - 1, size=2)
    box = [cx - r, cy - r, cx + r, cy + r]
    (d.ellipse if kind == "circle" else d.rectangle)(box, outline=int(rng.integers(0, 60)), width=2)
    return img


def mirror_pairs(n: int, seed: int = 0) -> dict[str, list[Image.Image]]:
    """Two classes, each the other's mirror image (like b/d, or a digit and its reflection)."""
    rng = np.random.default_rng(seed)
    hooks = [hook(rng) for _ in range(2 * n)]
    return {"hook": hooks[:n], "mirrored": [h.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for h in hooks[n:]]}


def symmetric_classes(n: int, seed: int = 0) -> dict[str, list[Image.Image]]:
    rng = np.random.default_rng(seed)
    return {k: [blob(rng, k) for _ in range(n)] for k in ("circle", "square")}


def thumbs_of(classes: dict[str, list[Image.Image]]):
    x = [np.frombuffer(thumbnail(im), np.uint8).reshape(THUMB, THUMB) for ims in classes.values() for im in ims]
    y = [i for i, ims in enumerate(classes.values()) for _ in ims]
    return np.stack(x), np.array(y)


def test_mirror_check_finds_classes_that_are_each_others_mirror_images():
    check = mirror_check(*thumbs_of(mirror_pairs(60)))
    assert check.hurts and check.worse > 3 * check.better and check.p < 1e-3, check
    assert "look like other classes" in check.sentence()


def test_mirror_check_keeps_the_flip_where_mirrors_are_the_same_classes():
    check = mirror_check(*thumbs_of(symmetric_classes(60)))
    assert not check.hurts and check.checked == 120, check
    assert "do not look like other classes" in check.sentence()


def test_mirror_check_samples_large_sets_and_ignores_brightness():
    x, y = thumbs_of(mirror_pairs(60))
    brighter = np.clip(x.astype(int) + np.arange(len(x))[:, None, None] % 40, 0, 255).astype(np.uint8)
    check = mirror_check(brighter, y, most=80)
    assert check.checked == 80 and check.hurts, check


def test_mirror_check_says_when_there_are_too_few_images_to_tell():
    x, y = thumbs_of(mirror_pairs(2))
    check = mirror_check(x, y)
    assert not check.hurts and check.worse + check.better < 5
    assert check.sentence().startswith("too few images to tell") and check.sentence().endswith("; kept")
    assert mirror_check(x[:1], y[:1]).checked == 1  # one image: nothing to compare, no error


def write_folder(root, classes: dict[str, list[Image.Image]]) -> None:
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for i, im in enumerate(images):
            im.save(root / name / f"{i:03d}.png")


def noise_glyphs(per_class: int) -> dict[str, list[Image.Image]]:
    """Two classes of random 8 px images: glyph-sized data of a chosen size, for the recipe's rules."""
    rng = np.random.default_rng(0)
    return {c: [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(per_class)] for c in "ab"}


@pytest.mark.parametrize("given", [None, "0.5"])
def test_train_leaves_the_flip_out_for_mirror_image_classes_unless_told(tmp_path, capsys, given):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data, mirror_pairs(40))
    flags = ["--hflip", given] if given else []
    args = ["--data", data, "--out", out, "--epochs", "1", "--workers", "0", *TINY_MODEL, *flags]
    assert train.main([str(a) for a in args]) == 0
    saved = json.loads((out / "config.json").read_text())
    t = saved["train"]
    assert saved["model"]["mirror_average"] is t["mirror_average"] is bool(given)  # from mirrors if trained on them
    said = capsys.readouterr().out
    if given:
        assert t["hflip"] == 0.5 and t["hflip_note"] is None and "Horizontal flip" not in said
    else:
        assert t["hflip"] == 0.0 and t["hflip_note"].startswith("off: mirror images look like other classes")
        assert "Horizontal flip: off" in said and "--hflip sets it" in said
    assert "training images in the smallest class: from scratch" in said and "--pretrained NAME" in said


def test_the_little_data_note_names_the_smallest_class_and_is_quiet_with_enough():
    items = [(f"a/{i}", 0) for i in range(80)] + [(f"b/{i}", 1) for i in range(12)]
    assert train.little_data_note(items, ["a", "b"]).startswith("12 training images in the smallest class")
    assert train.little_data_note(items, ["a", "b", "c"]).startswith("0 training images")
    assert train.little_data_note(items + [(f"b/x{i}", 1) for i in range(38)], ["a", "b"]) is None


def test_a_run_that_learned_next_to_nothing_says_so():
    labels = np.array([0] * 40 + [1] * 30 + [2] * 30)  # always answering class 0 gets 40%
    note = train.learned_little(0.42, labels, 3, 3)
    assert note.startswith("validation accuracy 42.0% is hardly better than always answering the largest class (40.0%)")
    assert "in 3 epochs" in note and "--time-budget" in note
    assert train.learned_little(0.45, labels, 3, 3) is None  # 5% of the way from 40% to 100%: something learned
    assert train.learned_little(0.95, labels, 3, 1) is None
    assert "in 1 epoch." in train.learned_little(0.10, np.arange(10), 10, 1)
    assert train.learned_little(0.0, np.array([], dtype=int), 3, 1) is None


def test_train_keeps_the_flip_for_classes_mirrors_do_not_change(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data, symmetric_classes(40))
    args = ["--data", data, "--out", out, "--epochs", "1", "--workers", "0", *TINY_MODEL]
    assert train.main([str(a) for a in args]) == 0
    saved = json.loads((out / "config.json").read_text())
    t = saved["train"]
    assert t["hflip"] == 0.5 and t["hflip_note"].startswith("on: mirror images do not look like other classes")
    assert saved["model"]["mirror_average"] is True
    args[3] = out = tmp_path / "plain"  # and the user can ask for one view only
    assert train.main([str(a) for a in [*args, "--no-mirror-average"]]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["mirror_average"] is False


def test_glyph_sized_images_get_no_flip_and_the_run_says_why(shapes_dir, tmp_path):
    out = tmp_path / "run"  # the shared shapes are 16 px
    args = ["--data", shapes_dir, "--out", out, "--epochs", "1", "--workers", "0", *TINY_MODEL]
    assert train.main([str(a) for a in args]) == 0
    t = json.loads((out / "config.json").read_text())["train"]
    assert t["hflip"] == 0.0 and t["hflip_note"] == "off: the recipe leaves it out for images of 16 px or less (glyphs)"
    assert t["drop_path"] == 0.1  # hundreds of epochs in a CPU budget: regularised


@pytest.mark.parametrize(
    "images, native, device, drop_path",
    [
        (1500, 8, "cpu", 0.1),
        (1500, 16, "cpu", 0.1),
        (1500, 32, "cpu", 0.0),
        (20_000, 8, "cpu", 0.0),
        (1500, 32, "cuda", 0.1),
    ],
)
def test_stochastic_depth_where_runs_are_long(images, native, device, drop_path):
    """On a CPU only a few thousand glyph-sized images train long enough to need stochastic
    depth; larger images, or more of them, get a few dozen epochs in a budget and underfit. On a
    GPU every run is long."""
    assert scratch_recipe(images, native, device)["drop_path"] == drop_path


@pytest.mark.parametrize(
    "images, native, device, budget, sam",
    [
        (1200, 8, "cpu", None, 0.1),  # the CPU's default budget, 8 minutes
        (1200, 8, "cpu", 10, 0.1),
        (1200, 8, "cpu", 2, 0.0),  # a short budget: plain steps do as well
        (1200, 8, "cpu", 0, 0.0),  # no budget (--time-budget 0)
        (1000, 8, "cpu", 5, 0.1),
        (999, 8, "cpu", 5, 0.0),
        (4999, 8, "cpu", 5, 0.1),
        (5000, 8, "cpu", 5, 0.0),
        (1200, 8, "cpu", 4.9, 0.0),
        (200, 8, "cpu", 10, 0.0),  # tiny data: SAM lost there
        (1200, 32, "cpu", 10, 0.0),  # not glyph-sized: not measured, off
        (20_000, 8, "cpu", 10, 0.0),
        (1200, 8, "cuda", None, 0.0),
    ],
)
def test_sharpness_aware_steps_for_glyph_sized_data_in_a_long_cpu_budget(images, native, device, budget, sam):
    """SAM where more plain epochs stopped helping (a thousand or more glyph-sized images in 5
    minutes or more of a CPU), and nowhere else."""
    assert scratch_recipe(images, native, device, budget)["sam"] == sam


@pytest.mark.parametrize(
    "images, native, device, budget, mixup",
    [
        (85, 8, "cpu", None, 0.8),  # ten digits a class, less the validation images; the default 8 minutes
        (170, 8, "cpu", None, 0.8),
        (170, 16, "cpu", None, 0.8),
        (170, 8, "cpu", 10, 0.8),
        (170, 8, "cpu", 0, 0.8),  # no budget: the recipe's whole 300 epochs
        (170, 8, "cuda", None, 0.8),  # the same 300 epochs on a GPU
        (170, 8, "cpu", 2, 0.0),  # a budget shorter than the one measured
        (170, 8, "cpu", 7.9, 0.0),
        (170, 8, "cuda", 2, 0.0),
        (MIXUP_IMAGES - 1, 8, "cpu", None, 0.8),
        (MIXUP_IMAGES, 8, "cpu", None, 0.0),  # more images: not measured up to SAM's 1,000, off
        (1500, 8, "cpu", None, 0.0),
        (170, 32, "cpu", None, 0.0),  # not glyph-sized: not measured, off
    ],
)
def test_mixup_for_tiny_glyph_sized_data_given_the_whole_schedule(images, native, device, budget, mixup):
    """Tiny glyph-sized data, which trains the recipe's whole schedule in the budget and fits
    its images long before the end, gets mixup; shorter budgets, larger data and larger images
    do not."""
    recipe = scratch_recipe(images, native, device, budget)
    assert (recipe["mixup"], recipe["cutmix"]) == (mixup, 0.0)


def answers(right: int, n: int = 200, shift: int = 0) -> torch.Tensor:
    """Per-image correctness: ``right`` of ``n`` right, the wrong ones starting at ``shift``."""
    c = torch.ones(n, dtype=torch.bool)
    c[torch.arange(shift, shift + n - right) % n] = False
    return c


def settled(best: torch.Tensor | None, best_epoch: int, last: dict, epoch: int = 50, steps: int = 10_000):
    """Trainer.settle on a stand-in trainer: what it keeps, and whether it wrote weights."""
    from types import SimpleNamespace

    from vit.engine import State, Trainer

    for v in last.values():  # accuracies as evaluate() gives them: float32 means
        v["acc"] = v["correct"].float().mean().item()
    acc = best.float().mean().item() if best is not None else 0.99
    state = State(epoch=epoch, best_acc=acc, best_loss=0.3, best_epoch=best_epoch, best_weights="raw")
    state.global_step, state.ema_decay = steps, 0.999  # an EMA of 10,000 steps, horizon 1,000
    state.best_correct = best
    saved = []
    t = SimpleNamespace(state=state, d=SimpleNamespace(main=True), save_best=saved.append)
    Trainer.settle(t, last)
    return t.state, saved


def test_a_saturated_validation_split_keeps_the_last_weights():
    """100% on validation at epoch 22, and one or two images fewer at the end: noise."""
    for wrong in (1, 2):
        raw, ema = answers(20 - wrong, 20), answers(20 - wrong, 20, shift=5)
        last = {"raw": dict(correct=raw, loss=0.4), "ema": dict(correct=ema, loss=0.5)}
        state, saved = settled(answers(20, 20), 22, last)
        assert state.best_epoch == 50 and saved == ["ema"], state.kept  # the averaged weights
        assert state.kept.startswith("the last epoch (ema weights), as good within noise")
        assert f"got {wrong} right" in state.kept


def test_an_earlier_epoch_is_kept_only_when_clearly_better_on_the_same_images():
    # the same 190 of 200 right, and 5 more: 5 to 0 disagreements (p = 1/32)
    state, saved = settled(answers(195), 30, {"raw": dict(correct=answers(190), loss=0.3)})
    assert state.best_epoch == 30 and saved == [] and state.best_acc == pytest.approx(0.975)
    assert state.kept.startswith("epoch 30 (raw weights), clearly better on validation") and "p=0.031" in state.kept
    # the same accuracies on different images: 10 to 5 disagreements is no evidence (p = 0.15)
    state, saved = settled(answers(195), 30, {"raw": dict(correct=answers(190, shift=5), loss=0.3)})
    assert state.best_epoch == 50 and saved == ["raw"] and state.best_acc == pytest.approx(0.95)


def test_a_best_last_epoch_and_an_old_checkpoint_keep_what_they_have():
    state, saved = settled(answers(180), 50, {"raw": dict(correct=answers(180), loss=0.3)})
    assert state.best_epoch == 50 and saved == [] and "also the best on validation" in state.kept
    state, saved = settled(None, 30, {"raw": dict(correct=answers(150), loss=0.3)})  # no per-image answers
    assert state.best_epoch == 30 and saved == [] and state.kept == "epoch 30 (raw weights), the best on validation"


def test_a_small_tilt_is_not_enough_to_drop_the_flip():
    """Adding any images breaks a few right answers: a tilt must be significant and twofold."""
    from vit.recipe import MirrorCheck, sign_test

    tilt = MirrorCheck(800, 19, 11, sign_test(19, 30))  # crops of two photos
    assert not tilt.hurts and tilt.sentence().startswith("no clear sign")
    big = MirrorCheck(8000, 190, 110, sign_test(190, 300))  # the same tilt, ten times the images
    assert big.p < 1e-5 and not big.hurts
    letters = MirrorCheck(1560, 35, 10, sign_test(35, 45))
    assert letters.hurts and letters.sentence().startswith("mirror images look like other classes")


def test_the_averaged_weights_win_over_the_raw_ones_unless_clearly_worse():
    """The best on validation was the last epoch's raw weights, by two images: the EMA stays."""
    last = {"raw": dict(correct=answers(198), loss=0.3), "ema": dict(correct=answers(196), loss=0.3)}
    state, saved = settled(answers(198), 50, last)
    assert state.best_weights == "ema" and saved == ["ema"] and "as good within noise" in state.kept
    last = {"raw": dict(correct=answers(200), loss=0.3), "ema": dict(correct=answers(190), loss=0.3)}
    state, saved = settled(answers(200), 50, last)
    assert state.best_weights == "raw" and saved == [] and "clearly better" in state.kept

    # after 2,000 steps at decay 0.999 the EMA still holds 14% of its first weights: the better wins
    last = {"raw": dict(correct=answers(198), loss=0.3), "ema": dict(correct=answers(196), loss=0.3)}
    state, saved = settled(answers(198), 50, last, steps=2_000)
    assert state.best_weights == "raw" and saved == [] and "also the best on validation" in state.kept


@pytest.mark.parametrize(
    "native, device, budget, want",
    [
        (8, "cpu", None, (16, 2)),  # digit-sized, small data: doubled, an 8x8 grid everywhere
        (12, "cuda", 2, (16, 2)),
        (20, "cuda", None, (16, 4)),
        (32, "cpu", None, (32, 4)),  # the CPU's default 8-minute budget: 8x8
        (64, "cpu", 8, (64, 8)),
        (32, "cpu", 2, (32, 8)),  # a short budget on a CPU: 4x4 tokens, more epochs
        (64, "cpu", 3.5, (64, 16)),
        (64, "cpu", 4, (64, 8)),  # 4 minutes is not short
        (64, "cpu", 0, (64, 8)),  # no budget
        (32, "cuda", 2, (32, 4)),  # on a GPU: 8x8
        (500, "cpu", 2, (128, 16)),  # large images: the paper's 16-pixel patches
        (500, "cuda", None, (224, 16)),
    ],
)
def test_the_token_grid_follows_the_image_size_the_device_and_the_budget(native, device, budget, want):
    recipe = scratch_recipe(1500, native, device, budget)
    size, patch = recipe["image_size"], recipe["patch_size"]
    assert (size, patch) == want and size % patch == 0 and (patch & (patch - 1)) == 0  # the conv stem halves
    default = 8.0 if device == "cpu" else None
    assert recipe["time_budget"] == (None if budget == 0 else budget if budget is not None else default)
    assert input_size_for(native, device, recipe["time_budget"]) == want


def test_digit_sized_images_get_a_fine_grid_and_a_narrower_model_only_as_small_data():
    """Up to 12 px and under 5,000 images: the image resized to 16 px in 2 px patches (8x8
    tokens) with the narrowed small model; more images keep 8 px (4x4) and get model_for's
    larger model; 13 px and up are unchanged."""
    small = scratch_recipe(1_347, 8, "cpu")
    assert (small["image_size"], small["patch_size"]) == (16, 2)
    assert {k: small[k] for k in ("dim", "depth", "heads", "mlp_dim")} == dict(dim=96, depth=6, heads=3, mlp_dim=192)
    assert small["drop_path"] == 0.1  # still glyphs, still small data
    many = scratch_recipe(20_000, 8, "cpu")
    assert (many["image_size"], many["patch_size"], many["dim"]) == (8, 2, 192)
    for native, n, want in ((12, 4_999, (16, 2)), (12, 5_000, (8, 2)), (13, 4_999, (16, 4)), (4, 10, (16, 2))):
        assert input_size_for(native, "cpu", 8, num_images=n) == want, (native, n)
        assert (scratch_recipe(n, native, "cpu")["image_size"], scratch_recipe(n, native, "cpu")["patch_size"]) == want
    narrow = {"dim": 96, "depth": 6, "heads": 3, "mlp_dim": 192}
    assert model_for_input(4_999, 12, 16, 2) == narrow
    assert model_for_input(5_000, 8, 16, 2)["dim"] == 192  # many images: the larger model
    assert model_for_input(1_000, 13, 16, 2)["dim"] == 128  # not digit-sized
    assert model_for_input(1_000, 8, 8, 2)["dim"] == model_for_input(1_000, 8, 16, 4)["dim"] == 128  # another grid


def test_a_chosen_input_for_digit_sized_images_gets_the_model_measured_for_it(tmp_path):
    """train.py: 8 px images get the narrowed model on the recipe's 16 px / 2 grid, also when its
    16 px is asked for; asking for 8 px (a 4x4 grid) gives the small model of width 128 again;
    a width given is kept, with the usual small model's heads when none are given."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    base = ["--data", tmp_path / "data", "--epochs", "1", "--workers", "0", "--device", "cpu", "--batch-size", "8"]
    for name, extra, want in (
        ("recipe", [], (16, 2, 96, 3)),
        ("eight", ["--image-size", "8"], (8, 2, 128, 4)),
        ("sixteen", ["--image-size", "16"], (16, 2, 96, 3)),  # the recipe's own size keeps its patch
        ("wide", ["--dim", "64", "--heads", "2"], (16, 2, 64, 2)),
        ("width", ["--dim", "128"], (16, 2, 128, 4)),  # a width alone: the usual small model's heads
    ):
        assert train.main([str(a) for a in [*base, "--out", tmp_path / name, *extra]]) == 0
        m = json.loads((tmp_path / name / "config.json").read_text())["model"]
        assert (m["image_size"][0], m["patch_size"], m["dim"], m["heads"]) == want, name


def test_a_chosen_image_size_gets_a_patch_that_fits_it(tmp_path, capsys):
    """--image-size without --patch-size: the patch follows the size chosen, not the images'
    (64 px images would give patch 16, which 40 does not divide)."""
    assert [patch_for(s, "cpu", 2) for s in (8, 24, 32, 40, 48, 64, 100, 128)] == [2, 4, 8, 8, 8, 16, 4, 16]
    assert [patch_for(s, "cpu", 8) for s in (32, 40, 56, 64)] == [4, 4, 8, 8]
    assert [patch_for(s, "cuda") for s in (32, 40, 64, 224)] == [4, 4, 8, 16]
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    out = tmp_path / "run"
    args = ["--data", tmp_path / "data", "--out", out, "--epochs", "1", "--workers", "0", "--device", "cpu"]
    assert train.main([str(a) for a in [*args, "--image-size", "40", "--time-budget", "2", *TINY_MODEL]]) == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["image_size"] == [40, 40] and model["patch_size"] == 8
    assert "40x40 input, patch 8 (5x5 tokens)," in capsys.readouterr().out
    args[3] = out = tmp_path / "short"  # the recipe's own size, in a short budget: a coarser grid, said so
    assert train.main([str(a) for a in [*args, "--time-budget", "2", *TINY_MODEL]]) == 0
    said = capsys.readouterr().out
    assert "64x64 input, patch 16 (4x4 tokens, coarser for a short budget)," in said and "token grid:" not in said
    args[3] = out = tmp_path / "fine"  # a size with no patch near the recipe's: trained, and said why it is slow
    assert train.main([str(a) for a in [*args, "--image-size", "30", "--time-budget", "2", *TINY_MODEL]]) == 0
    said = capsys.readouterr().out
    assert "takes patch 2 at most" in said and "15x15 token grid" in said and "--image-size 32" in said
    args[3] = out = tmp_path / "fifty"  # the size suggested does take the patch it is said to
    assert train.main([str(a) for a in [*args, "--image-size", "50", *TINY_MODEL]]) == 0
    said = capsys.readouterr().out
    assert "takes patch 2 at most" in said and "--image-size 48 (patch 4, 12x12)" in said
    args[3] = out = tmp_path / "taken"
    assert train.main([str(a) for a in [*args, "--image-size", "48", *TINY_MODEL]]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["patch_size"] == 4
    assert "takes patch" not in capsys.readouterr().out
    args[3] = out = tmp_path / "odd"  # none at all for the conv stem: refused before anything is written
    assert train.main([str(a) for a in [*args, "--image-size", "31", "--time-budget", "2", *TINY_MODEL]]) == 2
    said = capsys.readouterr().err
    assert "--image-size 31" in said and "use --image-size 32 (patch 8" in said and not out.exists()
    args[3] = out = tmp_path / "one"  # the linear stem takes any patch that divides: one token is said so
    flags = ["--image-size", "31", "--stem", "patch", "--patch-size", "31"]
    assert train.main([str(a) for a in [*args, *flags, *TINY_MODEL]]) == 0
    said = capsys.readouterr().out
    assert "leaves a 1x1 token grid (one token: attention has nothing to relate)" in said
    assert "no patch of 2 px or more divides 31x31 into 4x4 or more: --image-size 32" in said
    args[3] = out = tmp_path / "two"  # a patch the user chose is not the short budget's doing
    assert train.main([str(a) for a in [*args, "--patch-size", "32", "--time-budget", "2", *TINY_MODEL]]) == 0
    said = capsys.readouterr().out
    assert "patch 32 (2x2 tokens)," in said and "--patch-size 16 gives 4x4" in said


@pytest.mark.parametrize("cpus, workers", [(2, 0), (3, 2)])
def test_loader_processes_follow_the_cores(shapes_dir, tmp_path, monkeypatch, cpus, workers):
    """On 2 cores, images held in memory are loaded in the training process (a loader process
    would only take cores from the model); with more cores, loader processes."""
    import vit.cpus

    monkeypatch.setattr(vit.cpus, "usable_cpus", lambda: cpus)
    out = tmp_path / "run"
    args = ["--data", shapes_dir, "--out", out, "--epochs", "1", "--device", "cpu", *TINY_MODEL]
    assert train.main([str(a) for a in args]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["workers"] == workers


def test_the_recipes_sam_follows_the_budget_the_run_gets(tmp_path):
    """A thousand glyph-sized training images: SAM with a time budget of 5 minutes or more, and
    none when --epochs without --time-budget turns the budget off (the default budget of 8
    minutes is then not the run's)."""
    write_folder(tmp_path / "data", noise_glyphs(600))
    common = ["--data", tmp_path / "data", "--epochs", "1", "--workers", "0", *TINY_MODEL]
    sams = []
    for out, extra in (("plain", []), ("budget", ["--time-budget", "5"])):
        assert train.main([str(a) for a in [*common, "--out", tmp_path / out, *extra]]) == 0
        sams.append(json.loads((tmp_path / out / "config.json").read_text())["train"]["sam"])
    assert sams == [0.0, 0.1]


def test_the_recipes_mixup_is_said_with_its_reason_and_its_scores_are_named(tmp_path, capsys):
    """Tiny glyph-sized data: the run says why mixup is on (no budget: the whole schedule) or off
    (a budget shorter than the one measured), names the epoch lines' training scores as mixed
    when it is on, and says nothing of it when --mixup is given."""
    write_folder(tmp_path / "data", noise_glyphs(20))
    common = ["--data", tmp_path / "data", "--epochs", "1", "--workers", "0", *TINY_MODEL]
    seen = {}
    for out, extra in (("plain", []), ("short", ["--time-budget", "2"]), ("given", ["--mixup", "0.5"])):
        assert train.main([str(a) for a in [*common, "--out", tmp_path / out, *extra]]) == 0
        t = json.loads((tmp_path / out / "config.json").read_text())["train"]
        seen[out] = (t["mixup"], t["mixup_note"], capsys.readouterr().out)
    mixup, note, said = seen["plain"]
    assert mixup == 0.8 and note.startswith("on (0.8)") and f"Mixup: {note} (--mixup sets it)" in said
    assert "mixed_loss" in said and "mixed_acc" in said
    mixup, note, said = seen["short"]
    assert mixup == 0.0 and note.startswith("off:") and "Mixup: off" in said and "mixed_acc" not in said
    mixup, note, said = seen["given"]
    assert mixup == 0.5 and note is None and "Mixup:" not in said and "mixed_acc" in said
