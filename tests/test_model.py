"""The ViT against timm's VisionTransformer: same weights, same logits, same gradients."""

import dataclasses
import math

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from vit import ViT, ViTConfig, from_timm, resample_pos_embed
from vit.convert import timm_kwargs

PARITY_CASES = {
    "tiny_p16": ("vit_tiny_patch16_224", {}),
    "small_p16": ("vit_small_patch16_224", {}),
    "base_p32": ("vit_base_patch32_224", {}),
    "avgpool_no_cls": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "size_384": ("vit_tiny_patch16_384", {}),
    "non_square_160x96": ("vit_tiny_patch16_224", dict(img_size=(160, 96))),
    "no_qkv_bias": ("vit_tiny_patch16_224", dict(qkv_bias=False)),
}


def perturbed_timm(name: str, **kwargs) -> torch.nn.Module:
    """A timm model whose every parameter is random, so a wrong key map cannot hide."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_timm(case):
    name, kwargs = PARITY_CASES[case]
    ref = perturbed_timm(name, **kwargs).eval()
    ours = from_timm(ref).eval()
    x = torch.randn(3, 3, *ours.config.image_size)
    with torch.no_grad():
        expected = ref(x)
        fused = ours(x)
        explicit, _ = ours.forward_with_attention(x)
    assert fused.shape == (3, 10)
    assert expected.abs().max() > 0.1  # logits are not trivially zero
    assert (fused - expected).abs().max() <= 1e-5
    assert (explicit - expected).abs().max() <= 1e-5


def test_gradients_match_timm_in_train_mode():
    ref = perturbed_timm("vit_tiny_patch16_224").train()
    ours = from_timm(ref).train()
    x, y = torch.randn(4, 3, 224, 224), torch.tensor([0, 3, 5, 9])
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    torch.nn.functional.cross_entropy(ours(x), y).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        assert p.grad is not None, name
        scale = g_ref.abs().max().clamp_min(1e-3)
        assert (p.grad - g_ref).abs().max() / scale <= 1e-4, name


def test_attention_paths_agree_and_weights_are_distributions():
    model = ViT(ViTConfig.preset("Ti/16", image_size=64, num_classes=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(2, 3, 64, 64)
        fused = model(x)
        explicit, attns = model.forward_with_attention(x)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert len(attns) == 12
    assert attns[0].shape == (2, 3, 17, 17)
    assert attns[-1].shape == (2, 3, 1, 17)  # last block: the class token's row only
    for a in attns:
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)


def test_dropout_and_drop_path_act_only_in_training():
    cfg = ViTConfig.preset("Ti/16", image_size=32, num_classes=4, dropout=0.1, attn_dropout=0.1, drop_path=0.2)
    model = ViT(cfg)
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_mirror_average_averages_both_views_in_eval_mode_only():
    """With mirror_average the model predicts the same for an image and its mirror: the mean of
    the plain model's logits for the two; training sees the image as given."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, num_classes=5, stem="conv")
    plain = ViT(cfg)
    with torch.no_grad():
        plain.head.weight.normal_()
    both = ViT(dataclasses.replace(cfg, mirror_average=True))
    both.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32)
    plain.eval(), both.eval()
    with torch.no_grad():
        want = (plain(x) + plain(x.flip(-1))) / 2
        assert not torch.allclose(plain(x), plain(x.flip(-1)), atol=1e-3)  # the views do differ
        assert torch.allclose(both(x), want, atol=1e-5)
        assert torch.allclose(both(x.flip(-1)), both(x), atol=1e-5)
    plain.train(), both.train()
    assert torch.equal(both(x), plain(x))


@pytest.mark.parametrize(
    "old, new, prefix",
    [((14, 14), (24, 24), 1), ((14, 14), (10, 17), 1), ((7, 7), (12, 5), 0), ((12, 8), (6, 9), 1)],
)
def test_pos_embed_resampling_matches_timm(old, new, prefix):
    pe = torch.randn(1, prefix + old[0] * old[1], 32)
    expected = resample_abs_pos_embed(pe, new_size=list(new), old_size=list(old), num_prefix_tokens=prefix)
    got = resample_pos_embed(pe, new, old, prefix)
    assert got.shape == (1, prefix + new[0] * new[1], 32)
    assert (got - expected).abs().max() <= 1e-6


def test_set_image_size_matches_timm_set_input_size():
    ref = perturbed_timm("vit_tiny_patch16_224").eval()
    ours = from_timm(ref).eval()
    ref.set_input_size(img_size=(160, 192))
    ours.set_image_size((160, 192))
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


def test_wrong_input_size_names_the_fix():
    model = ViT(ViTConfig.preset("Ti/16", image_size=32, num_classes=2))
    with pytest.raises(ValueError, match="set_image_size"):
        model(torch.randn(1, 3, 48, 48))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    num_classes = 7
    model = ViT(ViTConfig(image_size=32, patch_size=8, num_classes=num_classes, dim=64, depth=2, heads=4, mlp_dim=128))
    x, y = torch.randn(14, 3, 32, 32), torch.arange(14) % num_classes
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(num_classes)) < 1e-4  # zero head: uniform predictions
    assert losses[-1] < 0.05


@pytest.mark.parametrize(
    "variant, params_m",
    [("Ti/16", 5.7), ("S/16", 22.1), ("B/16", 86.6), ("L/16", 304.3), ("H/14", 632.0)],
)
def test_presets_have_published_sizes(variant, params_m):
    """B/L/H: paper Table 1 (86M, 307M, 632M); Ti/S: DeiT Table 1 (5M, 22M); 1000 classes."""
    with torch.device("meta"):
        n = ViT(ViTConfig.preset(variant, image_size=224)).num_params()
    assert abs(n / 1e6 - params_m) / params_m < 0.01


def test_preset_counts_equal_timm():
    cfg = ViTConfig.preset("S/16")
    with torch.device("meta"):
        ours = ViT(cfg).num_params()
        ref = timm.models.vision_transformer.VisionTransformer(**timm_kwargs(cfg))
    assert ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30, patch_size=16), "not divisible by patch_size"),
        (dict(dim=100, heads=3), "not divisible by heads"),
        (dict(class_token=False, pool="token"), "needs class_token"),
        (dict(pool="max"), "pool must be"),
        (dict(stem="resnet"), "stem must be"),
        (dict(stem="conv", patch_size=14), "power of 2"),
        (dict(stem="conv", stem_depth=0), "stem_depth must be 1 or more"),
        (dict(stem="patch", stem_depth=2), "needs stem='conv'"),
    ],
)
def test_config_rejects_inconsistent_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown variant 'X/16'.*'S/16'"):
        ViTConfig.preset("X/16")


def test_config_round_trips_through_dict():
    cfg = ViTConfig.preset("S/32", image_size=(96, 128), num_classes=3, drop_path=0.1)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        ViTConfig.from_dict({**cfg.to_dict(), "depthh": 3})


def test_conv_stem_keeps_the_token_grid_and_refuses_conversion():
    """The hybrid stem (paper §3.1): same tokens per image as patches, trainable, BN folded in eval."""
    from vit.convert import save_npz, timm_kwargs, to_timm_state_dict

    cfg = ViTConfig(image_size=(32, 48), patch_size=8, dim=64, depth=2, heads=2, mlp_dim=128, num_classes=3)
    cfg = dataclasses.replace(cfg, stem="conv")
    model = ViT(cfg)
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3  # log2(8) stride-2 stages
    tokens = model.embed(torch.randn(2, 3, 32, 48))
    assert tokens.shape == (2, 1 + 4 * 6, 64)
    x, y = torch.randn(4, 3, 32, 48), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.patch_embed.parameters())
    model.eval()
    assert torch.equal(model(x[:1]), model(x[:1]))  # eval: running BN statistics, no batch coupling
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-6)
    for convert in (lambda: to_timm_state_dict(model), lambda: timm_kwargs(cfg), lambda: save_npz(model, "x.npz")):
        with pytest.raises(ValueError, match="conv stem"):
            convert()


def test_a_deeper_conv_stem_adds_stride_1_convolutions_and_keeps_the_first_layers_names():
    """stem_depth 2: each stage is a stride-2 convolution and a stride-1 one; the grid is the same,
    and depth 1 is the stem saved runs were trained with, key for key."""
    cfg = ViTConfig(image_size=16, patch_size=4, dim=64, depth=1, heads=2, mlp_dim=64, num_classes=3, stem="conv")
    one, two = ViT(cfg), ViT(dataclasses.replace(cfg, stem_depth=2))
    strides = [m.stride[0] for m in two.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 1, 2, 1]
    assert [m.stride[0] for m in one.patch_embed.stem if isinstance(m, torch.nn.Conv2d)] == [2, 2]
    convs = lambda m: [k for k, v in m.patch_embed.stem.named_children() if isinstance(v, torch.nn.Conv2d)]  # noqa: E731
    assert convs(one) == ["0", "3"] and convs(two) == ["0", "3", "6", "9"]  # depth 1: the layout saved runs have
    x = torch.randn(2, 3, 16, 16)
    assert one.embed(x).shape == two.embed(x).shape == (2, 17, 64)
    assert ViTConfig.from_dict(two.config.to_dict()) == two.config


def test_an_ensemble_averages_its_members_logits_and_needs_one_configuration():
    from vit.model import Ensemble, members_of

    cfg = ViTConfig(image_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64)
    torch.manual_seed(0)
    a, b = ViT(cfg).eval(), ViT(cfg).eval()
    for m in (a, b):  # the head starts at zero: give each one of its own
        torch.nn.init.normal_(m.head.weight)
    both = Ensemble([a, b]).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = (a(x) + b(x)) / 2
        assert torch.allclose(both(x), want, atol=1e-6) and not torch.allclose(a(x), want, atol=1e-3)
    assert both.config == cfg and members_of(both) == [a, b] and members_of(a) == [a]
    assert both.num_params() == 2 * a.num_params()
    with pytest.raises(ValueError, match="one configuration"):
        Ensemble([a, ViT(dataclasses.replace(cfg, num_classes=4))])
