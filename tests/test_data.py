"""Folder scanning, decoding every kind of image one way, and the split."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vit.data import DataError, EvalTransform, cache_side_for, scan_folder, split_train_val
from vit.imageio import BadImage, Preprocessing, open_image, preprocess


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def add_bad_files(root):
    """One file of every unusable kind in class 'circle'; returns {relative path: reason fragment}."""
    d = root / "circle"
    good = png_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4)
    (d / "truncated.png").write_bytes(
        png_bytes(Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)))[:300]
    )
    (d / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "mislabelled.jpg").write_bytes(good)  # PNG content, .jpg name: used, with a note
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (d / ".ipynb_checkpoints").mkdir()
    (d / ".ipynb_checkpoints" / "x.png").write_bytes(good)
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._circle.png").write_bytes(good)
    (d / "huge.png").write_bytes(png_bytes(Image.new("RGB", (300, 300))))  # over the test's pixel limit
    return {
        "circle/corrupt.jpg": "corrupt or truncated",
        "circle/random.png": "not an image",
        "circle/truncated.png": "corrupt or truncated",
        "circle/empty.png": "empty file",
        "circle/notes.txt": "not an image file (.txt)",
        "circle/.DS_Store": "hidden file",
        "circle/.ipynb_checkpoints/x.png": "hidden file",
        "circle/huge.png": "over the limit",
    }


def test_every_bad_file_kind_is_skipped_and_reported(shapes_copy):
    expected = add_bad_files(shapes_copy)
    scan = scan_folder(shapes_copy, max_pixels=200 * 200)
    skipped = dict(scan.skipped)
    for rel, fragment in expected.items():
        assert rel in skipped, rel
        assert fragment in skipped[rel], (rel, skipped[rel])
    assert "__MACOSX" not in scan.classes
    assert scan.classes == ["circle", "cross", "square", "triangle"]
    assert len(scan.train) == 49  # every good image kept, the mislabelled PNG among them
    assert "circle/mislabelled.jpg" not in skipped
    with pytest.raises(DataError, match="unusable files"):
        scan_folder(shapes_copy, strict=True, max_pixels=200 * 200)


def test_every_mode_decodes_to_upright_rgb(tmp_path):
    base = Image.fromarray(np.random.randint(0, 255, (10, 20, 3), np.uint8))  # 20 wide, 10 high
    cases = {
        "l.png": base.convert("L"),
        "la.png": base.convert("LA"),
        "rgba.png": base.convert("RGBA"),
        "p.png": base.convert("P"),
        "one.png": base.convert("1"),
        "cmyk.jpg": base.convert("CMYK"),
        "i16.png": Image.fromarray((np.random.rand(10, 20) * 65535).astype(np.uint16)),
    }
    pt = base.convert("P")
    pt.info["transparency"] = 0
    cases["p_transparent.png"] = pt
    for name, img in cases.items():
        (tmp_path / name).write_bytes(png_bytes(img, "JPEG" if name.endswith(".jpg") else "PNG"))
        out = open_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (20, 10), name
    # EXIF orientation 6 (rotate 90 degrees clockwise) is applied: the image comes out upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rotated.jpg").write_bytes(png_bytes(base, "JPEG", exif=exif))
    assert open_image(tmp_path / "rotated.jpg").size == (10, 20)
    # Transparent pixels become white, not black.
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert open_image(clear).getpixel((0, 0)) == (255, 255, 255)


def test_animated_image_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = open_image(tmp_path / "anim.gif").getpixel((0, 0))
    assert r > 200 and b < 50


def test_open_image_rejects_non_images():
    with pytest.raises(BadImage, match="not an image"):
        open_image(io.BytesIO(b"hello"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: r / "missing", "does not exist"),
        (lambda r: _mk(r, {}), "no class folders"),
        (lambda r: _mk(r, {"a": 3}), "only one class"),
        (lambda r: _mk(r, {"a": 3, "b": 1}), "fewer than 2 usable images: b \\(1\\)"),
        (lambda r: _mk(r, {"train/a": 2, "train/b": 2, "val/a": 0, "val/b": 0}), "holds no images"),
        (lambda r: _mk(r, {"training/a": 2, "training/b": 2, "validate/a": 1, "validate/b": 1}), "looks like a train"),
    ],
)
def test_layout_errors_say_what_to_do(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        scan_folder(make(tmp_path))


def _mk(root, counts):
    root.mkdir(exist_ok=True)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    return root


def test_split_is_stratified_deterministic_and_keeps_duplicates_together(shapes_copy):
    for i in range(3):  # copies inside a class and across classes
        shutil.copy(shapes_copy / "circle" / "circle_00000.png", shapes_copy / "circle" / f"copy{i}.png")
    shutil.copy(shapes_copy / "cross" / "cross_00001.png", shapes_copy / "square" / "looks_like_cross.png")
    scan = scan_folder(shapes_copy)
    a = split_train_val(scan, 0.25, seed=3)
    assert a == split_train_val(scan, 0.25, seed=3)
    assert a[:2] != split_train_val(scan, 0.25, seed=4)[:2]
    train, val, test, notes = a
    assert test == []
    assert {lab for _, lab in val} == set(range(4))  # every class validated
    train_hashes = {scan.hashes[r] for r, _ in train}
    assert not any(scan.hashes[r] in train_hashes for r, _ in val)
    assert any("more than one class" in n for n in notes)
    assert len(train) + len(val) == len(scan.train)


def test_given_val_folder_is_used_and_cleaned_of_train_copies(tmp_path):
    root = _mk(tmp_path / "d", {"train/a": 3, "train/b": 3, "validation/a": 0, "validation/b": 0})
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "validation" / "a" / "v.png")
    shutil.copy(root / "train" / "b" / "0.png", root / "validation" / "b" / "dup.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "validation" / "b" / "w.png")
    scan = scan_folder(root)
    train, val, _, notes = split_train_val(scan)
    assert sorted(r for r, _ in val) == ["validation/a/v.png", "validation/b/w.png"]
    assert any("identical to train" in n for n in notes)


def test_content_decides_not_the_extension(tmp_path):
    """Item 4: a PNG saved as .jpg, a WebP saved as .png and a JPEG without an extension are used."""
    root = _mk(tmp_path / "d", {"a": 2, "b": 2})
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    (root / "a" / "really_png.jpg").write_bytes(png_bytes(img, "PNG"))
    (root / "b" / "really_webp.png").write_bytes(png_bytes(img, "WEBP"))
    (root / "b" / "download").write_bytes(png_bytes(img, "JPEG"))
    scan = scan_folder(root)
    used = {r for r, _ in scan.train}
    assert {"a/really_png.jpg", "b/really_webp.png", "b/download"} <= used and not scan.skipped
    notes = dict(scan.notes)
    assert "content is PNG" in notes["a/really_png.jpg"] and "WEBP" in notes["b/really_webp.png"]
    assert "JPEG image with the extension (none)" in notes["b/download"]


@pytest.mark.parametrize(
    "folders, classes, layout",
    [
        # Item 5: folders named train/val/test among classes are classes.
        ({"train": 2, "cat": 2, "dog": 2}, ["cat", "dog", "train"], "train/ read as a class"),
        ({"train": 2, "val": 2}, ["train", "val"], "one sub-folder per class"),  # images directly inside: classes
        ({"test": 2, "val": 2, "dog": 2}, ["dog", "test", "val"], "test/, val/ read as classes"),
        # Unambiguous split folders.
        ({"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1}, ["a", "b"], "val/ to validate on"),
        ({"train/a": 3, "train/b": 3, "test/a": 1, "test/b": 1}, ["a", "b"], "test/ held out"),
        ({"train/a": 2, "train/b": 2, "valid/a": 1, "valid/b": 1}, ["a", "b"], "valid/ to validate on"),
    ],
)
def test_layout_is_read_unambiguously_and_said(tmp_path, folders, classes, layout):
    scan = scan_folder(_mk(tmp_path / "d", folders))
    assert scan.classes == classes and layout in scan.layout


def test_test_folder_is_held_out_and_cleaned_of_copies(tmp_path):
    root = _mk(tmp_path / "d", {"train/a": 4, "train/b": 4, "test/a": 0, "test/b": 0})
    Image.new("RGB", (8, 8), (7, 70, 7)).save(root / "test" / "a" / "t.png")
    shutil.copy(root / "train" / "b" / "1.png", root / "test" / "b" / "leak.png")
    Image.new("RGB", (8, 8), (7, 7, 70)).save(root / "test" / "b" / "u.png")
    scan = scan_folder(root)
    split = split_train_val(scan, 0.25, seed=0)
    assert [r for r, _ in split.test] == ["test/a/t.png", "test/b/u.png"]
    assert not {r for r, _ in split.test} & {r for r, _ in split.train + split.val}
    assert any("test images identical" in n for n in split.notes)


def test_a_large_duplicate_group_cannot_fill_validation(tmp_path):
    """Item 7: 30 identical files and 10 distinct ones in a class: validation keeps about its share."""
    root = _mk(tmp_path / "d", {"a": 10, "b": 40})
    dup = png_bytes(Image.new("RGB", (8, 8), (1, 200, 3)))
    for i in range(30):
        (root / "a" / f"dup{i}.png").write_bytes(dup)
    scan = scan_folder(root)
    for seed in range(5):
        train, val, _, _ = split_train_val(scan, 0.15, seed=seed)
        val_a = [r for r, y in val if y == 0]
        assert 1 <= len(val_a) <= round(0.15 * 40), (seed, len(val_a))  # never the 30-file group
        assert not any("dup" in r for r in val_a)


def test_classes_made_only_of_copies_are_refused_before_training(tmp_path):
    """Copies stay on one side of the split, so a folder whose every class is one image copied,
    or whose copies come in groups too large for the validation share, leaves validation empty:
    refused at the split, saying what to do, not when the first validation pass finds nothing
    to score. One class with a different image is enough."""
    root = tmp_path / "copies"
    for cls, colour in (("a", "black"), ("b", "white")):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("L", (8, 8), colour).save(root / cls / f"{i}.png")
    with pytest.raises(DataError, match=r"in every class the images are copies of one image \(2 different images"):
        split_train_val(scan_folder(root))
    for cls, colour in (("a", "grey"), ("b", "red")):  # a second group of copies in each class: too large
        for i in range(8):  # for the default share, not for half
            Image.new("RGB", (8, 8), colour).save(root / cls / f"second {i}.png")
    with pytest.raises(DataError, match=r"groups too large for its validation share \(--val-fraction 0.15; 4 diff"):
        split_train_val(scan_folder(root))
    assert len(split_train_val(scan_folder(root), val_fraction=0.5).val) == 16
    Image.new("L", (8, 8), 50).save(root / "b" / "other.png")
    train, val, _, notes = split_train_val(scan_folder(root))
    assert len(val) == 1 and len(train) == 32 and any("class 'a'" in n for n in notes)


def test_max_pixels_can_raise_the_limit_above_pils_default(tmp_path, monkeypatch):
    """Item 14: PIL's own module-wide limit no longer decides when a larger one is asked for."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # stands in for PIL's 89.5 MP
    path = tmp_path / "big.png"
    Image.new("RGB", (60, 60)).save(path)  # 3,600 pixels: over PIL's limit (twice over: an error in PIL)
    assert open_image(path, max_pixels=5000).size == (60, 60)
    with pytest.raises(BadImage, match="over the limit of 3,000"):
        open_image(path, max_pixels=3000)
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # restored


def test_cache_keeps_the_resolution_the_model_needs(tmp_path):
    """Item 3: for a 384 px model at crop 0.875 the cache keeps 438 px, and validation on the
    cache equals the runtime's preprocessing of the file itself."""
    root = _mk(tmp_path / "d", {"a": 0, "b": 0})
    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (600, 500, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    side = cache_side_for((384, 384), 0.875)
    scan = scan_folder(root, cache=True, cache_side=side)
    cached = scan.images["a/0.png"]
    assert min(cached.size) == side == 438
    prep = Preprocessing((384, 384), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    from_cache = EvalTransform(prep)(cached).numpy()
    from_disk = preprocess(open_image(root / "a" / "0.png"), prep.image_size, prep.mean, prep.std, 0.875, "bicubic")
    assert np.abs(from_cache - from_disk).max() <= 1e-6
    small = scan_folder(root, cache=True, cache_side=1000)  # never upsampled
    assert small.images["a/0.png"].size == (500, 600)


def test_everything_handed_to_loader_workers_pickles(shapes_dir):
    """Item 1: spawn and forkserver pickle the dataset and its transforms."""
    import pickle

    from vit.data import FolderDataset, train_transform

    scan = scan_folder(shapes_dir)
    et = EvalTransform(Preprocessing((16, 16), [0.5] * 3, [0.5] * 3, "bicubic", 1.0))
    tt = train_transform((16, 16), [0.5] * 3, [0.5] * 3, "bicubic", "trivial", 0.5, 0.5, 0.25)
    for ds in (FolderDataset(scan, scan.train, et), FolderDataset(scan, scan.train, tt)):
        back = pickle.loads(pickle.dumps(ds))
        assert back[0][0].shape == ds[0][0].shape == (3, 16, 16)


def test_a_long_thin_image_is_not_resized_to_gigabytes():
    """A 2 x 200,000 px image on a 224 px model would be resized to 256 x 25.6 million (26 GB)
    before the crop; only the region the crop keeps is resized. Run where 1 GiB of address
    space is all there is: the full resize could not even start."""
    import subprocess
    import sys

    code = (
        "import resource, numpy as np; from PIL import Image; from vit.imageio import resize_for_eval\n"
        "img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200_000, 2, 3), dtype=np.uint8))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        "print(resize_for_eval(img, (224, 224), 0.875, 'bicubic').size)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "(224, 224)" in res.stdout, res.stderr[-500:]
    # An ordinary image takes the ordinary path: the full resize, then the crop.
    from vit.imageio import resize_for_eval

    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    want = small.resize((256, 384), Image.Resampling.BICUBIC).crop((16, 80, 240, 304))
    assert np.array_equal(np.asarray(resize_for_eval(small, (224, 224), 0.875, "bicubic")), np.asarray(want))


def test_affine_augmentation_fills_with_the_images_own_background():
    """A glyph on paper stays on paper: the corners a rotation uncovers take the border colour,
    and the strokes move (the pose changes, not the class)."""
    import torch

    from vit.data import BorderAffine

    torch.manual_seed(0)
    paper = Image.new("RGB", (32, 32), (250, 245, 230))
    ImageDraw.Draw(paper).line([(16, 4), (16, 28)], fill=(0, 0, 0), width=3)
    moved = [np.asarray(BorderAffine(degrees=30)(paper)) for _ in range(8)]
    for m in moved:
        assert tuple(m[0, 0]) == (250, 245, 230) and tuple(m[-1, -1]) == (250, 245, 230)
    assert any(not np.array_equal(m, np.asarray(paper)) for m in moved)
    night = Image.new("L", (8, 8), 0)  # scikit-learn's digits: white ink on black
    assert np.asarray(BorderAffine(degrees=30)(night)).max() == 0
