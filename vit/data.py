"""Image folders: scan and check them, split them, and feed them to training.

Layouts accepted (class names are folder names, in sorted order):
    ROOT/<class>/<image>                    one folder per class; a validation split is made
    ROOT/train/<class>/..., ROOT/val/...    (or valid/, validation/) the split is the user's
    ROOT/train/..., ROOT/test/...           (with or without val/) test/ is held out: never
                                            used for any choice, only reported

ROOT is read as split folders only when its sub-folders are nothing but train/, val/ (or
validation/) and test/, so a class that happens to be called "test" is still a class; the
reading chosen is stated in ``FolderScan.layout``.

Every file is decoded once during the scan, by ``vit.imageio.decode_image``, by content (a
PNG named .jpg is a PNG, and noted); files that cannot be decoded are skipped and reported,
never fatal (``strict`` makes them fatal). Datasets that fit in memory keep their decoded
images there, shrunk to the side the model's evaluation resize needs
(``cache_side_for``), so epochs don't re-decode and nothing is ever upsampled.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vit.cpus import usable_cpus
from vit.imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadImage,
    Preprocessing,
    decode_image,
    extension_note,
    open_image,
)

HIDDEN = {"__MACOSX", ".ipynb_checkpoints", "Thumbs.db", "desktop.ini", ".DS_Store"}
SPLIT_DIRS = ("train", "val", "valid", "validation", "test")  # valid/: Kaggle and Roboflow exports
CACHE_BUDGET_BYTES = 4 * 2**30  # beyond this the dataset is read from disk every epoch


class DataError(ValueError):
    """A dataset problem the user must fix; the message says how."""


@dataclass
class FolderScan:
    """What a scan found: usable samples, skipped files with reasons, and decoded images."""

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]  # (path relative to root, class index)
    val: list[tuple[str, int]] | None  # None: no val/ folder, a split must be made
    test: list[tuple[str, int]] | None = None  # ROOT/test/: held out, never used for a choice
    layout: str = ""  # how ROOT was read, in words
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (relative path, note): used anyway
    hashes: dict[str, str] = field(default_factory=dict)  # relative path -> content hash
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # relative path -> (w, h)
    images: dict[str, Image.Image] | None = None  # decoded (and shrunk) images, if cached
    max_pixels: int = DEFAULT_MAX_PIXELS  # the decompression-bomb limit the scan used
    thumbs: dict[str, bytes] = field(default_factory=dict)  # relative path -> grey 16x16 thumbnail, if kept

    def thumbnails(self, items: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(n, 16, 16) uint8 grey thumbnails and (n,) labels of ``items`` (for checks on the data)."""
        found = [(rel, y) for rel, y in items if rel in self.thumbs]
        x = np.frombuffer(b"".join(self.thumbs[r] for r, _ in found), np.uint8).reshape(-1, THUMB, THUMB)
        return x, np.array([y for _, y in found], dtype=np.int64)

    def native_side(self) -> int:
        """Median shorter side of the images, in pixels."""
        sides = sorted(min(s) for s in self.sizes.values())
        return sides[len(sides) // 2] if sides else 0


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part in HIDDEN for part in rel.parts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(Path(p.name)))


def _list_files(root: Path, class_dir: Path, skipped: list) -> list[str]:
    """Every non-hidden file under ``class_dir``: the content, not the name, decides what is an image."""
    out = []
    for p in sorted(class_dir.rglob("*")):
        rel = p.relative_to(root)
        if _is_hidden(p.relative_to(class_dir)):
            if p.is_file():
                skipped.append((rel.as_posix(), "hidden file"))
            continue
        if p.is_file():
            out.append(rel.as_posix())
    return out


def ignore_stop_signals(*_) -> None:
    """Worker initializer: Ctrl-C in a terminal reaches every process of the group; only the main
    one decides to stop, and then it shuts its workers down itself. SIGTERM keeps its default:
    it is how the loader ends a worker that does not finish on its own (ignoring it would leave
    the process waiting for that worker forever after an error)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cache_side_for(image_size: tuple[int, int], crop_pct: float) -> int:
    """The shorter side a cached image needs: what the evaluation resize makes of it
    (``vit.imageio.resize_for_eval``), so validation on the cache equals the runtime."""
    H, W = image_size
    return math.floor(H / crop_pct) if H == W else math.ceil(max(H, W) / crop_pct)


def shrink(img: Image.Image, side: int, interpolation: str = "bicubic") -> Image.Image:
    """Shorter side down to ``side`` with the evaluation resize's rounding and interpolation;
    never up. For a square input this is the evaluation resize itself, so the evaluation
    transform then only crops, exactly as the runtime does from the file."""
    from vit.imageio import INTERPOLATION

    w, h = img.size
    if min(w, h) <= side:
        return img
    new = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    return img.resize(new, INTERPOLATION[interpolation])


THUMB = 16  # side of the grey thumbnails a scan keeps when asked (scan_folder(thumbs=True))


def thumbnail(img: Image.Image) -> bytes:
    """A grey THUMB x THUMB thumbnail, squashed to a square (cheap: the scan keeps one per image)."""
    return img.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR, reducing_gap=2.0).tobytes()


def _decode(args: tuple[str, str, int, int | None, str, bool]):
    """Worker: (rel, hash, (w, h), image or None, error, note, thumbnail or None) for one file."""
    root, rel, max_pixels, cache_side, interpolation, thumb = args
    path = Path(root) / rel
    try:
        img, fmt = decode_image(path, max_pixels=max_pixels)
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
    except BadImage as e:
        why = str(e).split(": ", 1)[-1]
        if path.suffix.lower() not in IMAGE_EXTENSIONS and why.startswith("not an image"):
            why = f"not an image file ({path.suffix or 'no extension'})"
        return rel, None, None, None, why, None, None
    except OSError as e:
        return rel, None, None, None, f"unreadable ({e.strerror or e})", None, None
    size = img.size
    note = extension_note(path.name, fmt)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        note = f"{fmt} image with the extension {path.suffix or '(none)'}"
    cached = shrink(img, cache_side, interpolation) if cache_side else None
    return rel, digest, size, cached, None, note, thumbnail(img) if thumb else None


@dataclass
class Layout:
    class_root: Path  # the folder whose sub-folders are the classes (for training)
    val_dir: Path | None
    test_dir: Path | None
    description: str


def detect_layout(root: Path) -> Layout:
    """ROOT/{train,val,test}/<class>/ only when ROOT holds nothing but such folders and
    train/ has class folders; otherwise every sub-folder of ROOT is a class."""
    subs = {p.name.lower(): p for p in _class_dirs(root)}
    train = subs.get("train")
    if train is not None and set(subs) <= set(SPLIT_DIRS) and _class_dirs(train):
        named = [subs[n].name + "/" for n in ("val", "valid", "validation") if n in subs]
        if len(named) > 1:
            raise DataError(f"{root} has {' and '.join(named)}: keep one validation folder")
        val, test = subs.get("val") or subs.get("valid") or subs.get("validation"), subs.get("test")
        parts = [f"{train.name}/ to train on"]
        parts.append(f"{val.name}/ to validate on" if val else "a validation split made from it")
        if test:
            parts.append(f"{test.name}/ held out as a test set")
        return Layout(train, val, test, f"split folders: {', '.join(parts)}")
    nested = {p.name: {c.name for c in _class_dirs(p)} for p in subs.values()}
    shared = set.intersection(*nested.values()) if len(nested) > 1 else set()
    split_like = any(n.lower().startswith(("train", "val", "test", "eval", "dev")) for n in nested)
    if shared and split_like:  # training/cat, validate/cat: split folders under names not known here
        raise DataError(
            f"the folders {', '.join(sorted(nested))} in {root} all hold the same sub-folders "
            f"({', '.join(sorted(shared)[:5])}): that looks like a train/validation split, not classes. Name "
            "them train/, val/ (or valid/) and test/, or give each class its own folder directly under the root"
        )
    described = "one sub-folder per class"
    named = sorted(n for n in subs if n in SPLIT_DIRS)
    if named:
        described += (
            f" ({', '.join(n + '/' for n in named)} read as {'classes' if len(named) > 1 else 'a class'}; for split "
            f"folders, {root} must hold only train/, val/ (or valid/) and test/, each with one sub-folder per class)"
        )
    return Layout(root, None, None, described)


def _held_out_files(root: Path, layout: Layout, classes: list[str], skipped: list) -> dict[str, dict]:
    """{"val" / "test": {class: files}} for the split folders the layout has."""
    held = {}
    for which, folder in (("val", layout.val_dir), ("test", layout.test_dir)):
        if folder is None:
            continue
        names = [d.name for d in _class_dirs(folder)]
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{folder.name}/ has classes that {layout.class_root.name}/ lacks: {unknown}")
        held[which] = {c: _list_files(root, folder / c, skipped) for c in names}
        if not any(held[which].values()):
            raise DataError(f"{folder} holds no images: add images to {folder.name}/<class>/, or remove it")
    return held


def _check_usable(classes, train, val, test, layout: Layout, min_per_class: int) -> None:
    counts = Counter(label for _, label in train + (val or []))
    too_few = [f"{c} ({counts[i]})" for i, c in enumerate(classes) if counts[i] < min_per_class]
    if too_few:
        raise DataError(
            f"classes with fewer than {min_per_class} usable images: {', '.join(too_few)}. "
            "Add images to them, or remove those folders"
        )
    for folder, items in ((layout.val_dir, val), (layout.test_dir, test)):
        if items is not None and not items:
            raise DataError(f"no usable images in {folder}: see the skipped files above")


def _decode_all(
    root: Path,
    rels: list[str],
    max_pixels: int,
    cache_side: int | None,
    interpolation: str,
    workers: int | None,
    thumbs: bool = False,
):
    """Decode every file once, in worker processes for many files: (hashes, sizes, images or
    None, [(rel, note or skip reason)], thumbnails); a file with no hash was skipped for that reason."""
    jobs = [(str(root), rel, max_pixels, cache_side, interpolation, thumbs) for rel in rels]
    workers = workers or min(8, usable_cpus())
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers, initializer=ignore_stop_signals) as pool:
            results = list(pool.map(_decode, jobs, chunksize=32))
    else:
        results = [_decode(j) for j in jobs]
    hashes, sizes, images, said, kept = {}, {}, ({} if cache_side else None), [], {}
    for rel, digest, size, img, err, note, thumb in results:
        if err is not None:
            said.append((rel, err))
            continue
        hashes[rel], sizes[rel] = digest, size
        if thumb is not None:
            kept[rel] = thumb
        if note:
            said.append((rel, note))
        if images is not None:
            images[rel] = img
    return hashes, sizes, images, said, kept


# The scan's steps in their order (layout, files, decode, checks); each step is its own helper.
def scan_folder(
    root: str | os.PathLike,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache: bool | None = None,
    workers: int | None = None,
    min_classes: int = 2,
    min_per_class: int = 2,
    cache_side: int = 256,
    cache_interpolation: str = "bicubic",
    thumbs: bool = False,
) -> FolderScan:
    """Find classes and images under ``root``, decode each once, and check the result.

    ``cache``: keep decoded images in memory (None: when they fit the memory budget), with
    their shorter side shrunk to ``cache_side`` with ``cache_interpolation`` (see
    ``cache_side_for``). ``thumbs``: keep a grey THUMB x THUMB thumbnail of every image too
    (256 bytes each, for the recipe's checks on the data).
    Raises ``DataError`` for layouts training cannot use.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root} does not exist: pass the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root} is a file: pass the folder that holds one sub-folder per class")
    layout = detect_layout(root)
    class_root = layout.class_root

    skipped: list[tuple[str, str]] = []
    class_dirs = _class_dirs(class_root)
    if not class_dirs:
        loose = [p.name for p in class_root.iterdir() if p.is_file()][:3]
        hint = f" (found loose files such as {', '.join(loose)})" if loose else ""
        raise DataError(
            f"no class folders in {class_root}{hint}: put each class's images in its own sub-folder, "
            f"e.g. {class_root}/cat/1.jpg and {class_root}/dog/2.jpg"
        )
    classes = [d.name for d in class_dirs]
    if len(classes) < min_classes:
        raise DataError(f"only one class ({classes[0]!r}) in {class_root}: a classifier needs at least two")
    files = {c: _list_files(root, d, skipped) for c, d in zip(classes, class_dirs)}
    held = _held_out_files(root, layout, classes, skipped)

    all_rel = [r for fs in (files, *held.values()) for rs in fs.values() for r in rs]
    if cache is None:
        cache = len(all_rel) * cache_side * cache_side * 3 <= CACHE_BUDGET_BYTES
    side = cache_side if cache else None
    hashes, sizes, images, notes, thumbs = _decode_all(
        root, all_rel, max_pixels, side, cache_interpolation, workers, thumbs
    )
    skipped += [(rel, why) for rel, why in notes if rel not in hashes]
    notes = [(rel, note) for rel, note in notes if rel in hashes]
    if strict and skipped:
        listing = "\n".join(f"  {rel}: {why}" for rel, why in skipped[:20])
        raise DataError(f"{len(skipped)} unusable files (--strict):\n{listing}")

    def usable(fs: dict[str, list[str]]) -> list[tuple[str, int]]:
        return [(r, classes.index(c)) for c, rs in fs.items() for r in rs if r in hashes]

    train = usable(files)
    val = usable(held["val"]) if "val" in held else None
    test = usable(held["test"]) if "test" in held else None
    _check_usable(classes, train, val, test, layout, min_per_class)
    return FolderScan(
        root, classes, train, val, test, layout.description, skipped, notes, hashes, sizes, images, max_pixels, thumbs
    )


class Split(NamedTuple):
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]  # empty without a test/ folder
    notes: list[str]


def split_train_val(scan: FolderScan, val_fraction: float = 0.15, seed: int = 0) -> Split:
    """Stratified, seeded split; identical files (same content hash) stay on one side.

    With a user-given val/ folder, val files identical to a train file are dropped from val
    instead; test/ files identical to a train or validation file are dropped from test.
    A group of identical files goes to validation only if it fits in the class's share
    there, so one large group cannot fill validation with most of a class.
    """
    notes = []
    by_hash: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for rel, label in scan.train + (scan.val or []):
        by_hash[scan.hashes[rel]].append((rel, label))
    multi = [g for g in by_hash.values() if len({label for _, label in g}) > 1]
    if multi:
        ex = ", ".join(" = ".join(r for r, _ in g[:2]) for g in multi[:3])
        notes.append(f"{len(multi)} images appear in more than one class with identical content (e.g. {ex})")
    if scan.val is not None:
        train_hashes = {scan.hashes[r] for r, _ in scan.train}
        val = [(r, lab) for r, lab in scan.val if scan.hashes[r] not in train_hashes]
        if len(val) < len(scan.val):
            notes.append(f"dropped {len(scan.val) - len(val)} val images identical to train images")
        if not val:
            raise DataError("every val image is a copy of a train image: the validation split would be empty")
        train = list(scan.train)
    else:
        train, val = _split_groups(by_hash, val_fraction, seed, notes, scan.classes)
        if not val:
            raise DataError(_no_validation(by_hash, val_fraction))
        dups = sum(len(g) - 1 for g in by_hash.values())
        if dups:
            notes.append(f"{dups} duplicate files (identical content) kept on one side of the split")
    test = list(scan.test or [])
    if test:
        seen = {scan.hashes[r] for r, _ in scan.train + (scan.val or [])}
        kept = [(r, lab) for r, lab in test if scan.hashes[r] not in seen]
        if len(kept) < len(test):
            notes.append(f"dropped {len(test) - len(kept)} test images identical to training or validation images")
        if not kept:
            raise DataError("every test image is a copy of a training image: the test set would be empty")
        test = kept
    return Split(sorted(train), sorted(val), sorted(test), notes)


def _no_validation(by_hash: dict, val_fraction: float) -> str:
    """Why no image could be held out (copies stay on one side of the split), and what to do."""
    distinct = len(by_hash)
    images = f"{distinct} different image{'s' if distinct != 1 else ''} in all"
    per_class = Counter(g[0][1] for g in by_hash.values())
    if max(per_class.values()) == 1:
        return (
            f"no image can be held out for validation: in every class the images are copies of one image ({images}); "
            "add different images of each class, or give a val/ folder"
        )
    return (
        f"no image can be held out for validation: each class's images are copies in groups too large for its "
        f"validation share (--val-fraction {val_fraction:g}; {images}); raise --val-fraction, add different images, "
        "or give a val/ folder"
    )


def _split_groups(by_hash: dict, val_fraction: float, seed: int, notes: list, classes: list) -> tuple[list, list]:
    """Per class: shuffled duplicate groups go to validation while they fit in its share."""
    groups: dict[int, list[list[tuple[str, int]]]] = defaultdict(list)  # label -> duplicate groups
    for g in by_hash.values():
        g = sorted(g)
        groups[g[0][1]].append(g)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(groups):
        gs = sorted(groups[label])
        rng.shuffle(gs)
        n = sum(len(g) for g in gs)
        n_val = min(max(1, round(val_fraction * n)), n - 1)
        picked, taken = [], 0
        for g in gs:
            if taken + len(g) <= n_val:
                picked.append(g)
                taken += len(g)
        if not picked and len(gs) > 1:  # every group is larger than the share: the smallest one,
            smallest = min(gs, key=len)  # if it is at most twice the share
            if len(smallest) <= 2 * n_val:
                picked.append(smallest)
        if not picked:
            notes.append(f"no validation images for class {classes[label]!r}: its images are copies of one another")
        picked_ids = {id(g) for g in picked}
        for g in gs:
            (val if id(g) in picked_ids else train).extend(g)
    return train, val


def class_table(classes: list[str], items: list[tuple[str, int]]) -> tuple[str, str | None]:
    """A per-class count table and, if the classes are imbalanced, a warning."""
    counts = Counter(label for _, label in items)
    total = max(1, sum(counts.values()))
    width = max(len(c) for c in classes + ["class"])
    lines = [f"  {'class':<{width}}  {'images':>7}  {'share':>6}"]
    for i, c in enumerate(classes):
        lines.append(f"  {c:<{width}}  {counts[i]:>7}  {counts[i] / total:>6.1%}")
    lo, hi = min(counts[i] for i in range(len(classes))), max(counts.values())
    warn = None
    if lo and hi / lo >= 3:
        warn = (
            f"classes are imbalanced: the largest has {hi / lo:.1f}x the images of the smallest; "
            "per-class recall in the report shows what that costs"
        )
    return "\n".join(lines), warn


# --------------------------------------------------------------------------------------
# Datasets and sampling
# --------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed: augmentation is a function of (seed, epoch, index) alone, so it is
    the same with any number of loader workers and after a resume."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class FolderDataset(Dataset):
    """(image tensor, label) pairs from a scan, from memory when cached."""

    def __init__(self, scan: FolderScan, items: list[tuple[str, int]], transform, seed: int = 0):
        # Only this dataset's own images: loader workers started by spawn or forkserver each
        # receive a pickled copy of the dataset, so a shared cache would be copied whole.
        self.images = None if scan.images is None else {r: scan.images[r] for r, _ in items}
        self.root, self.items, self.max_pixels = scan.root, items, scan.max_pixels
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        rel = self.items[i][0]
        if self.images is not None:
            return self.images[rel]
        return open_image(self.root / rel, self.max_pixels)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        # The CPU generator alone, which is what the transforms draw from: torch.manual_seed seeds
        # every accelerator's generators too, 0.11 ms per image, a third of the loading time at 32 px.
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
        try:
            img = self.load(i)
        except BadImage:  # changed on disk since the scan: use a neighbour rather than die
            i = (i + 1) % len(self.items)
            img = self.load(i)
        return self.transform(img), self.items[i][1]


class EpochSampler(Sampler):
    """A seeded permutation per epoch, sharded across ranks, able to start mid-epoch.

    Yields (index, epoch) so the dataset can seed augmentation per sample.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = -(-self.n // self.world)
        order += order[: per_rank * self.world - self.n]  # pad so every rank gets as many
        return order[self.rank :: self.world]

    def __iter__(self):
        return ((i, self.epoch) for i in self.indices()[self.start :])

    def __len__(self) -> int:
        return -(-self.n // self.world) - self.start


class BorderAffine:
    """A small random rotation, shift and scale, the uncovered corners filled with the image's
    own border colour (paper stays paper). Changes a glyph's pose, never its identity, unlike a
    mirror image or TrivialAugment's larger operations on images of a few pixels."""

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1)):
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __call__(self, img: Image.Image) -> Image.Image:
        import numpy as np
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        a = np.asarray(img)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).reshape(-1, a.shape[-1] if a.ndim == 3 else 1)
        fill = [int(v) for v in np.median(border, 0)]
        u = torch.rand(4).tolist()
        w, h = img.size
        return TF.affine(
            img,
            angle=(2 * u[0] - 1) * self.degrees,
            translate=[round((2 * u[1] - 1) * self.translate * w), round((2 * u[2] - 1) * self.translate * h)],
            scale=self.scale[0] + u[3] * (self.scale[1] - self.scale[0]),
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=fill,
        )


def train_transform(
    size: tuple[int, int], mean, std, interpolation: str, augment: str, scale_min: float, hflip: float, erase: float
):
    """Random resized crop, flip, TrivialAugment/RandAugment, normalise, random erasing."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    interp = InterpolationMode(interpolation)
    ops = [T.RandomResizedCrop(size, scale=(scale_min, 1.0), interpolation=interp, antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if augment == "trivial":
        ops.append(T.TrivialAugmentWide(interpolation=interp))
    elif augment == "randaugment":
        ops.append(T.RandAugment(interpolation=interp))
    elif augment == "affine":
        ops.append(BorderAffine())
    elif augment != "none":
        raise ValueError(f"unknown augment {augment!r}: use trivial, randaugment, affine or none")
    ops += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if erase > 0:
        ops.append(T.RandomErasing(erase, value=0))
    return T.Compose(ops)


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation transform (``vit.imageio.Preprocessing``), as a tensor. A plain class, not
    a closure, so DataLoader workers started by spawn or forkserver (macOS, Windows, Python 3.14
    on Linux) can receive it."""

    prep: Preprocessing

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.prep(img))
