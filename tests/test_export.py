"""export/: a tiny trained run -> verified ONNX; the torch-free runtime reads it."""

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from export.onnx_export import ExportError, int8_gate, load_run, save_proto, to_onnx, verify
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
    logits, _ = clf.run(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(logits - ref).max() <= 1e-4
    assert (logits.argmax(1) == ref.argmax(1)).all()


def test_broken_export_is_refused_and_leaves_no_file(run_dir, tmp_path):
    model, run, _ = load_run(run_dir)
    proto = to_onnx(model, attention=False)
    for init in proto.graph.initializer:  # sabotage the head bias
        if list(init.dims) == [4] and init.data_type == onnx.TensorProto.FLOAT:
            arr = onnx.numpy_helper.to_array(init) + 0.5 * np.arange(4, dtype=np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    out = tmp_path / "broken.onnx"
    with pytest.raises(ExportError, match="disagree"):
        verify(proto, model, x, with_attention=False)
        save_proto(proto, out)
    assert not out.exists() and not list(tmp_path.iterdir())


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
    # The real int8 file exists exactly when its measured numbers pass.
    path, result = exported
    int8 = result["int8"]
    assert int8["passed"] == (int8["top1_agreement"] >= 0.99 and int8["fp32_accuracy"] - int8["int8_accuracy"] <= 0.005)
    int8_path = path.with_name("model.int8.onnx")
    assert int8_path.exists() == int8["passed"]
    if int8["passed"]:
        assert Classifier(int8_path).metadata["quantization"].startswith("int8")


def reference_eval(img: Image.Image, size: int, crop_pct: float, mean, std) -> np.ndarray:
    """timm's eval transform, built from torchvision: the independent reference."""
    import math

    t = T.Compose(
        [
            T.Resize(math.floor(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )
    return t(img).numpy()


def fixture_images():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    base.save(buf, "JPEG", exif=exif, quality=95)
    pal = base.convert("P")
    pal.info["transparency"] = 3
    return {
        "exif_rotated": Image.open(io.BytesIO(buf.getvalue())),
        "rgba": base.convert("RGBA"),
        "palette": pal,
        "grayscale": base.convert("L"),
        "cmyk": base.convert("CMYK"),
        "16bit": Image.fromarray(rng.integers(0, 65535, (45, 70), dtype=np.uint16)),
    }


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize("name", list(fixture_images()))
def test_numpy_preprocessing_matches_the_torchvision_eval_transform(exported, name, crop_pct):
    clf = Classifier(exported[0])
    clf.crop_pct = crop_pct
    img = fixture_images()[name]
    ours = clf.preprocess(img)
    ref = reference_eval(open_image(img), 32, crop_pct, clf.mean, clf.std)
    assert ours.shape == ref.shape == (3, 32, 32)
    assert np.abs(ours - ref).max() <= 1e-5


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


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_attention_map_is_the_textbook_rollout(pool):
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
        class_token=pool == "token",
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
        row = rollout[:, 0] if pool == "token" else rollout.mean(1)
        want = row[:, cfg.num_prefix_tokens :].reshape(3, 4, 4)
        want = want / want.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(grid, want, atol=1e-6)
    assert torch.allclose(logits, model(x), atol=1e-6)


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
    logits, _ = clf.run(clf.preprocess(image)[None])
    assert np.allclose(clf.predict(image).probs, softmax(logits[0] / t), atol=1e-6)
