"""Decode any image one way, and preprocess it for evaluation, with PIL and numpy only.

This module imports no torch, so the ONNX runtime and the app share it with training:
an image is decoded and preprocessed identically wherever it is classified.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image

IMAGE_EXTENSIONS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
    ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".dib": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM",
    ".tga": "TGA", ".ico": "ICO",
}  # fmt: skip
FORMAT_ALIASES = {"JPEG": {"JPEG", "MPO"}}  # camera JPEGs with a preview image decode as MPO
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own bomb threshold: 0.25 GiB of 24-bit pixels
LARGE_RESIZE = 2**22  # pixels: an evaluation resize larger than this (and 16 inputs) resizes only the crop
INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}  # fmt: skip


class BadImage(ValueError):
    """An input that is not a usable image; the message says why, for a person."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency over white, 16-bit scaled, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if img.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pixel_limit(max_pixels: int):
    """PIL's decompression-bomb limit set to ``max_pixels``, either way, for one decode.

    PIL checks its own module-wide limit (89.5 MP) in ``Image.open`` and again while loading
    some formats (TIFF, GIF frames, ICO), so a larger ``max_pixels`` would never be reached
    without this. The lock keeps concurrent decodes (the app's threads) from seeing each
    other's limit; it serialises decoding within a process, which the app's one or two
    concurrent requests do not notice.
    """
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Decode a file path, file object or PIL image into an upright 8-bit RGB image.

    Returns (image, format as PIL read it from the content, or None for a PIL image).
    The content decides, not the file name: a PNG saved as ``.jpg`` decodes as the PNG it
    is. EXIF orientation is applied, animations give their first frame, and files that are
    empty, truncated, corrupt or over ``max_pixels`` raise ``BadImage`` with a sentence
    that says why.
    """
    name = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = path.name
        if not path.is_file():
            raise BadImage(f"{name}: not a file")
        if path.stat().st_size == 0:
            raise BadImage(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings(), _pixel_limit(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = source if isinstance(source, Image.Image) else Image.open(source)
            fmt = img.format if not isinstance(source, Image.Image) else None
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"{name or 'image'}: {w}x{h} pixels is over the limit of {max_pixels:,}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img), fmt
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{name or 'image'}: too many pixels, over the limit of {max_pixels:,} ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name or 'input'}: not an image, or a format this reader does not know") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"{name or 'image'}: corrupt or truncated ({e})") from None


def open_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``decode_image`` without the format: an upright 8-bit RGB image, or ``BadImage``."""
    return decode_image(source, max_pixels)[0]


def extension_note(name: str, fmt: str | None) -> str | None:
    """A sentence when a file's content is not what its extension says (it is still used)."""
    expected = IMAGE_EXTENSIONS.get(Path(name).suffix.lower())
    if fmt is None or expected is None or fmt in FORMAT_ALIASES.get(expected, {expected}):
        return None
    return f"content is {fmt} but the extension says {expected}; decoded as {fmt}"


def resize_for_eval(img: Image.Image, size: tuple[int, int], crop_pct: float, interpolation: str) -> Image.Image:
    """timm's evaluation resize and centre crop, with torchvision's rounding, on PIL.

    Square inputs: the shorter side goes to floor(size / crop_pct), the longer one keeps
    the aspect ratio (truncated); other inputs are resized to (H, W) / crop_pct. Then the
    centre (H, W) crop is taken.
    """
    H, W = size
    w, h = img.size
    if H == W:
        short = math.floor(H / crop_pct)
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
    else:
        new_w, new_h = math.floor(W / crop_pct), math.floor(H / crop_pct)
    top, left = int(round((new_h - H) / 2.0)), int(round((new_w - W) / 2.0))
    if new_w * new_h > max(16 * H * W, LARGE_RESIZE):
        # A very long, thin image (1 x 5000 px, say) would be resized to gigabytes before the crop:
        # only the region the crop keeps is resized (Pillow's box, in its float32 coordinates).
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + W) * sx, (top + H) * sy)
        return img.resize((W, H), INTERPOLATION[interpolation], box=box)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), INTERPOLATION[interpolation])
    return img.crop((left, top, left + W, top + H))


def preprocess(
    img: Image.Image,
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """The evaluation transform: RGB image -> float32 array (3, H, W), normalised."""
    img = resize_for_eval(to_rgb(img), tuple(size), crop_pct, interpolation)
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # -> (3, H, W)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: the one record that training's evaluation,
    export, the runtime and the web page share. A run keeps it as JSON in config.json and in
    its weights' metadata; an ONNX file keeps it as strings in its metadata."""

    image_size: tuple[int, int]  # (H, W) the model takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0  # resize to image_size / crop_pct, then take the centre image_size

    def __post_init__(self):
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        fix = object.__setattr__
        fix(self, "image_size", size)
        fix(self, "mean", tuple(float(v) for v in self.mean))
        fix(self, "std", tuple(float(v) for v in self.std))
        fix(self, "crop_pct", float(self.crop_pct))
        problems = []
        if len(size) != 2 or min(size) < 1:
            problems.append(f"image_size {list(size)} is not two positive sides")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std, default=0) <= 0:
            problems.append(f"mean {list(self.mean)} and std {list(self.std)} need 3 values each, std above 0")
        if self.interpolation not in INTERPOLATION:
            problems.append(f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATION)}")
        if not 0 < self.crop_pct <= 1:
            problems.append(f"crop_pct {self.crop_pct} is not in (0, 1]")
        if problems:
            raise ValueError("; ".join(problems))

    FIELDS = ("image_size", "mean", "std", "interpolation", "crop_pct")

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From a run's config (or weights' metadata): extra keys are ignored, missing ones are errors."""
        missing = [k for k in cls.FIELDS if k not in d]
        if missing:
            raise ValueError(f"preprocessing lacks {missing}")
        return cls(**{k: d[k] for k in cls.FIELDS})

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Preprocessing:
        """From an ONNX file's metadata (strings; JSON where structured)."""
        given = [k for k in cls.FIELDS if k in meta]
        return cls.from_dict({k: meta[k] if k == "interpolation" else json.loads(meta[k]) for k in given})

    def metadata(self) -> dict[str, str]:
        """As an ONNX file's metadata stores it."""
        d = self.to_dict()
        return {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, list) else str(v) for k, v in d.items()}

    def resize(self, img: Image.Image) -> Image.Image:
        """The region of ``img`` the model sees, at its input size."""
        return resize_for_eval(to_rgb(img), self.image_size, self.crop_pct, self.interpolation)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB image -> float32 (3, H, W), normalised: the model's input."""
        return preprocess(img, self.image_size, self.mean, self.std, self.crop_pct, self.interpolation)
