"""Loading weights: timm checkpoints, Google .npz files, and the errors on a mismatch."""

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import _load_weights

from vit import ViT, ViTConfig, from_npz, from_timm
from vit.convert import load_checked, save_npz, to_timm_state_dict


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224)


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_from_timm_checkpoint_files(tmp_path, ref, images, suffix):
    path = tmp_path / f"ckpt{suffix}"
    sd = ref.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"model": sd}, path)  # wrapped, as training scripts save it
    ours = from_timm(path)
    assert ours.config.heads == 3  # inferred from the head dim of 64
    assert (logits(ours, images) - logits(ref, images)).abs().max() <= 1e-5


def test_from_timm_new_head_and_image_size(ref):
    ours = from_timm(ref, num_classes=3, image_size=96)
    assert ours.config.num_classes == 3 and ours.config.image_size == (96, 96)
    assert torch.count_nonzero(ours.head.weight) == 0  # fresh zero-initialised head
    assert logits(ours, torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_state_dict_converts_back_to_timm(ref, images):
    ours = from_timm(ref)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6)
    fresh.load_state_dict(to_timm_state_dict(ours), strict=True)
    assert (logits(fresh, images) - logits(ref, images)).abs().max() == 0


def test_npz_round_trip_and_timm_reads_our_npz(tmp_path, ref, images):
    ours = from_timm(ref)
    path = tmp_path / "ViT-Ti_16.npz"
    save_npz(ours, path)
    back = from_npz(path)
    assert back.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    # timm's own reader of Google checkpoints gets the same model from our file.
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6)
    _load_weights(timm_model, str(path))
    assert (logits(timm_model, images) - logits(ref, images)).abs().max() <= 1e-6


def test_npz_big_vision_scanned_layout(tmp_path, ref, images):
    """big_vision names (MHDPA_0, LayerNorm_1, MlpBlock_0) with blocks stacked on axis 0."""
    path = tmp_path / "orig.npz"
    save_npz(from_timm(ref), path)
    w = dict(np.load(path))
    bv = {"params/pos_embedding": w.pop("Transformer/posembed_input/pos_embedding")}
    rename = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    stacked: dict[str, list] = {}
    for k, v in w.items():
        if k.startswith("Transformer/encoderblock_"):
            i, rest = k[len("Transformer/encoderblock_") :].split("/", 1)
            for a, b in rename.items():
                rest = rest.replace(a, b)
            stacked.setdefault(rest, [None] * 12)[int(i)] = v
        else:
            bv[f"params/{k}"] = v
    for rest, arrs in stacked.items():
        bv[f"params/Transformer/encoderblock/{rest}"] = np.stack(arrs)
    np.savez(tmp_path / "bv.npz", **bv)
    ours = from_npz(tmp_path / "bv.npz")
    assert (logits(ours, images) - logits(ref, images)).abs().max() <= 1e-5


def test_mismatched_checkpoint_lists_keys_and_shapes(ref):
    model = ViT(ViTConfig.preset("Ti/16", num_classes=6))
    sd = dict(ref.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["blocks.3.norm1.bias"]
    sd["head.weight"] = torch.zeros(7, 192)
    with pytest.raises(ValueError) as err:
        load_checked(model, sd, "ckpt.pth")
    text = str(err.value)
    assert "missing in ckpt.pth (1): blocks.3.norm1.bias" in text
    assert "unexpected in ckpt.pth (1): extra.weight" in text
    assert "head.weight: ckpt.pth (7, 192) vs model (6, 192)" in text


def test_features_outside_the_paper_are_refused():
    reg = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=4)
    with pytest.raises(ValueError, match="register tokens"):
        from_timm(reg)
    with pytest.raises(ValueError, match="expected a timm VisionTransformer"):
        from_timm(timm.create_model("resnet18", pretrained=False))


def test_pretrained_name_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: the hub is "down"
    with pytest.raises(RuntimeError, match="pretrained weights of 'vit_tiny_patch16_224'.*unreachable") as err:
        from_timm("vit_tiny_patch16_224")
    assert "pass its .safetensors/.npz path" in str(err.value)


def test_pretrained_name_with_hub_offline_and_empty_cache(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, so this runs in a fresh process."""
    code = (
        "from vit import from_timm\n"
        "try:\n    from_timm('vit_tiny_patch16_224')\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "HF_HUB_OFFLINE is set, and they are not in the local cache" in out.stdout


def test_unknown_name_or_missing_file(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a timm model name"):
        from_timm("vit_does_not_exist")
    with pytest.raises(FileNotFoundError):
        from_timm(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        from_npz(tmp_path / "missing.npz")


def test_npz_arrays_without_a_place_are_refused_with_their_names(tmp_path, ref):
    """Item 12: a pre-logits layer or a MAP head is not silently dropped."""
    path = tmp_path / "ok.npz"
    save_npz(from_timm(ref), path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    extra = {
        "pre_logits/kernel": np.zeros((192, 192), np.float32),
        "MAPHead_0/probe": np.zeros((1, 1, 192), np.float32),
    }
    np.savez(tmp_path / "extra.npz", **arrays, **extra)
    with pytest.raises(ValueError, match="no place for: MAPHead_0/probe, pre_logits/kernel"):
        from_npz(tmp_path / "extra.npz")
    assert from_npz(path).config.dim == 192  # the plain file still loads


def test_npz_pre_logits_is_dropped_only_when_the_head_is_replaced(tmp_path, ref):
    """The paper's ImageNet-21k checkpoints carry a pre-logits layer; fine-tuning drops it with
    the head (as the paper does). Keeping the file's head without it would be approximate."""
    path = tmp_path / "ok.npz"
    save_npz(from_timm(ref), path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(tmp_path / "in21k.npz", **arrays, **{"pre_logits/kernel": np.zeros((192, 192), np.float32),
                                                "pre_logits/bias": np.zeros(192, np.float32)})  # fmt: skip
    with pytest.warns(UserWarning, match="dropped pre_logits/bias, pre_logits/kernel"):
        assert from_npz(tmp_path / "in21k.npz", num_classes=3).config.num_classes == 3
    with pytest.raises(ValueError, match="no place for: pre_logits/bias"):
        from_npz(tmp_path / "in21k.npz")  # the file's own head, whose input was pre_logits
