import argparse
import dataclasses
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from common.config import DiscConfig
from common.discriminators import (
    DiscriminatorError,
    ResNetDiscriminator,
    UNetDiscriminator,
    build_discriminator,
    channel_table,
    export_stylegan2_rosinality,
    load_pretrained_disc,
    load_stylegan2_rosinality,
    nvidia_to_rosinality,
    read_disc_state_dict,
    rosinality_channel_table,
    stylegan2_config,
)
from common.losses import r1_penalty
from tools import convert_stylegan2_nvidia

torch.set_num_threads(1)

RES = 32
TABLE = {32: 16, 16: 32, 8: 32, 4: 32}  # channel_table(32, 16, 32)


def tiny_cfg(**overrides) -> DiscConfig:
    return dataclasses.replace(DiscConfig(channels=16, max_channels=32, t_embed_dim=16), **overrides)


def rosinality_state_dict(table=TABLE, resolution=RES, seed=0) -> dict:
    """Random tensors with the exact keys and shapes of rosinality's Discriminator."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    kernel = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(kernel, kernel) / 64
    sd = {"convs.0.0.weight": randn(table[resolution], 3, 1, 1), "convs.0.1.bias": randn(table[resolution])}
    res, i = resolution, 1
    while res > 4:
        cin, cout = table[res], table[res // 2]
        sd[f"convs.{i}.conv1.0.weight"] = randn(cin, cin, 3, 3)
        sd[f"convs.{i}.conv1.1.bias"] = randn(cin)
        sd[f"convs.{i}.conv2.0.kernel"] = kernel.clone()
        sd[f"convs.{i}.conv2.1.weight"] = randn(cout, cin, 3, 3)
        sd[f"convs.{i}.conv2.2.bias"] = randn(cout)
        sd[f"convs.{i}.skip.0.kernel"] = kernel.clone()
        sd[f"convs.{i}.skip.1.weight"] = randn(cout, cin, 1, 1)
        res, i = res // 2, i + 1
    c4 = table[4]
    sd["final_conv.0.weight"] = randn(c4, c4 + 1, 3, 3)
    sd["final_conv.1.bias"] = randn(c4)
    sd["final_linear.0.weight"] = randn(c4, c4 * 16)
    sd["final_linear.0.bias"] = randn(c4)
    sd["final_linear.1.weight"] = randn(1, c4)
    sd["final_linear.1.bias"] = randn(1)
    return sd


def rosinality_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Forward pass of rosinality's Discriminator written from its formulas with plain ops."""

    def blur(h, kernel, pad):
        c = h.shape[1]
        h = F.pad(h, [pad, pad, pad, pad])
        return F.conv2d(h, kernel.flip(0, 1).expand(c, 1, 4, 4), groups=c)

    def conv(h, w, bias=None, stride=1, padding=0):
        h = F.conv2d(h, w / math.sqrt(w[0].numel()), stride=stride, padding=padding)
        if bias is None:
            return h
        return F.leaky_relu(h + bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    h = conv(x, sd["convs.0.0.weight"], sd["convs.0.1.bias"])
    i = 1
    while f"convs.{i}.conv1.0.weight" in sd:
        p = f"convs.{i}"
        out = conv(h, sd[f"{p}.conv1.0.weight"], sd[f"{p}.conv1.1.bias"], padding=1)
        out = conv(blur(out, sd[f"{p}.conv2.0.kernel"], 2), sd[f"{p}.conv2.1.weight"], sd[f"{p}.conv2.2.bias"], stride=2)
        skip = conv(blur(h, sd[f"{p}.skip.0.kernel"], 1), sd[f"{p}.skip.1.weight"], stride=2)
        h = (out + skip) / math.sqrt(2)
        i += 1

    n, c, hh, ww = h.shape
    group = min(n, 4)
    std = h.view(group, -1, 1, c, hh, ww)
    std = torch.sqrt(std.var(0, unbiased=False) + 1e-8)
    std = std.mean([2, 3, 4], keepdim=True).squeeze(2).repeat(group, 1, hh, ww)
    h = torch.cat([h, std], 1)

    h = conv(h, sd["final_conv.0.weight"], sd["final_conv.1.bias"], padding=1).view(n, -1)
    w0, w1 = sd["final_linear.0.weight"], sd["final_linear.1.weight"]
    h = F.leaky_relu(F.linear(h, w0 / math.sqrt(w0.shape[1])) + sd["final_linear.0.bias"], 0.2) * math.sqrt(2)
    return F.linear(h, w1 / math.sqrt(w1.shape[1]), sd["final_linear.1.bias"]).squeeze(1)


def nvidia_state_dict(table=TABLE, resolution=RES, seed=1) -> dict:
    """Random tensors named like stylegan2-ada-pytorch's resnet Discriminator.state_dict()."""
    g = torch.Generator().manual_seed(seed)
    filt = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64
    sd = {}

    res = resolution
    while res > 4:
        cin, cout = table[res], table[res // 2]
        b = f"b{res}"
        if res == resolution:
            sd[f"{b}.fromrgb.weight"] = torch.randn(cin, 3, 1, 1, generator=g)
            sd[f"{b}.fromrgb.bias"] = torch.randn(cin, generator=g)
            sd[f"{b}.fromrgb.resample_filter"] = filt.clone()
        sd[f"{b}.resample_filter"] = filt.clone()
        sd[f"{b}.conv0.weight"] = torch.randn(cin, cin, 3, 3, generator=g)
        sd[f"{b}.conv0.bias"] = torch.randn(cin, generator=g)
        sd[f"{b}.conv0.resample_filter"] = filt.clone()
        sd[f"{b}.conv1.weight"] = torch.randn(cout, cin, 3, 3, generator=g)
        sd[f"{b}.conv1.bias"] = torch.randn(cout, generator=g)
        sd[f"{b}.conv1.resample_filter"] = filt.clone()
        sd[f"{b}.skip.weight"] = torch.randn(cout, cin, 1, 1, generator=g)
        sd[f"{b}.skip.resample_filter"] = filt.clone()
        res //= 2

    c4 = table[4]
    sd["b4.conv.weight"] = torch.randn(c4, c4 + 1, 3, 3, generator=g)
    sd["b4.conv.bias"] = torch.randn(c4, generator=g)
    sd["b4.conv.resample_filter"] = filt.clone()
    sd["b4.fc.weight"] = torch.randn(c4, c4 * 16, generator=g)
    sd["b4.fc.bias"] = torch.randn(c4, generator=g)
    sd["b4.out.weight"] = torch.randn(1, c4, generator=g)
    sd["b4.out.bias"] = torch.randn(1, generator=g)
    return sd


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def images(n=8, res=RES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, res, res, generator=g) * 2 - 1


# --- architecture ---------------------------------------------------------------------------


def test_channel_table_doubles_and_caps():
    assert channel_table(32, 16, 32) == TABLE
    assert channel_table(256, 128, 512) == {256: 128, 128: 256, 64: 512, 32: 512, 16: 512, 8: 512, 4: 512}


def test_stylegan2_config_matches_rosinality_table():
    # rosinality's table for channel_multiplier m: {4..32: 512, 64: 256m, 128: 128m, 256: 64m, ...}
    for m in (1, 2):
        rosinality = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * m, 128: 128 * m, 256: 64 * m, 512: 32 * m}
        cfg = stylegan2_config(512, m)
        table = channel_table(512, cfg.channels, cfg.max_channels)
        assert table == rosinality
        assert cfg.equalized_lr
        assert cfg.mbstd_group == 4


@pytest.mark.parametrize("mode", ["pixel", "noisy"])
def test_resnet_output_shape(mode):
    D = build_discriminator(tiny_cfg(mode=mode), RES)
    t = torch.randint(0, 1000, (5,)) if mode == "noisy" else None
    out = D(images(5), t)  # 5 is not a multiple of the group size 4
    assert out.shape == (5,)
    assert torch.isfinite(out).all()
    assert D.noise_aware == (mode == "noisy")


def test_every_disc_lacks_batchnorm():
    models = [
        build_discriminator(tiny_cfg(), RES),
        build_discriminator(tiny_cfg(mode="noisy"), RES),
        build_discriminator(tiny_cfg(arch="unet", head_channels=8), 16, unet=tiny_unet()),
    ]
    for model in models:
        kinds = [type(m).__name__ for m in model.modules()]
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), kinds
        assert not any("BatchNorm" in k for k in kinds)


def test_bad_input_shape_rejected():
    D = build_discriminator(tiny_cfg(), RES)
    with pytest.raises(DiscriminatorError, match=r"\[N, 3, 32, 32\]"):
        D(images(2, res=16))


def test_timesteps_required_when_noisy():
    noisy = build_discriminator(tiny_cfg(mode="noisy"), RES)
    pixel = build_discriminator(tiny_cfg(), RES)
    with pytest.raises(DiscriminatorError, match="needs timesteps"):
        noisy(images(2))
    with pytest.raises(DiscriminatorError, match="not noise-aware"):
        pixel(images(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DiscriminatorError, match=r"shape \[2\]"):
        noisy(images(2), torch.zeros(3, dtype=torch.long))


def test_invalid_t_cond_rejected():
    with pytest.raises(DiscriminatorError, match="disc.t_cond"):
        build_discriminator(tiny_cfg(mode="noisy", t_cond="proj,typo"), RES)


def test_invalid_arch_rejected():
    with pytest.raises(DiscriminatorError, match="disc.arch"):
        build_discriminator(tiny_cfg(arch="vit"), RES)


@pytest.mark.parametrize("t_cond", ["proj", "film", "proj,film"])
def test_t_cond_zero_init_is_identity(t_cond):
    torch.manual_seed(0)
    noisy = build_discriminator(tiny_cfg(mode="noisy", t_cond=t_cond), RES)
    pixel = build_discriminator(tiny_cfg(), RES)
    backbone = {k: v for k, v in noisy.state_dict().items() if not k.startswith("t_")}
    pixel.load_state_dict(backbone)
    x = images(8)
    reference = pixel(x)
    for t in (0, 1, 500, 999):
        out = noisy(x, torch.full((8,), t, dtype=torch.long))
        assert torch.equal(out, reference), t
    out = noisy(x, torch.randint(0, 1000, (8,)))
    assert torch.equal(out, reference)


def test_t_cond_reacts_once_trained():
    torch.manual_seed(0)
    noisy = build_discriminator(tiny_cfg(mode="noisy"), RES)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.startswith(("t_proj", "t_film")):
                p.normal_(0, 0.1)
    x = images(4)
    a = noisy(x, torch.zeros(4, dtype=torch.long))
    b = noisy(x, torch.full((4,), 900, dtype=torch.long))
    assert not torch.allclose(a, b)


def test_t_cond_gets_gradient_at_init():
    noisy = build_discriminator(tiny_cfg(mode="noisy"), RES)
    noisy(images(4), torch.randint(0, 1000, (4,))).sum().backward()
    assert noisy.t_proj.weight.grad.abs().sum() > 0
    assert noisy.t_film[0].weight.grad.abs().sum() > 0


# --- rosinality layout ----------------------------------------------------------------------


@pytest.mark.parametrize("equalized", [True, False])
def test_rosinality_round_trip(equalized):
    sd = rosinality_state_dict()
    D = ResNetDiscriminator(RES, TABLE, equalized_lr=equalized)
    load_stylegan2_rosinality(D, sd)
    exported = export_stylegan2_rosinality(D)
    assert sorted(exported) == sorted(sd)
    for key in sd:
        assert exported[key].shape == sd[key].shape, key
        assert torch.allclose(exported[key], sd[key], rtol=1e-6, atol=1e-6), key


@pytest.mark.parametrize("equalized", [True, False])
def test_rosinality_forward_matches_reference(equalized):
    sd = rosinality_state_dict()
    D = ResNetDiscriminator(RES, TABLE, equalized_lr=equalized)
    load_stylegan2_rosinality(D, sd)
    x = images(8)  # two groups of 4 for the minibatch std layer
    with torch.no_grad():
        ours = D(x)
        reference = rosinality_reference(sd, x)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4), (ours, reference)


def test_rosinality_pretrained_noisy_matches_reference():
    sd = rosinality_state_dict()
    D = ResNetDiscriminator(RES, TABLE, t_cond=("proj", "film"), t_embed_dim=16)
    load_stylegan2_rosinality(D, sd)
    x = images(4)
    with torch.no_grad():
        out = D(x, torch.tensor([0, 10, 500, 999]))
        reference = rosinality_reference(sd, x)
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_rosinality_key_errors_listed():
    sd = rosinality_state_dict()
    del sd["convs.2.skip.1.weight"]
    del sd["final_linear.0.bias"]
    sd["convs.9.conv1.0.weight"] = torch.zeros(1)
    D = ResNetDiscriminator(RES, TABLE)
    with pytest.raises(DiscriminatorError) as info:
        load_stylegan2_rosinality(D, sd)
    message = str(info.value)
    assert "missing keys" in message
    assert "convs.2.skip.1.weight" in message
    assert "final_linear.0.bias" in message
    assert "unexpected keys" in message
    assert "convs.9.conv1.0.weight" in message


def test_rosinality_shape_mismatch_listed():
    sd = rosinality_state_dict(table={32: 16, 16: 16, 8: 32, 4: 32})
    D = ResNetDiscriminator(RES, TABLE)
    with pytest.raises(DiscriminatorError, match="convs.1.conv2.1.weight"):
        load_stylegan2_rosinality(D, sd)


def test_rosinality_wrong_blur_kernel_rejected():
    sd = rosinality_state_dict()
    sd["convs.1.conv2.0.kernel"] = torch.full((4, 4), 1 / 16)
    with pytest.raises(DiscriminatorError, match="convs.1.conv2.0.kernel"):
        load_stylegan2_rosinality(ResNetDiscriminator(RES, TABLE), sd)


def test_rosinality_channel_table_inferred():
    assert rosinality_channel_table(rosinality_state_dict()) == (RES, TABLE, 3, True)


def test_build_from_rosinality_checkpoint(tmp_path):
    sd = rosinality_state_dict()
    path = tmp_path / "stylegan2.pt"
    # rosinality's train.py also saves its argparse options and the generator.
    torch.save({"d": sd, "g": {"w": torch.zeros(1)}, "args": argparse.Namespace(size=RES)}, path)
    cfg = tiny_cfg(channels=64, max_channels=64, pretrained=str(path), mode="noisy")
    D = build_discriminator(cfg, RES)
    assert D.channels == TABLE  # taken from the checkpoint, not from disc.channels
    x = images(4)
    with torch.no_grad():
        out = D(x, torch.randint(0, 1000, (4,)))
    assert torch.allclose(out, rosinality_reference(sd, x), rtol=1e-4, atol=1e-4)


def test_build_rejects_wrong_resolution(tmp_path):
    path = tmp_path / "d.pt"
    torch.save(rosinality_state_dict(), path)
    with pytest.raises(DiscriminatorError, match="32px"):
        build_discriminator(tiny_cfg(pretrained=str(path)), 64)


def test_build_rejects_mbstd_mismatch(tmp_path):
    path = tmp_path / "d.pt"
    torch.save(rosinality_state_dict(), path)
    with pytest.raises(DiscriminatorError, match="disc.mbstd_group"):
        build_discriminator(tiny_cfg(pretrained=str(path), mbstd_group=0), RES)


def test_pickle_needs_allow_flag(tmp_path):
    path = tmp_path / "d.pkl"
    with open(path, "wb") as f:
        pickle.dump(rosinality_state_dict(), f)
    D = ResNetDiscriminator(RES, TABLE)
    with pytest.raises(DiscriminatorError, match="disc.allow_pickle: true"):
        load_pretrained_disc(D, path)
    load_pretrained_disc(D, path, allow_pickle=True)
    assert torch.equal(export_stylegan2_rosinality(D)["final_linear.1.bias"], rosinality_state_dict()["final_linear.1.bias"])


def test_missing_checkpoint_named(tmp_path):
    with pytest.raises(DiscriminatorError, match="not found"):
        read_disc_state_dict(tmp_path / "absent.pt")


def test_checkpoint_without_state_dict_rejected(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"step": 3}, path)
    with pytest.raises(DiscriminatorError, match="expected a discriminator state dict"):
        read_disc_state_dict(path)


def test_native_pixel_checkpoint_starts_noisy(tmp_path):
    pixel = build_discriminator(tiny_cfg(), RES)
    path = tmp_path / "pixel.pt"
    torch.save({"disc": pixel.state_dict()}, path)
    noisy = build_discriminator(tiny_cfg(mode="noisy", pretrained=str(path)), RES)
    x = images(4)
    with torch.no_grad():
        assert torch.equal(noisy(x, torch.randint(0, 1000, (4,))), pixel(x))

    # A noisy checkpoint in a pixel D would lose its conditioning weights, so it raises.
    path2 = tmp_path / "noisy.pt"
    torch.save(noisy.state_dict(), path2)
    with pytest.raises(DiscriminatorError, match="unexpected keys.*t_mlp"):
        build_discriminator(tiny_cfg(pretrained=str(path2)), RES)


# --- NVIDIA layout --------------------------------------------------------------------------


def test_nvidia_names_map_to_rosinality():
    nv = nvidia_state_dict()
    ros = nvidia_to_rosinality(nv)
    assert sorted(ros) == sorted(rosinality_state_dict())
    assert torch.equal(ros["convs.0.0.weight"], nv["b32.fromrgb.weight"])
    assert torch.equal(ros["convs.0.1.bias"], nv["b32.fromrgb.bias"])
    assert torch.equal(ros["convs.1.conv1.0.weight"], nv["b32.conv0.weight"])
    assert torch.equal(ros["convs.1.conv1.1.bias"], nv["b32.conv0.bias"])
    assert torch.equal(ros["convs.2.conv2.1.weight"], nv["b16.conv1.weight"])
    assert torch.equal(ros["convs.2.conv2.2.bias"], nv["b16.conv1.bias"])
    assert torch.equal(ros["convs.3.skip.1.weight"], nv["b8.skip.weight"])
    assert torch.equal(ros["final_conv.0.weight"], nv["b4.conv.weight"])
    assert torch.equal(ros["final_conv.1.bias"], nv["b4.conv.bias"])
    assert torch.equal(ros["final_linear.0.weight"], nv["b4.fc.weight"])
    assert torch.equal(ros["final_linear.0.bias"], nv["b4.fc.bias"])
    assert torch.equal(ros["final_linear.1.weight"], nv["b4.out.weight"])
    assert torch.equal(ros["final_linear.1.bias"], nv["b4.out.bias"])
    D = ResNetDiscriminator(RES, TABLE)
    load_stylegan2_rosinality(D, ros)


def test_nvidia_conditional_rejected():
    nv = nvidia_state_dict()
    nv["mapping.embed.weight"] = torch.zeros(4, 2)
    with pytest.raises(DiscriminatorError, match="class-conditional"):
        nvidia_to_rosinality(nv)


def test_nvidia_orig_architecture_rejected():
    nv = {k: v for k, v in nvidia_state_dict().items() if ".skip." not in k}
    with pytest.raises(DiscriminatorError, match="resnet"):
        nvidia_to_rosinality(nv)


def _nvidia_like_module(sd: dict) -> nn.Module:
    """A plain module tree whose state_dict() has exactly the keys of `sd`."""
    root = nn.Module()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        if leaf == "resample_filter":
            node.register_buffer(leaf, value)
        else:
            node.register_parameter(leaf, nn.Parameter(value))
    return root


def test_nvidia_tool_requires_allow_pickle(tmp_path, capsys):
    path = tmp_path / "network.pkl"
    with open(path, "wb") as f:
        pickle.dump({"D": _nvidia_like_module(nvidia_state_dict())}, f)
    with pytest.raises(SystemExit) as info:
        convert_stylegan2_nvidia.main([str(path), str(tmp_path / "d.pt")])
    assert info.value.code == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "d.pt").exists()


def test_nvidia_tool_output_loads(tmp_path):
    nv = nvidia_state_dict()
    path = tmp_path / "network.pkl"
    with open(path, "wb") as f:
        pickle.dump({"D": _nvidia_like_module(nv)}, f)
    out = tmp_path / "d.pt"
    assert convert_stylegan2_nvidia.main([str(path), str(out), "--allow-pickle"]) == 0
    D = ResNetDiscriminator(RES, TABLE)
    load_pretrained_disc(D, out)
    assert torch.allclose(export_stylegan2_rosinality(D)["final_linear.0.weight"], nv["b4.fc.weight"], atol=1e-6)

    # The same pickle read directly by the loader, behind disc.allow_pickle.
    D2 = ResNetDiscriminator(RES, TABLE)
    load_pretrained_disc(D2, path, allow_pickle=True)
    x = images(4)
    with torch.no_grad():
        assert torch.equal(D(x), D2(x))


# --- U-Net discriminator --------------------------------------------------------------------


def test_unet_disc_gradients_reach_input_only():
    unet = tiny_unet()
    D = build_discriminator(tiny_cfg(arch="unet", head_channels=8), 16, unet=unet)
    assert isinstance(D, UNetDiscriminator)
    assert D.noise_aware
    x = images(2, res=16).requires_grad_(True)
    D(x, torch.tensor([5, 700])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in D.unet.parameters())
    assert all(not p.requires_grad for p in D.unet.parameters())
    assert all(p.grad is not None for p in D.heads.parameters())
    # The caller's U-Net (the generator) is copied, not frozen.
    assert all(p.requires_grad for p in unet.parameters())


def test_unet_disc_depends_on_t():
    D = build_discriminator(tiny_cfg(arch="unet", head_channels=8), 16, unet=tiny_unet())
    x = images(2, res=16)
    with torch.no_grad():
        a = D(x, torch.tensor([0, 0]))
        b = D(x, torch.tensor([900, 900]))
        c = D(x)  # None means t = 0
    assert not torch.allclose(a, b)
    assert torch.equal(a, c)


def test_unet_disc_stays_eval_in_train_mode():
    D = build_discriminator(tiny_cfg(arch="unet", head_channels=8), 16, unet=tiny_unet())
    D.train()
    assert D.training
    assert not D.unet.training


def test_unet_disc_r1_double_backward():
    D = build_discriminator(tiny_cfg(arch="unet", head_channels=8), 16, unet=tiny_unet())
    penalty = r1_penalty(D, images(2, res=16), torch.tensor([10, 400]), gamma=1.0)
    penalty.backward()
    assert penalty.item() > 0
    assert D.heads[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in D.unet.parameters())


def test_unet_disc_needs_unet():
    with pytest.raises(DiscriminatorError, match="unet=model"):
        build_discriminator(tiny_cfg(arch="unet"), 16)


def test_unet_disc_rejects_stylegan_checkpoint(tmp_path):
    path = tmp_path / "d.pt"
    torch.save(rosinality_state_dict(), path)
    with pytest.raises(DiscriminatorError, match="disc.arch: resnet"):
        build_discriminator(tiny_cfg(arch="unet", pretrained=str(path)), 16, unet=tiny_unet())
