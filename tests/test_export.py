"""export/: a tiny trained run -> verified ONNX; the torch-free runtime reads it."""

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from export.onnx_export import ExportError, int8_gate, load_run, save_proto, to_onnx
from tests.conftest import ROOT
from vit.imageio import open_image
from vit.runtime import Classifier, ModelFileError


def test_file_is_checked_self_contained_and_self_describing(exported, run_dir):
    path, result = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    run = json.loads((run_dir / "config.json").read_text())
    assert json.loads(meta["labels"]) == run["labels"]
    assert json.loads(meta["image_size"]) == [32, 32]
    assert json.loads(meta["mean"]) == run["preprocessing"]["mean"]
    assert json.loads(meta["model_config"]) == run["model"]
    assert float(meta["val_accuracy"]) == run["result"]["val_acc"]
    assert len(meta["weights_sha256"]) == 64 and meta["exported_at"]
    assert result["fp32"]["max_abs_logit_diff"] <= 1e-4


def test_files_name_no_folder_of_the_machine_that_made_them(exported):
    """The exporter notes each operator's Python stack trace, with this machine's folders: a
    shared model must not carry them (nor the int8 twin made from it)."""
    path, _ = exported
    files = sorted(path.parent.glob("*.onnx"))
    assert files
    for f in files:
        data = f.read_bytes()
        assert str(ROOT).encode() not in data and sys.prefix.encode() not in data, f.name
        proto = onnx.load(str(f))
        assert not any(n.metadata_props or n.doc_string for n in proto.graph.node), f.name
        assert {p.key for p in proto.metadata_props} >= {"labels", "weights_sha256"}


def test_runtime_reads_metadata_and_batches(exported, shapes_dir):
    path, _ = exported
    clf = Classifier(path)
    assert clf.labels == ["circle", "cross", "square", "triangle"]
    imgs = [Image.open(p) for p in sorted((shapes_dir / "square").iterdir())[:8]]
    for b in (1, 3, 8):
        preds = clf.predict_many(imgs[:b])
        assert len(preds) == b
        for pr in preds:
            assert pr.attention.shape == (4, 4) and pr.attention.max() == pytest.approx(1.0)
            assert abs(sum(pr.probs) - 1) < 1e-5 and pr.top_k[0][1] == max(pr.probs)


def test_runtime_matches_pytorch_on_validation_images(exported, run_dir):
    path, _ = exported
    model, run, _ = load_run(run_dir)
    clf = Classifier(path)
    split = json.loads((run_dir / "split.json").read_text())
    root = run["train"]["data"]
    imgs = [open_image(f"{root}/{rel}") for rel, _ in split["val"]]
    x = np.stack([clf.preprocess(i) for i in imgs])
    logits = clf.run(x)["logits"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(logits - ref).max() <= 1e-4
    assert (logits.argmax(1) == ref.argmax(1)).all()


def test_broken_export_is_refused_and_leaves_no_file(run_dir, tmp_path, monkeypatch):
    """The real export path with a graph that disagrees with PyTorch: refused, nothing written."""
    import export.onnx_export as oe

    real = oe.to_onnx

    def sabotaged(model, attention=True, ood=None):
        proto = real(model, attention, ood)
        for init in proto.graph.initializer:  # the head bias, shifted per class
            if list(init.dims) == [4] and init.data_type == onnx.TensorProto.FLOAT:
                arr = onnx.numpy_helper.to_array(init) + 0.5 * np.arange(4, dtype=np.float32)
                init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return proto

    monkeypatch.setattr(oe, "to_onnx", sabotaged)
    out = tmp_path / "broken.onnx"
    with pytest.raises(ExportError, match="disagree"):
        oe.export_run(run_dir, out, int8=True)
    assert not list(tmp_path.iterdir())


def test_export_cli_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from export.__main__ import main

    assert main([str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_int8_gate_decides_from_the_measured_numbers(exported):
    y = np.arange(200) % 4
    good = np.eye(4)[y] * 5
    assert int8_gate(good, good, y)["passed"]
    flipped = good.copy()
    flipped[:3] = np.eye(4)[(y[:3] + 1) % 4] * 5  # 1.5% disagreement, 1.5 points lost
    g = int8_gate(good, flipped, y)
    assert not g["passed"] and g["top1_agreement"] == pytest.approx(0.985)
    path, result = exported  # the real int8 file exists exactly when its gate passed
    assert path.with_name("model.int8.onnx").exists() == result["int8"]["passed"]
    if result["int8"]["passed"]:
        assert Classifier(path.with_name("model.int8.onnx")).metadata["quantization"].startswith("int8")


def test_a_model_int8_breaks_is_refused_and_an_old_int8_file_removed(run_dir, tmp_path):
    """Items 9 and the gate: one feature scaled by 1e4 before the head (and given no weight in
    it) leaves fp32 exactly as it was, but int8's per-tensor activation scale then rounds every
    other feature to zero. The gate must refuse, and an int8 file from an earlier export of
    another model must not stay beside the new fp32 file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from export.onnx_export import export_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.onnx", "checkpoint.pt"))
    sd = load_file(run / "model.safetensors")
    norm = "fc_norm.weight" if "fc_norm.weight" in sd else "norm.weight"
    sd[norm][0] = 1e4
    sd["head.weight"][:, 0] = 0.0
    save_file(sd, run / "model.safetensors")
    out = tmp_path / "m.onnx"
    stale = tmp_path / "m.int8.onnx"
    stale.write_bytes(b"an int8 file from an earlier export")
    result = export_run(run, out, int8=True)
    assert result["int8"]["passed"] is False and result["int8"]["top1_agreement"] < 0.9
    assert out.is_file() and not stale.exists()


def test_calibration_sees_every_class(run_dir, monkeypatch):
    """Item 2: split.json is sorted by path (grouped by class); a small calibration sample is
    still stratified over every class, not the first class's images."""
    import export.onnx_export as oe
    from vit.run import RunDir, stratified_sample

    seen = []
    monkeypatch.setattr(oe, "CALIBRATION_IMAGES", 4)
    monkeypatch.setattr(oe, "fit_temperature", lambda logits, y: seen.append(y) or 1.0)
    oe.export_run(run_dir, run_dir / "calibration-test.onnx")
    assert sorted(seen[0]) == [0, 1, 2, 3]
    items = [(f"{c}/{i}.png", c) for c in range(3) for i in range(10 * (c + 1))]  # 10, 20, 30 per class
    picked = stratified_sample(items, 12, seed=0)
    counts = [sum(1 for _, c in picked if c == k) for k in range(3)]
    assert counts == [2, 4, 6] and picked == stratified_sample(items, 12, seed=0)
    assert len(RunDir(run_dir).items("val")) == len(json.loads((run_dir / "split.json").read_text())["val"])


def test_bench_out_accepts_a_folder(tmp_path):
    """Item 19: --out DIR is resolved (and created) before measuring."""
    from export.bench import DEFAULT_NAME, output_path

    assert output_path(tmp_path) == tmp_path / DEFAULT_NAME
    assert output_path(tmp_path / "new" / "dir") == tmp_path / "new" / "dir" / DEFAULT_NAME
    assert (tmp_path / "new" / "dir").is_dir()
    assert output_path(tmp_path / "x.json") == tmp_path / "x.json"


def reference_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from PIL alone, written independently of vit.imageio: EXIF applied,
    transparency over white, 16-bit scaled to 8 bits, everything else by PIL's convert."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "I;16":
        a = np.asarray(img).astype(np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.round(a).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")


def reference_eval(img: Image.Image, size: tuple[int, int], crop_pct: float, interpolation: str, mean, std):
    """timm's eval transform (transforms_factory.transforms_imagenet_eval), from torchvision."""
    import math

    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    H, W = size
    scale = math.floor(H / crop_pct) if H == W else (math.floor(H / crop_pct), math.floor(W / crop_pct))
    t = T.Compose(
        [
            T.Resize(scale, interpolation=mode),
            T.CenterCrop(size),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )
    return t(reference_rgb(img)).numpy()


def fixture_images():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 255, (45, 70), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    base.save(buf, "JPEG", exif=exif, quality=95)
    pal = base.convert("P")
    pal.info["transparency"] = 3
    rgba = base.copy()
    rgba.putalpha(alpha)  # partly transparent everywhere
    cmyk = io.BytesIO()
    base.convert("CMYK").save(cmyk, "JPEG", quality=95)
    return {
        "exif_rotated": Image.open(io.BytesIO(buf.getvalue())),
        "rgba": rgba,
        "palette": pal,
        "grayscale": base.convert("L"),
        "cmyk_jpeg": Image.open(io.BytesIO(cmyk.getvalue())),
        "16bit": Image.fromarray(rng.integers(0, 65535, (45, 70), dtype=np.uint16)),
    }


@pytest.mark.parametrize(
    "size, crop_pct, interpolation",
    [((32, 32), 1.0, "bicubic"), ((32, 32), 0.875, "bicubic"), ((24, 40), 0.9, "bilinear"), ((40, 24), 1.0, "bicubic")],
)
@pytest.mark.parametrize("name", list(fixture_images()))
def test_numpy_preprocessing_matches_pil_and_torchvision(name, size, crop_pct, interpolation):
    """The runtime's decode and preprocess against PIL and torchvision directly, per colour mode,
    square and non-square inputs, bicubic and bilinear."""
    from vit.imageio import preprocess

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = preprocess(open_image(fixture_images()[name]), size, mean, std, crop_pct, interpolation)
    ref = reference_eval(fixture_images()[name], size, crop_pct, interpolation, mean, std)
    assert ours.shape == ref.shape == (3, *size)
    assert np.abs(ours - ref).max() <= 1e-5


def test_classifier_preprocessing_is_the_files(exported):
    clf = Classifier(exported[0])
    img = fixture_images()["rgba"]
    ref = reference_eval(img, (32, 32), clf.crop_pct, clf.interpolation, clf.mean, clf.std)
    assert np.abs(clf.preprocess(img) - ref).max() <= 1e-5


def test_runtime_works_where_torch_cannot_be_imported(exported, shapes_dir):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from vit.runtime import Classifier\n"
        f"c = Classifier({str(exported[0])!r})\n"
        f"p = c.predict({str(next((shapes_dir / 'circle').iterdir()))!r})\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print(p.label, len(p.top_k))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] in ("circle", "cross", "square", "triangle")


def test_runtime_refuses_files_it_cannot_use(tmp_path, run_dir):
    with pytest.raises(ModelFileError, match="not found"):
        Classifier(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        Classifier(tmp_path / "junk.onnx")
    model, _, _ = load_run(run_dir)
    plain = tmp_path / "plain.onnx"
    save_proto(to_onnx(model, attention=False), plain)
    with pytest.raises(ModelFileError, match="lacks metadata"):
        Classifier(plain)


@pytest.mark.parametrize("pool, class_token", [("token", True), ("avg", False), ("avg", True)])
def test_attention_map_is_the_textbook_rollout(pool, class_token):
    """Exportable's one-row rollout equals Abnar & Zuidema's product of full N x N matrices."""
    from export.onnx_export import Exportable
    from vit import ViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        dim=32,
        depth=3,
        heads=2,
        mlp_dim=64,
        num_classes=4,
        pool=pool,
        class_token=class_token,
        fc_norm=pool == "avg",
    )
    model = ViT(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, grid = Exportable(model)(x)
        _, attns = model.forward_with_attention(x)
        n = attns[0].shape[-1]
        rollout = torch.eye(n).expand(3, n, n)
        for a in attns:
            a = a.mean(1)  # heads averaged
            if a.shape[1] < n:  # a class-token model's last block holds only the class token's row
                a = torch.cat([a, torch.eye(n)[1:].expand(3, n - 1, n)], dim=1)
            r = 0.5 * a + 0.5 * torch.eye(n)
            rollout = r / r.sum(-1, keepdim=True) @ rollout
        row = rollout[:, 0] if pool == "token" else rollout[:, cfg.num_prefix_tokens :].mean(1)
        want = row[:, cfg.num_prefix_tokens :].reshape(3, 4, 4)
        want = want / want.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(grid, want, atol=1e-6)
    assert torch.allclose(logits, model(x), atol=1e-6)


def test_a_mirror_averaging_run_exports_both_views(run_dir, tmp_path):
    """A run that predicts from the image and its mirror exports the same: the file's logits,
    attention map and score are checked against PyTorch by the export itself; the map of a
    mirrored image is the mirrored map, and the file says what it does."""
    import shutil

    from export.onnx_export import export_run

    run = tmp_path / "mirrored"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.onnx"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["mirror_average"] = cfg["train"]["mirror_average"] = True
    (run / "config.json").write_text(json.dumps(cfg))
    export_run(run, run / "model.onnx", attention=True, int8=False)
    clf = Classifier(run / "model.onnx")
    assert clf.metadata["views"] == "the image and its mirror, logits averaged"
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    logits, grid, score = clf.session.run(["logits", "attention", "ood_score"], {"pixel_values": x})
    logits_m, grid_m, score_m = clf.session.run(
        ["logits", "attention", "ood_score"], {"pixel_values": x[..., ::-1].copy()}
    )
    assert np.allclose(logits, logits_m, atol=1e-4) and np.allclose(grid_m, grid[..., ::-1], atol=1e-5)
    assert np.allclose(score, score_m, rtol=1e-4)  # "unlike its classes" is the same for both views too


def test_temperature_scaling_recovers_a_known_temperature():
    from export.onnx_export import fit_temperature
    from vit.runtime import softmax

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 5))  # calibrated logits: labels are drawn from softmax(z)
    y = np.array([rng.choice(5, p=p) for p in softmax(z)])
    assert abs(fit_temperature(z, y) - 1.0) < 0.1
    assert abs(fit_temperature(3 * z, y) - 3.0) < 0.3  # over-confident logits: cooled back down
    assert abs(fit_temperature(z / 2, y) - 0.5) < 0.05  # under-confident ones (label smoothing): sharpened


def test_runtime_applies_the_files_temperature(exported, shapes_dir):
    from vit.runtime import softmax

    clf = Classifier(exported[0])
    t = float(clf.metadata["temperature"])
    assert 0.05 <= t <= 20 and clf.info()["temperature"] == t
    image = next(shapes_dir.glob("*/*.png"))
    logits = clf.run(clf.preprocess(image)[None])["logits"]
    assert np.allclose(clf.predict(image).probs, softmax(logits[0] / t), atol=1e-6)


def test_ood_score_in_the_file_equals_pytorch_and_carries_its_fit(exported, run_dir):
    """The file's ood_score is the Mahalanobis score computed in PyTorch from the same fit, and
    its threshold and how it was fitted are in the metadata."""
    from export.onnx_export import fit_ood, split_inputs
    from export.ood import pooled_features

    path, _ = exported
    clf = Classifier(path)
    meta = clf.metadata
    assert float(meta["ood_threshold"]) == clf.ood_threshold > 0
    assert "Mahalanobis" in meta["ood_rule"] and "conformal" in meta["ood_rule"]
    from vit.run import RunDir

    n_val = len(RunDir(run_dir).items("val"))  # below 66, the 98.5% quantile does not exist, and the file says so
    assert (f"largest of {n_val} validation images' scores (too few" in meta["ood_rule"]) == (n_val < 66)
    assert (f"quantile of {n_val} validation images' scores" in meta["ood_rule"]) == (n_val >= 66)
    rates = json.loads(meta["ood_known_rates"])
    assert {"validation", "uniform noise", "flat colours", "smooth gradients"} <= set(rates)
    model, _, _ = load_run(run_dir)
    x_val, _ = split_inputs(run_dir, "val")
    scorer = fit_ood(model, run_dir, None, x_val, log=lambda *_: None)
    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = scorer(torch.from_numpy(pooled_features(model, x))).numpy()
    got = clf.run(x)["ood_score"]
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-3), (got, ref)


def test_noise_is_flagged_and_validation_images_are_not(exported, run_dir):
    from vit.run import RunDir

    clf = Classifier(exported[0])
    run = RunDir(run_dir)
    val = [Image.open(run.data_root() / rel) for rel, _ in run.items("val")]
    known = [p.known for p in clf.predict_many(val)]
    assert np.mean(known) >= 0.85, known
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(32)]
    preds = clf.predict_many(noise)
    assert np.mean([not p.known for p in preds]) >= 0.9
    assert all(p.status == "unknown" and not p.sure and p.top_k for p in preds if not p.known)


def test_the_int8_twin_keeps_the_score(exported, run_dir):
    """Quantising the score's product would scramble its distances; it stays fp32 in the int8 file."""
    import onnx

    int8 = exported[0].with_name("model.int8.onnx")
    if not int8.exists():
        pytest.skip("the int8 gate refused this tiny model")
    names = {i.name for i in onnx.load(str(int8)).graph.initializer}
    assert {"ood.deep.w", "ood.stem.w"} <= names and not any(n.endswith("_quantized") and "ood." in n for n in names)
    fp32, q = Classifier(exported[0]), Classifier(int8)
    rng = np.random.default_rng(5)
    noise = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(16)]
    assert not any(p.known for p in q.predict_many(noise))
    scores = [(a.ood_score, b.ood_score) for a, b in zip(fp32.predict_many(noise), q.predict_many(noise))]
    assert all(abs(a - b) / a < 0.05 for a, b in scores)  # the same distances, up to the int8 features


def test_ood_fit_recovers_a_known_gaussian_and_keeps_its_share():
    """The class means and shared covariance of synthetic Gaussian classes, an invertible
    covariance from fewer images than dimensions, and a conformal threshold that keeps its share."""
    from export.ood import conformal_threshold, fit_gaussian

    rng = np.random.default_rng(0)
    d, k = 8, 3
    mu = rng.normal(0, 5, (k, d))
    a = rng.normal(0, 1, (d, d))
    cov = a @ a.T + np.eye(d)
    y = np.repeat(np.arange(k), 4000)
    f = mu[y] + rng.multivariate_normal(np.zeros(d), cov, len(y))
    means, precision = fit_gaussian(f, y, k)
    assert np.abs(means - mu).max() < 0.15
    assert np.abs(np.linalg.inv(precision) - cov).max() / np.abs(cov).max() < 0.05
    _, few = fit_gaussian(f[:5] @ np.ones((d, 40)), y[:5], k)  # 5 images, 40 dimensions
    assert np.isfinite(few).all()
    scores = rng.exponential(1.0, 2000)
    t = conformal_threshold(scores[:1000], 0.985)
    assert 0.975 <= np.mean(scores[1000:] <= t) <= 0.995
    assert conformal_threshold(np.arange(10.0), 0.985) == 9.0  # too few images: the largest
    from export.ood import blocks_for

    assert [blocks_for(n, 6, 128) for n in (10_000, 7_560, 1_200)] == [6, 5, 1]  # as many as the images support


def test_the_patch_embedding_guards_what_the_last_blocks_miss():
    """An image whose last blocks look known but whose patch embedding is far from every
    training image's is unknown, one that is strange in the last blocks is too, and the
    guard, counted from STEM_MARGIN times its validation quantile, keeps new known images."""
    from export.ood import KEEP, STEM_MARGIN, OODScore, conformal_threshold

    rng = np.random.default_rng(0)
    k, depth, d = 3, 2, 6
    centres = rng.normal(0, 4, (depth + 1, k, d))

    def taps(y, shift=0.0):
        return centres[:, y].transpose(1, 0, 2) + rng.normal(0, 1, (len(y), depth + 1, d)) + shift

    y = np.repeat(np.arange(k), 400)
    fit_val = taps(y[::4])
    score = OODScore.fit(taps(y), y, fit_val, k, depth)
    assert score.blocks == depth and score.fit_images == len(y)  # 1,200 images support both blocks
    with torch.no_grad():
        deep, stem = (p.numpy() for p in score.parts(torch.from_numpy(fit_val).float()))
    scales = [conformal_threshold(deep, KEEP), STEM_MARGIN * conformal_threshold(stem, KEEP)]
    assert np.allclose(score.scales.numpy(), scales, rtol=1e-5)

    def answers(t):
        with torch.no_grad():
            return score(torch.from_numpy(t).float()).numpy()

    val = answers(taps(y[1::4]))
    threshold = conformal_threshold(val, KEEP)
    assert np.mean(answers(taps(y[2::4])) <= threshold) >= 0.95  # new known images stay known
    stem_only = taps(y[:300])
    stem_only[:, 0] += 8.0  # far before any block, ordinary in the last one
    assert np.mean(answers(stem_only) > threshold) >= 0.95
    deep_only = taps(y[:300])
    deep_only[:, -1] += 8.0
    assert np.mean(answers(deep_only) > threshold) >= 0.95
    plain = taps(y[:300])
    plain[:, 0] += 0.3  # a little off in the embedding alone: the margin lets it pass
    assert np.mean(answers(plain) <= threshold) >= 0.9


def test_preprocessing_is_one_typed_record_from_run_to_file(run_dir, exported):
    """The run's config, the ONNX metadata and the runtime hold the same Preprocessing; bad values
    are refused with what is wrong."""
    from vit.imageio import Preprocessing
    from vit.run import RunDir
    from vit.runtime import Classifier

    prep = RunDir(run_dir).preprocessing()
    assert Classifier(exported[0], warmup=False).preprocessing == prep
    assert Preprocessing.from_dict(prep.to_dict()) == prep == Preprocessing.from_metadata(prep.metadata())
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        Preprocessing(32, [0.5] * 3, [0.5] * 3, "cubic")
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocessing(32, [0.5] * 3, [0.5] * 3, "bicubic", 1.5)
    with pytest.raises(ValueError, match="std"):
        Preprocessing(32, [0.5] * 3, [0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="lacks"):
        Preprocessing.from_dict({"image_size": [32, 32]})


def test_a_file_with_unusable_preprocessing_is_refused_with_a_reason(exported, tmp_path):
    import onnx

    from export.onnx_export import set_metadata
    from vit.runtime import Classifier, ModelFileError

    proto = onnx.load(str(exported[0]))
    set_metadata(proto, {"interpolation": "cubic"})
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelFileError, match="interpolation 'cubic'"):
        Classifier(tmp_path / "bad.onnx")


def test_a_file_made_by_an_earlier_export_is_published_without_its_traces(exported, tmp_path):
    """The Space and the web page copy a given .onnx file: one exported before the traces were
    removed must not carry them into a public folder."""
    from export.space import stage_model

    path, _ = exported
    proto = onnx.load(str(path))
    proto.graph.node[0].metadata_props.add(key="pkg.torch.onnx.stack_trace", value='File "/home/someone/vit/model.py"')
    old = tmp_path / "old.onnx"
    save_proto(proto, old)
    stage_model(old, tmp_path / "served.onnx", int8=False, log=lambda *_: None)
    served = onnx.load(str(tmp_path / "served.onnx"))
    assert b"/home/someone" in old.read_bytes() and b"/home/someone" not in (tmp_path / "served.onnx").read_bytes()
    assert {p.key: p.value for p in served.metadata_props} == {p.key: p.value for p in proto.metadata_props}


def test_the_file_names_its_starting_weights_without_their_folder():
    from export.onnx_export import portable_name

    assert portable_name("/home/someone/ckpt/x.safetensors") == "x.safetensors"  # gone or not, no folder
    assert portable_name("C:\\Users\\someone\\w.npz") == "w.npz"
    assert portable_name("vit_small_patch16_224.augreg_in21k") == "vit_small_patch16_224.augreg_in21k"
    assert portable_name("hf-hub:timm/vit_base_patch16_224") == "hf-hub:timm/vit_base_patch16_224"


@pytest.mark.parametrize("n_val, probes_known", [(20, True), (80, False)])
def test_export_warns_of_too_few_validation_images_and_of_probes_taken_for_known(n_val, probes_known):
    """Below 66 validation images the 98.5% quantile does not exist: export says so, and the
    rule says what the threshold is instead; when most generated probe images pass as known,
    export says the score cannot tell them from the classes."""
    from types import SimpleNamespace

    from export.onnx_export import ood_metadata
    from vit.imageio import Preprocessing

    def run(_names, feeds):  # validation images (filled with -5) score 0; probes 0 or far away
        x = feeds["pixel_values"].reshape(len(feeds["pixel_values"]), -1)
        return [np.where(x.min(1) < -4, 0.0, 0.0 if probes_known else 1e9)]

    said = []
    meta = ood_metadata(
        SimpleNamespace(run=run), np.full((n_val, 3, 16, 16), -5.0, np.float32), None,
        Preprocessing(16, [0.5] * 3, [0.5] * 3), log=said.append,
    )  # fmt: skip
    log = "\n".join(said)
    assert ("validation images are too few for the 98.5% quantile (at least 66)" in log) == (n_val < 66)
    assert ("are answered as known: this model's score cannot tell them" in log) == probes_known
    assert (f"the largest of {n_val} validation images' scores" in meta["ood_rule"]) == (n_val < 66)
