"""Learning quality on small data: train.py's default recipe against three baselines, over
several seeds, each scored on a test split that no method uses for any choice.

    python benchmarks/learning.py                              # every dataset, 3 seeds, 10 min each
    python benchmarks/learning.py --only digits --budget 2 --seeds 3
    python benchmarks/learning.py --only digits --per-class 10 # tiny data: 10 training images a class
    python benchmarks/learning.py --only digits --budget 2 --seeds 5 --first-seed 5  # splits 5-9

For each dataset and seed: a fresh train/test split is written as an image folder (train/
and test/); then, with the same wall-clock budget each,
  vit      python train.py --data DIR --out RUN --time-budget B --seed S (nothing else: the
           recipe decides); scored on test/ by train.py itself, which never used it; and,
           as a diagnostic of the end-of-run choice, the run's last EMA weights on test/ too
           (final_test_acc), and, for a model that averages each image with its mirror, the
           kept weights from the image alone (single_view_test_acc);
  cnn      timm's resnet18 from scratch with an ordinary recipe (AdamW, cosine, label
           smoothing 0.1, small random affine augmentation), the final weights;
  timm-vit timm's VisionTransformer (ViT-Ti width, patch = side / 8) from scratch with the
           same ordinary recipe;
and, with no time limit,
  svm      scikit-learn's RBF SVC on raw pixels (one channel for grey images), standardised,
           C and gamma by 3-fold cross-validation on the training images only.
Writes benchmarks/learning_<budget>min_cpu.json (every run, and mean and std per method) and
prints a markdown table. The "budget used" column is train.py's wall time over its budget.

Datasets (nothing is downloaded):
  digits    scikit-learn's bundled handwritten digits: 1,797 images, 8x8 px, 10 classes;
            a stratified 75/25 split per seed
  glyphs    the letters A-J rendered at 64 px from every usable font on this machine (the
            OS's and matplotlib's), split by design family: no style, weight or width of a
            test family appears in training
  shapes32  this package's procedural shapes at 32 px, 10 classes x 150 (train), x 50 (test)
  shapes64  the same at 64 px
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------
# Datasets: each writes OUT/train/<class>/ and OUT/test/<class>/ for one seed
# --------------------------------------------------------------------------------------


def save(img: Image.Image, out: Path, split: str, label: str, name: str) -> None:
    folder = out / split / label
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{name}.png")


def write_digits(out: Path, seed: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    train, test = train_test_split(idx, test_size=0.25, stratify=d.target, random_state=seed)
    for split, ids in (("train", train), ("test", test)):
        for i in ids:
            img = Image.fromarray((d.images[i] * 255 / 16).round().astype(np.uint8), mode="L")
            save(img, out, split, str(d.target[i]), f"{i:04d}")


LETTERS = "ABCDEFGHIJ"
SYMBOL_FONTS = ("cmex", "cmsy", "stixsiz", "stixnonuni", "lastresort", "mathtexgyre", "symbol", "emoji")


def family(name: str, path: Path) -> str:
    """A font's design family: its styles and widths (bold, condensed, narrow...) are one family."""
    stem = path.stem.lower()
    if stem.startswith("cm"):
        return "Computer Modern " + ("Sans" if "ss" in stem else "Typewriter" if "tt" in stem else "Roman")
    for word in (" Condensed", " ExtraLight", " Light", " Narrow"):
        name = name.replace(word, "")
    return name


def usable_fonts() -> list[tuple[Path, str]]:
    """Every font file on this machine that draws A-J as letters, one per (family, style), with
    its design family."""
    from fontTools.ttLib import TTFont
    from matplotlib import get_data_path

    folders = [Path(get_data_path()) / "fonts" / "ttf", Path("/usr/share/fonts"), Path.home() / ".fonts"]
    folders += [Path("/Library/Fonts"), Path("/System/Library/Fonts"), Path("C:/Windows/Fonts")]
    seen, fonts = set(), []
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.suffix.lower() not in (".ttf", ".otf") or any(s in path.name.lower() for s in SYMBOL_FONTS):
                continue
            try:
                font = TTFont(path, lazy=True)
                cmap = font.getBestCmap() or {}
                name = font["name"]
                key = (str(name.getDebugName(1)), str(name.getDebugName(2)))
            except Exception:
                continue
            if key not in seen and all(ord(c) in cmap for c in LETTERS):
                seen.add(key)
                fonts.append((path, family(key[0], path)))
    return fonts


def render_glyph(font: ImageFont.FreeTypeFont, letter: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A letter in dark ink on a light background, with a little random size, place and angle."""
    big = size * 2
    img = Image.new("L", (big, big), int(rng.integers(215, 256)))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    w, h = right - left, bottom - top
    scale = rng.uniform(0.55, 0.8) * big / max(w, h, 1)
    glyph = Image.new("L", (w + 8, h + 8), 0)
    ImageDraw.Draw(glyph).text((4 - left, 4 - top), letter, fill=255, font=font)
    glyph = glyph.resize((max(1, round((w + 8) * scale)), max(1, round((h + 8) * scale))), Image.Resampling.BICUBIC)
    glyph = glyph.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BICUBIC, expand=True)
    x = int((big - glyph.width) / 2 + rng.uniform(-0.1, 0.1) * big)
    y = int((big - glyph.height) / 2 + rng.uniform(-0.1, 0.1) * big)
    ink = Image.new("L", glyph.size, int(rng.integers(0, 60)))
    img.paste(ink, (x, y), glyph)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def write_glyphs(out: Path, seed: int, renders: int = 4, test_share: float = 0.25) -> None:
    """Split by design family: no style, weight or width of a test font's family is in training."""
    fonts = usable_fonts()
    families = sorted({f for _, f in fonts})
    if len(families) < 4:
        raise SystemExit(f"only {len(families)} font families on this machine: the glyphs dataset needs 4 or more")
    rng = np.random.default_rng(seed)
    test = set(rng.permutation(families)[: max(1, round(len(families) * test_share))])
    for path, fam in fonts:
        split = "test" if fam in test else "train"
        font = ImageFont.truetype(str(path), 96)
        tag = hashlib.sha1(path.name.encode()).hexdigest()[:8]
        for letter in LETTERS:
            for k in range(renders):
                save(render_glyph(font, letter, rng), out, split, letter, f"{tag}_{k}")


def write_shapes(out: Path, seed: int, size: int) -> None:
    from vit.datasets import make_shapes

    make_shapes(out / "train", per_class=150, size=size, seed=1000 + seed)
    make_shapes(out / "test", per_class=50, size=size, seed=2000 + seed)


DATASETS = {
    "digits": write_digits,
    "glyphs": write_glyphs,
    "shapes32": lambda out, seed: write_shapes(out, seed, 32),
    "shapes64": lambda out, seed: write_shapes(out, seed, 64),
}


def keep_per_class(root: Path, n: int, seed: int) -> None:
    """Tiny data: keep ``n`` training images of each class (seeded), delete the rest."""
    rng = np.random.default_rng(seed)
    for folder in sorted((root / "train").iterdir()):
        files = sorted(folder.iterdir())
        for i in rng.permutation(len(files))[n:]:
            files[i].unlink()


def load_split(root: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images and (N,) labels of one split."""
    xs, ys = [], []
    for y, c in enumerate(classes):
        for p in sorted((root / split / c).iterdir()):
            xs.append(np.asarray(Image.open(p).convert("RGB")))
            ys.append(y)
    return np.stack(xs), np.array(ys)


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def run_vit(root: Path, work: Path, budget_min: float, seed: int, flags: list[str]) -> dict:
    """train.py exactly as a user runs it, with the budget and seed; its own test score."""
    run = work / "vit-run"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(root), "--out", str(run)]
    cmd += ["--time-budget", str(budget_min), "--seed", str(seed), *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    minutes = (time.perf_counter() - t0) / 60
    if res.returncode != 0:
        raise SystemExit(f"train.py failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    cfg = json.loads((run / "config.json").read_text())
    m, t = cfg["model"], cfg["train"]
    return dict(
        test_acc=cfg["result"]["test_acc"],
        final_test_acc=final_weights_test(run, root, cfg),
        **(  # the first model alone: left out for an ensemble, whose test_acc is its models' together
            {"single_view_test_acc": single_view_test(run, root, cfg)}
            if m.get("mirror_average") and "members" not in cfg
            else {}
        ),
        best_epoch=cfg["result"]["best_epoch"],
        hflip=t["hflip"],
        minutes=round(minutes, 2),
        budget_used=round(minutes / budget_min, 3),
        epochs=t.get("epochs_fitted") or t["epochs"],
        stopped=cfg["result"].get("stopped"),
        # an ensemble's (train.py trains a second model where the budget outlasts the schedule):
        # test_acc is theirs together, final_test_acc the first model's last weights alone
        **{k: cfg["result"][k] for k in ("members", "member_test_acc") if k in cfg["result"]},
        model=f"{m['depth']}x{m['dim']}, {m['image_size'][0]} px / patch {m['patch_size']}",
    )


def final_weights_test(run: Path, root: Path, cfg: dict) -> float:
    """Test accuracy of the run's last EMA weights (its last raw ones without an EMA), whatever
    the run kept: what keeping other weights at the end (train.py's Trainer.settle) costs or
    gains."""
    import torch

    from vit import ViT, ViTConfig

    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = ViT(ViTConfig.from_dict(cfg["model"])).eval()
    if ck["ema"] is not None:
        weights = {k.removeprefix("module."): v for k, v in ck["ema"].items() if k.startswith("module.")}
    else:
        weights = ck["model"]
    model.load_state_dict(weights)
    return test_accuracy(model, root, cfg)


def single_view_test(run: Path, root: Path, cfg: dict) -> float:
    """Test accuracy of the weights the run kept, from the image alone: what averaging with the
    mirror (``mirror_average``, on for runs trained with flips) gains, on the same weights."""
    from safetensors.torch import load_file

    from vit import ViT, ViTConfig

    model = ViT(ViTConfig.from_dict({**cfg["model"], "mirror_average": False})).eval()
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return test_accuracy(model, root, cfg)


def test_accuracy(model, root: Path, cfg: dict) -> float:
    """``model``'s accuracy on ``root``/test, preprocessed as the run's evaluation does."""
    import torch

    from vit.imageio import Preprocessing, open_image

    prep = Preprocessing.from_dict(cfg["preprocessing"])
    files = [(f, i) for i, c in enumerate(cfg["labels"]) for f in sorted((root / "test" / c).iterdir())]
    right = 0
    with torch.no_grad():
        for start in range(0, len(files), 256):
            chunk = files[start : start + 256]
            x = torch.from_numpy(np.stack([prep(open_image(f)) for f, _ in chunk]))
            right += int((model(x).argmax(1) == torch.tensor([y for _, y in chunk])).sum())
    return round(right / len(files), 4)


def run_svm(root: Path, classes: list[str]) -> dict:
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    (xtr, ytr), (xte, yte) = load_split(root, "train", classes), load_split(root, "test", classes)
    if (xtr == xtr[..., :1]).all():  # grey images: one channel, not three copies of it
        xtr, xte = xtr[..., :1], xte[..., :1]
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # noqa: E731
    t0 = time.perf_counter()
    d = xtr[0].size
    grid = {"svc__C": [1, 10, 100, 1000], "svc__gamma": [g / d for g in (0.03, 0.1, 0.3, 1.0, 3.0)]}
    search = GridSearchCV(make_pipeline(StandardScaler(), SVC(kernel="rbf")), grid, cv=3, n_jobs=1)
    search.fit(flat(xtr), ytr)
    return dict(
        test_acc=round(float((search.predict(flat(xte)) == yte).mean()), 4),
        C=search.best_params_["svc__C"],
        gamma_x_d=round(search.best_params_["svc__gamma"] * d, 2),
        minutes=round((time.perf_counter() - t0) / 60, 2),
    )


def ordinary_recipe(model, xtr, ytr, xte, yte, budget_s: float, side: int, seed: int, lr: float) -> dict:
    """AdamW, one warm-up epoch then cosine to the budget (its length refitted from the measured
    epochs as train.py's is), label smoothing 0.1, a small random affine per image; the final weights on the
    test split."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms import v2 as T

    from vit.budget import TimeBudget

    torch.manual_seed(seed)
    t0 = time.perf_counter()

    def tensors(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
        t = F.interpolate(t, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (t - 0.5) / 0.5

    xtr_t, xte_t, ytr_t = tensors(xtr), tensors(xte), torch.from_numpy(ytr)
    affine = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    batch, n = 64, len(xtr_t)
    steps_per_epoch = math.ceil(n / batch)
    budget = TimeBudget(budget_s, max_epochs=10**6)
    planned, epoch, step = None, 0, 0
    while planned is None or epoch < planned:
        e0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(n).split(batch):
            total = (planned or 10**6) * steps_per_epoch
            warm = steps_per_epoch
            scale = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g in opt.param_groups:
                g["lr"] = lr * max(scale, 0.01)
            x = torch.stack([affine(img) for img in xtr_t[idx]])
            loss = F.cross_entropy(model(x), ytr_t[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if time.perf_counter() - t0 > budget_s:
                break
        epoch += 1
        # The schedule's length, refitted after each epoch by the same rule as train.py's
        # (vit.budget): a first epoch slower than the rest does not end the run early.
        now = time.perf_counter()
        planned = budget.after_epoch(now - e0, epoch, planned or budget.max_epochs, now - t0)
        if time.perf_counter() - t0 > budget_s:
            break
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(xte_t[i : i + 256]).argmax(1) for i in range(0, len(xte_t), 256)]).numpy()
    return dict(
        test_acc=round(float((pred == yte).mean()), 4),
        epochs=epoch,
        minutes=round((time.perf_counter() - t0) / 60, 2),
    )


def baseline_side(native: int) -> int:
    """The input side the baselines train at: small images up to 32 px, others as they are."""
    return max(32, native)


def run_cnn(root: Path, classes: list[str], budget_min: float, seed: int) -> dict:
    import timm

    (xtr, ytr), (xte, yte) = load_split(root, "train", classes), load_split(root, "test", classes)
    side = baseline_side(xtr.shape[1])
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(classes))
    return dict(ordinary_recipe(model, xtr, ytr, xte, yte, budget_min * 60, side, seed, lr=1e-3), side=side)


def run_timm_vit(root: Path, classes: list[str], budget_min: float, seed: int) -> dict:
    from timm.models.vision_transformer import VisionTransformer

    (xtr, ytr), (xte, yte) = load_split(root, "train", classes), load_split(root, "test", classes)
    side = baseline_side(xtr.shape[1])
    model = VisionTransformer(
        img_size=side, patch_size=side // 8, num_classes=len(classes), embed_dim=192, depth=12, num_heads=3
    )
    return dict(ordinary_recipe(model, xtr, ytr, xte, yte, budget_min * 60, side, seed, lr=5e-4), side=side)


METHODS = ("vit", "svm", "cnn", "timm-vit")


# --------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------


def one_split(
    name: str,
    seed: int,
    work: Path,
    budget: float,
    per_class: int | None,
    methods,
    vit_flags: list[str],
    keep: bool = False,
) -> dict:
    root = work / f"{name}-{seed}" / "data"
    shutil.rmtree(root.parent, ignore_errors=True)
    DATASETS[name](root, seed)
    if per_class:
        keep_per_class(root, per_class, seed)
    classes = sorted(p.name for p in (root / "train").iterdir())
    out = dict(
        seed=seed,
        train_images=sum(len(list((root / "train" / c).iterdir())) for c in classes),
        test_images=sum(len(list((root / "test" / c).iterdir())) for c in classes),
    )
    for method in methods:
        print(f"  {name} seed {seed}: {method}", flush=True)
        if method == "vit":
            out[method] = run_vit(root, root.parent, budget, seed, vit_flags)
        elif method == "svm":
            out[method] = run_svm(root, classes)
        elif method == "cnn":
            out[method] = run_cnn(root, classes, budget, seed)
        else:
            out[method] = run_timm_vit(root, classes, budget, seed)
        print(f"    {json.dumps(out[method])}", flush=True)
    if not keep:
        shutil.rmtree(root.parent, ignore_errors=True)
    return out


def summary(runs: list[dict], methods) -> dict:
    """Mean and std of each method over the runs (splits) that have it; ``n`` when some lack it."""
    out = {}
    for m in methods:
        acc = np.array([r[m]["test_acc"] for r in runs if m in r])
        out[m] = dict(mean=round(float(acc.mean()), 4), std=round(float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, 4))
        if len(acc) < len(runs):
            out[m]["n"] = len(acc)
    if "vit" in methods:
        runs = [r for r in runs if "vit" in r]
        used = np.array([r["vit"]["budget_used"] for r in runs])
        out["vit"]["budget_used_mean"] = round(float(used.mean()), 3)
        if all("final_test_acc" in r["vit"] for r in runs):
            final = np.array([r["vit"]["final_test_acc"] for r in runs])
            out["vit"]["final_weights_mean"] = round(float(final.mean()), 4)
            out["vit"]["final_weights_std"] = round(float(final.std(ddof=1)) if len(final) > 1 else 0.0, 4)
        if all("single_view_test_acc" in r["vit"] for r in runs):
            one = np.array([r["vit"]["single_view_test_acc"] for r in runs])
            out["vit"]["single_view_mean"] = round(float(one.mean()), 4)
            out["vit"]["single_view_std"] = round(float(one.std(ddof=1)) if len(one) > 1 else 0.0, 4)
    return out


def table(doc: dict) -> str:
    methods = [m for m in METHODS if any(m in s for s in doc["summary"].values())]
    head = "| data | train / test images | " + " | ".join(methods) + " | ViT budget used |"
    rows = [head, "|" + "---|" * (len(methods) + 3)]
    for key, s in doc["summary"].items():
        runs = doc["results"][key]
        cells = [
            f"{100 * s[m]['mean']:.2f} ± {100 * s[m]['std']:.2f}" + (f" (n={s[m]['n']})" if "n" in s[m] else "")
            if m in s
            else "–"
            for m in methods
        ]
        used = f"{s['vit']['budget_used_mean']:.0%}" if "vit" in s else ""
        sizes = f"{runs[0]['train_images']} / {runs[0]['test_images']}"
        rows.append(f"| {key} | {sizes} | " + " | ".join(cells) + f" | {used} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/learning.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--only", choices=sorted(DATASETS), action="append")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--budget", type=float, default=10.0, help="minutes per training run (default 10)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (splits) to run (default 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed: seeds FIRST .. FIRST+SEEDS-1 (default 0); fresh splits to confirm "
                        "a choice made on others")  # fmt: skip
    p.add_argument("--per-class", type=int, default=None, help="tiny data: training images kept per class")
    p.add_argument("--vit-flags", default="", help="train.py flags to add (to measure a recipe change)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "learning")
    p.add_argument("--keep", action="store_true", help="keep each split's images and ViT run under --work")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.seeds < 1 or a.first_seed < 0:
        p.error("--seeds must be at least 1 and --first-seed at least 0")
    from vit.bench import command_line, machine, portable

    out = a.out or ROOT / "benchmarks" / f"learning_{a.budget:g}min_cpu.json"
    doc = json.loads(out.read_text()) if out.exists() else {"results": {}, "summary": {}}
    if doc["results"] and (
        doc.get("budget_minutes", a.budget) != a.budget
        or ("vit" in a.methods and doc.get("vit_flags", "") != portable(a.vit_flags))
    ):
        p.error(
            f"{out.name} holds runs with another --budget or --vit-flags ({doc.get('budget_minutes')} min, "
            f"{doc.get('vit_flags')!r}): one file pools runs of one setting; give another --out"
        )
    shown, argv = [], list(sys.argv[1:] if argv is None else argv)
    while argv:  # --work is scratch space: where it was is nobody's business, and changes nothing
        arg = argv.pop(0)
        if arg == "--work":
            argv.pop(0)
        elif not arg.startswith("--work="):
            shown.append(arg)
    command = command_line("python benchmarks/learning.py", shown)
    doc.update(machine=machine(), command=command, budget_minutes=a.budget)
    if "vit" in a.methods:
        doc["vit_flags"] = portable(a.vit_flags)  # the flags of the file's ViT runs
    for name in a.only or list(DATASETS):
        key = name if not a.per_class else f"{name}, {a.per_class} per class"
        # A file merges the runs of several commands: each method's runs have theirs.
        commands = doc.setdefault("commands", {})
        commands[key] = {
            **(commands.get(key) if isinstance(commands.get(key), dict) else {}),
            **dict.fromkeys(a.methods, command),
        }
        print(f"== {key}", flush=True)
        flags = a.vit_flags.split()
        runs = [
            one_split(name, seed, a.work, a.budget, a.per_class, a.methods, flags, a.keep)
            for seed in range(a.first_seed, a.first_seed + a.seeds)
        ]
        # other methods' runs of these splits are kept, and every run of other splits
        earlier = {r["seed"]: r for r in doc["results"].get(key, [])}
        runs = [{**earlier.pop(r["seed"], {}), **r} for r in runs]
        runs = sorted(runs + list(earlier.values()), key=lambda r: r["seed"])
        doc["results"][key] = runs
        doc["summary"][key] = summary(runs, [m for m in METHODS if any(m in r for r in runs)])
        out.write_text(json.dumps(doc, indent=1) + "\n")  # saved after every dataset
    print(table(doc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
