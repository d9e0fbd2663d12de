"""The recipe's choices from the data: the mirror check that decides the horizontal flip."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import train
from tests.conftest import TINY_MODEL
from vit.data import THUMB, thumbnail
from vit.recipe import mirror_check


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
    assert "do not hurt" in check.sentence()


def test_mirror_check_samples_large_sets_and_ignores_brightness():
    x, y = thumbs_of(mirror_pairs(60))
    brighter = np.clip(x.astype(int) + np.arange(len(x))[:, None, None] % 40, 0, 255).astype(np.uint8)
    check = mirror_check(brighter, y, most=80)
    assert check.checked == 80 and check.hurts, check


def write_folder(root, classes: dict[str, list[Image.Image]]) -> None:
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for i, im in enumerate(images):
            im.save(root / name / f"{i:03d}.png")


@pytest.mark.parametrize("given", [None, "0.5"])
def test_train_leaves_the_flip_out_for_mirror_image_classes_unless_told(tmp_path, capsys, given):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data, mirror_pairs(40))
    flags = ["--hflip", given] if given else []
    args = ["--data", data, "--out", out, "--epochs", "1", "--workers", "0", *TINY_MODEL, *flags]
    assert train.main([str(a) for a in args]) == 0
    t = json.loads((out / "config.json").read_text())["train"]
    said = capsys.readouterr().out
    if given:
        assert t["hflip"] == 0.5 and t["hflip_note"] is None and "Horizontal flip" not in said
    else:
        assert t["hflip"] == 0.0 and t["hflip_note"].startswith("off: mirror images look like other classes")
        assert "Horizontal flip: off" in said and "--hflip sets it" in said


def test_train_keeps_the_flip_for_classes_mirrors_do_not_change(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data, symmetric_classes(40))
    args = ["--data", data, "--out", out, "--epochs", "1", "--workers", "0", *TINY_MODEL]
    assert train.main([str(a) for a in args]) == 0
    t = json.loads((out / "config.json").read_text())["train"]
    assert t["hflip"] == 0.5 and t["hflip_note"].startswith("on: mirror images do not hurt")


def settled(best_acc: float, best_epoch: int, last: dict, epoch: int = 50, n_val: int = 200):
    """Trainer.settle on a stand-in trainer: what it keeps, and whether it wrote weights."""
    from types import SimpleNamespace

    from vit.engine import State, Trainer

    saved = []
    t = SimpleNamespace(
        state=State(epoch=epoch, best_acc=best_acc, best_loss=0.3, best_epoch=best_epoch, best_weights="raw"),
        val_loader=SimpleNamespace(dataset=range(n_val)),
        d=SimpleNamespace(main=True),
        save_best=saved.append,
    )
    Trainer.settle(t, last)
    return t.state, saved


def test_a_saturated_validation_split_keeps_the_last_weights():
    """100% on validation at epoch 22 and again at the end: the split cannot tell them apart."""
    state, saved = settled(1.0, 22, {"raw": dict(acc=1.0, loss=0.4), "ema": dict(acc=1.0, loss=0.35)})
    assert (state.best_epoch, state.best_weights, saved) == (50, "ema", ["ema"])
    assert state.kept.startswith("the last epoch's (ema weights)") and "of epoch 22's 100.0%" in state.kept


def test_the_last_weights_are_kept_within_noise_and_not_beyond():
    # 200 images at 99%: two standard errors are 1.4 points, plus one image 0.5
    state, saved = settled(0.99, 30, {"raw": dict(acc=0.975, loss=0.3)})
    assert state.best_epoch == 50 and saved == ["raw"] and state.best_acc == 0.975
    state, saved = settled(0.99, 30, {"raw": dict(acc=0.965, loss=0.3)})
    assert state.best_epoch == 30 and saved == [] and state.best_acc == 0.99
    assert state.kept.startswith("epoch 30's (raw weights)") and "by more than 1.9%" in state.kept


def test_a_best_last_epoch_is_said_so():
    state, saved = settled(0.9, 50, {"raw": dict(acc=0.9, loss=0.3)})
    assert state.best_epoch == 50 and saved == [] and "the best on validation" in state.kept
