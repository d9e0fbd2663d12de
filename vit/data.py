"""Image folders: scan and check them, split them, and feed them to training.

Layouts accepted (class names are folder names, in sorted order):
    ROOT/<class>/<image>                  one folder per class; a validation split is made
    ROOT/train/<class>/..., ROOT/val/...   (or validation/) the split is the user's

Every file is decoded once during the scan, by ``vit.imageio.open_image``; files that
cannot be used are skipped and reported, never fatal (``strict`` makes them fatal).
Small datasets keep their decoded images in memory, so epochs don't re-decode.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vit.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, open_image, preprocess
from vit.runtime import usable_cpus

HIDDEN = {"__MACOSX", ".ipynb_checkpoints", "Thumbs.db", "desktop.ini", ".DS_Store"}
CACHE_SIDE = 256  # cached images are shrunk so their shorter side is at most this
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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    hashes: dict[str, str] = field(default_factory=dict)  # relative path -> content hash
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # relative path -> (w, h)
    images: dict[str, Image.Image] | None = None  # decoded (and shrunk) images, if cached

    def native_side(self) -> int:
        """Median shorter side of the images, in pixels."""
        sides = sorted(min(s) for s in self.sizes.values())
        return sides[len(sides) // 2] if sides else 0


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part in HIDDEN for part in rel.parts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(Path(p.name)))


def _list_files(root: Path, class_dir: Path, skipped: list) -> list[str]:
    out = []
    for p in sorted(class_dir.rglob("*")):
        rel = p.relative_to(root)
        if _is_hidden(p.relative_to(class_dir)):
            if p.is_file():
                skipped.append((rel.as_posix(), "hidden file"))
            continue
        if p.is_file():
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                out.append(rel.as_posix())
            else:
                skipped.append((rel.as_posix(), f"not an image file ({p.suffix or 'no extension'})"))
    return out


def _decode(args: tuple[str, str, int, bool]) -> tuple[str, str | None, tuple[int, int] | None, object, str | None]:
    """Worker: (rel, hash, (w, h), image or None, error) for one file."""
    root, rel, max_pixels, keep = args
    path = Path(root) / rel
    try:
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        img = open_image(path, max_pixels=max_pixels)
    except BadImage as e:
        return rel, None, None, None, str(e).split(": ", 1)[-1]
    except OSError as e:
        return rel, None, None, None, f"unreadable ({e.strerror or e})"
    size = img.size
    if keep:
        s = CACHE_SIDE / min(size)
        if s < 1:
            img = img.resize((max(1, round(size[0] * s)), max(1, round(size[1] * s))), Image.Resampling.BICUBIC)
    return rel, digest, size, (img if keep else None), None


def scan_folder(
    root: str | os.PathLike,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache: bool | None = None,
    workers: int | None = None,
    min_classes: int = 2,
    min_per_class: int = 2,
) -> FolderScan:
    """Find classes and images under ``root``, decode each once, and check the result.

    ``cache``: keep decoded images in memory (None: when they fit the memory budget).
    Raises ``DataError`` for layouts training cannot use.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root} does not exist: pass the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root} is a file: pass the folder that holds one sub-folder per class")
    sub = {p.name.lower(): p for p in _class_dirs(root)}
    val_dir = sub.get("val") or sub.get("validation")
    train_dir = sub.get("train")
    if val_dir is not None and train_dir is None:
        raise DataError(f"{root} has {val_dir.name}/ but no train/: add train/<class>/ folders")
    split_given = train_dir is not None and val_dir is not None
    class_root = train_dir if train_dir is not None else root

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
    val_files: dict[str, list[str]] = {}
    if split_given:
        val_classes = [d.name for d in _class_dirs(val_dir)]
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(f"{val_dir.name}/ has classes that train/ lacks: {unknown}")
        val_files = {c: _list_files(root, val_dir / c, skipped) for c in val_classes}
        if not any(val_files.values()):
            raise DataError(f"{val_dir} holds no images: add images to {val_dir.name}/<class>/, or remove it")

    all_rel = [r for fs in files.values() for r in fs] + [r for fs in val_files.values() for r in fs]
    if cache is None:
        cache = len(all_rel) * CACHE_SIDE * CACHE_SIDE * 3 <= CACHE_BUDGET_BYTES
    jobs = [(str(root), rel, max_pixels, cache) for rel in all_rel]
    workers = workers or min(8, usable_cpus())
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_decode, jobs, chunksize=32))
    else:
        results = [_decode(j) for j in jobs]

    hashes, sizes, images = {}, {}, ({} if cache else None)
    for rel, digest, size, img, err in results:
        if err is not None:
            skipped.append((rel, err))
            continue
        hashes[rel], sizes[rel] = digest, size
        if images is not None:
            images[rel] = img
    if strict and skipped:
        listing = "\n".join(f"  {rel}: {why}" for rel, why in skipped[:20])
        raise DataError(f"{len(skipped)} unusable files (--strict):\n{listing}")

    def usable(fs: dict[str, list[str]]) -> list[tuple[str, int]]:
        return [(r, classes.index(c)) for c, rs in fs.items() for r in rs if r in hashes]

    train, val = usable(files), (usable(val_files) if split_given else None)
    counts = Counter(label for _, label in train + (val or []))
    too_few = [f"{c} ({counts[i]})" for i, c in enumerate(classes) if counts[i] < min_per_class]
    if too_few:
        raise DataError(
            f"classes with fewer than {min_per_class} usable images: {', '.join(too_few)}. "
            "Add images to them, or remove those folders"
        )
    if split_given and not val:
        raise DataError(f"no usable images in {val_dir}: see the skipped files above")
    return FolderScan(root, classes, train, val, skipped, hashes, sizes, images)


def split_train_val(
    scan: FolderScan, val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """Stratified, seeded split; identical files (same content hash) stay on one side.

    Returns (train, val, warnings). With a user-given val/ folder, val files identical to
    a train file are dropped from val instead.
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
        return list(scan.train), val, notes

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
        taken = 0
        for g in gs:
            side = val if taken < n_val and len(gs) > 1 and (taken + len(g) < n) else train
            side.extend(g)
            if side is val:
                taken += len(g)
    dups = sum(len(g) - 1 for g in by_hash.values())
    if dups:
        notes.append(f"{dups} duplicate files (identical content) kept on one side of the split")
    return sorted(train), sorted(val), notes


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
        self.root, self.images, self.items = scan.root, scan.images, items
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        rel = self.items[i][0]
        if self.images is not None:
            return self.images[rel]
        return open_image(self.root / rel)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        torch.manual_seed(sample_seed(self.seed, epoch, i))
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
    elif augment != "none":
        raise ValueError(f"unknown augment {augment!r}: use trivial, randaugment or none")
    ops += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if erase > 0:
        ops.append(T.RandomErasing(erase, value=0))
    return T.Compose(ops)


def eval_transform(size: tuple[int, int], mean, std, crop_pct: float, interpolation: str):
    """The evaluation transform of ``vit.imageio.preprocess``, as a tensor."""

    def apply(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess(img, size, mean, std, crop_pct, interpolation))

    return apply
