"""Folder scanning, decoding every kind of image one way, and the split."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from vit.data import DataError, scan_folder, split_train_val
from vit.imageio import BadImage, open_image


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
    (d / "mislabelled.jpg").write_bytes(good)  # PNG content, .jpg name
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
        "circle/mislabelled.jpg": "content is PNG but the extension says JPEG",
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
    assert len(scan.train) == 48  # every good image kept
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
    train, val, notes = a
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
    train, val, notes = split_train_val(scan)
    assert sorted(r for r, _ in val) == ["validation/a/v.png", "validation/b/w.png"]
    assert any("identical to train" in n for n in notes)
