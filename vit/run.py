"""A training run's folder: the one owner of its files, for every command that reads a run.

    RUN_DIR/config.json        model config, labels, preprocessing, settings, data root, result
    RUN_DIR/split.json         the train / validation / test items: (path relative to the data root, class)
    RUN_DIR/skipped.json       files the scan skipped, and notes on files it used anyway
    RUN_DIR/checkpoint.pt      everything to resume
    RUN_DIR/model.safetensors  the kept weights (their config, labels and preprocessing in its metadata)
    RUN_DIR/metrics.csv        one row per epoch
    RUN_DIR/members/1/ ...     an ensemble's other members, each a whole run of its own (same split, other
                               seed); config.json's "members" lists the finished ones, and the run's
                               report and result are then the ensemble's

train.py, ``--eval``, export and the Space builder all go through ``RunDir``. Every write is
atomic. This module imports no torch until a model is asked for.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path

from vit import files


class RunError(ValueError):
    """A run folder that cannot be used as asked; the message says what to do."""


def stratified_sample(items: list[tuple[str, int]], limit: int | None, seed: int = 0) -> list[tuple[str, int]]:
    """At most ``limit`` items with every class in its share (at least one each), seeded.

    ``split.json`` is sorted by path, so grouped by class: its first N items would cover
    only the first classes.
    """
    items = sorted(tuple(x) for x in items)
    if limit is None or len(items) <= limit:
        return items
    by_class: dict[int, list] = defaultdict(list)
    for it in items:
        by_class[it[1]].append(it)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        out += group[: max(1, round(limit * len(group) / len(items)))]
    return sorted(out)


class RunDir:
    CONFIG, SPLIT, SKIPPED = "config.json", "split.json", "skipped.json"
    CHECKPOINT, WEIGHTS, METRICS = "checkpoint.pt", "model.safetensors", "metrics.csv"
    MEMBERS = "members"  # an ensemble's other members: members/1, members/2 ..., each a whole run

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # ----- what is there ---------------------------------------------------------------
    def exists(self) -> bool:
        return (self / self.CONFIG).exists() or (self / self.CHECKPOINT).exists()

    def is_resumable(self) -> bool:
        return (self / self.CONFIG).is_file() and (self / self.CHECKPOINT).is_file()

    def is_trained(self) -> bool:
        return (self / self.CONFIG).is_file() and (self / self.WEIGHTS).is_file()

    def require_trained(self) -> None:
        if not self.is_trained():
            raise RunError(
                f"{self.path} is not a training run: it needs config.json and model.safetensors "
                "(made by python train.py)"
            )

    # ----- files -----------------------------------------------------------------------
    def config(self) -> dict:
        return json.loads((self / self.CONFIG).read_text(encoding="utf-8"))

    def preprocessing(self):
        """The run's evaluation preprocessing (``vit.imageio.Preprocessing``)."""
        from vit.imageio import Preprocessing

        return Preprocessing.from_dict(self.config()["preprocessing"])

    def write_config(self, config: dict) -> None:
        files.write_json(self / self.CONFIG, config)

    def metrics(self) -> list[dict[str, str]]:
        """metrics.csv's rows (none before the first epoch)."""
        import csv

        if not (self / self.METRICS).is_file():
            return []
        with open(self / self.METRICS, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def split(self) -> dict:
        return json.loads((self / self.SPLIT).read_text(encoding="utf-8"))

    def write_split(self, train: list, val: list, test: list, seed: int, val_fraction: float) -> None:
        files.write_json(self / self.SPLIT, dict(seed=seed, val_fraction=val_fraction, train=train, val=val, test=test))

    def write_skipped(self, skipped: list[tuple[str, str]], notes: list[tuple[str, str]]) -> None:
        files.write_json(
            self / self.SKIPPED,
            dict(
                skipped=[dict(file=r, reason=w) for r, w in skipped],
                used_with_notes=[dict(file=r, note=n) for r, n in notes],
            ),
        )

    # ----- data ------------------------------------------------------------------------
    def data_root(self, override: str | os.PathLike | None = None) -> Path:
        """The folder the run's split refers to: ``override`` if given, else the one it trained on."""
        if override is not None:
            root = Path(override).expanduser().resolve()
        else:
            cfg = self.config()
            saved = cfg.get("data", {}).get("root") or cfg["train"]["data"]
            root = Path(saved)
            if not root.is_absolute():  # runs made before the root was stored resolved
                root = (self.path / root).resolve() if (self.path / root).is_dir() else root.resolve()
        if not root.is_dir():
            raise RunError(
                f"the run's data folder {root} is not there: pass the folder it was trained on with --data PATH"
            )
        return root

    def split_items(self, usable: set[str]) -> dict[str, list[tuple[str, int]]]:
        """The saved split ({"train", "val", "test"}: items), checked against the files usable now."""
        saved = self.split()
        items = {k: [tuple(x) for x in saved.get(k) or []] for k in ("train", "val", "test")}
        missing = [r for rs in items.values() for r, _ in rs if r not in usable]
        if missing:
            raise RunError(f"{len(missing)} images of the saved split are gone or unusable, e.g. {missing[0]}")
        return items

    def items(self, which: str, limit: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
        """The run's ``val`` or ``test`` items (or ``train``), stratified down to ``limit``."""
        return stratified_sample(self.split().get(which) or [], limit, seed)

    # ----- an ensemble's members ---------------------------------------------------------
    def member(self, i: int) -> RunDir:
        """Member ``i`` (1, 2 ...) of the run's ensemble; member 0 is the run itself."""
        return RunDir(self / self.MEMBERS / str(i))

    def members(self) -> list[RunDir]:
        """The finished members the run's model averages, itself first: the run's config lists
        the others once they have finished (a run without that list is one model)."""
        return [self] + [RunDir(self / rel) for rel in self.config().get("members", [])]

    def started_members(self) -> list[RunDir]:
        """Every member folder the run has started (members/1, members/2 ...), in order."""
        folder = self / self.MEMBERS
        numbered = [p for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
        return [RunDir(p) for p in sorted(numbered, key=lambda p: int(p.name))]

    def pending_member(self) -> RunDir | None:
        """The first member the run started and did not finish (no result yet): train.py
        --resume continues it, or starts it again if it stopped before its first checkpoint."""
        for member in self.started_members():
            if not ((member / self.CONFIG).is_file() and "result" in member.config()):
                return member
        return None

    # ----- the model -------------------------------------------------------------------
    def load_model(self):
        """The run's ViT with its kept weights, in eval mode; an ``Ensemble`` of its members'
        where it has several."""
        from vit.model import Ensemble

        models = [m.load_one() for m in self.members()]
        return (models[0] if len(models) == 1 else Ensemble(models)).eval()

    def load_one(self):
        """This folder's own ViT, without its ensemble's other members."""
        from safetensors.torch import load_file

        from vit.model import ViT, ViTConfig

        self.require_trained()
        model = ViT(ViTConfig.from_dict(self.config()["model"]))
        model.load_state_dict(load_file(str(self / self.WEIGHTS)))
        return model.eval()

    def weight_files(self) -> list[Path]:
        """The kept weights of every member, the run's own first."""
        return [m / m.WEIGHTS for m in self.members()]
