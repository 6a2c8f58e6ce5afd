"""Discriminators for the GAN stages, built from `DiscConfig` by `build_discriminator`.

Every discriminator maps images x [N, C, H, W] (pixels in [-1, 1], or latents) and
diffusion timesteps t (integer tensor [N], 0..999, or None) to logits [N]. The
attribute `noise_aware` is True when the output depends on t.

- `resnet`: the residual discriminator of StyleGAN2 (Karras et al., 2020). It can start
  from a StyleGAN2 checkpoint in the layout of rosinality/stylegan2-pytorch (see
  `load_stylegan2_rosinality`). `stylegan2_config` returns the settings that reproduce
  that model exactly.
- `unet`: small heads on the down-block and mid-block features of a frozen copy of the
  pretrained diffusers `UNet2DModel`, evaluated at timestep t.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from common.config import DiscConfig

# Low-pass filter applied before every stride-2 layer in StyleGAN2 (and in both
# reference implementations). The 2-D kernel is the outer product normalised to sum 1.
BLUR_TAPS = (1, 3, 3, 1)
LRELU_SLOPE = 0.2
# StyleGAN2 multiplies leaky ReLU outputs by sqrt(2) to keep the activation variance
# ("fused_lrelu" in rosinality's code, def_gain of 'lrelu' in NVIDIA's bias_act).
LRELU_GAIN = math.sqrt(2.0)
T_COND_KINDS = ("proj", "film")
# Entries of a checkpoint file that may contain the discriminator's state dict.
STATE_DICT_ENTRIES = ("d", "disc", "state_dict")


class DiscriminatorError(ValueError):
    """An invalid discriminator setting, input or checkpoint. The message names the fix."""


# --- layers --------------------------------------------------------------------------------


def blur_kernel_2d(taps=BLUR_TAPS) -> Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum()


class Blur(nn.Module):
    """Depthwise FIR filter with zero padding (pad_before, pad_after) on both spatial axes.

    Equal to rosinality's `Blur` (upfirdn2d with up = down = 1). The kernel is
    symmetric, so convolution and correlation agree.
    """

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        self.pad = pad
        self.register_buffer("kernel", blur_kernel_2d(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        x = F.pad(x, [self.pad[0], self.pad[1], self.pad[0], self.pad[1]])
        weight = self.kernel.to(x.dtype).expand(channels, 1, *self.kernel.shape)
        return F.conv2d(x, weight, groups=channels)


class ConvLayer(nn.Module):
    """Conv2d with optional blur + stride-2 downsampling, bias and leaky ReLU * sqrt(2).

    With `equalized=True` the weight is stored N(0, 1) and multiplied by
    1/sqrt(fan_in) at run time (equalised learning rate). Otherwise the stored weight
    is the effective weight, initialised N(0, 1/fan_in), so both start as the same
    function and differ only in how an optimizer scales their updates.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, down=False, bias=True,
                 activate=True, equalized=True):
        super().__init__()
        self.fan_in_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.equalized = equalized
        self.runtime_gain = self.fan_in_gain if equalized else 1.0
        weight = torch.randn(out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(weight if equalized else weight * self.fan_in_gain)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.activate = activate
        if down:
            # Padding of rosinality's ConvLayer: the blurred map has H + 1 (3x3) or
            # H - 1 (1x1) pixels, and the unpadded stride-2 conv then gives H / 2.
            total = (len(BLUR_TAPS) - 2) + (kernel_size - 1)
            self.blur = Blur(((total + 1) // 2, total // 2))
            self.stride, self.padding = 2, 0
        else:
            self.blur = None
            self.stride, self.padding = 1, kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.blur is not None:
            x = self.blur(x)
        x = F.conv2d(x, self.weight * self.runtime_gain, stride=self.stride, padding=self.padding)
        if self.bias is not None:
            x = x + self.bias.view(1, -1, 1, 1)
        if self.activate:
            x = F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN
        return x


class LinearLayer(nn.Module):
    """Fully connected layer with the same equalised-lr option and activation as ConvLayer."""

    def __init__(self, in_features, out_features, *, activate=True, equalized=True):
        super().__init__()
        self.fan_in_gain = 1.0 / math.sqrt(in_features)
        self.equalized = equalized
        self.runtime_gain = self.fan_in_gain if equalized else 1.0
        weight = torch.randn(out_features, in_features)
        self.weight = nn.Parameter(weight if equalized else weight * self.fan_in_gain)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.runtime_gain, self.bias)
        if self.activate:
            x = F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN
        return x


class ResBlock(nn.Module):
    """conv 3x3, conv 3x3 with downsampling, plus a 1x1 downsampling skip; sum / sqrt(2)."""

    def __init__(self, in_channels, out_channels, equalized):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, equalized=equalized)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, down=True, equalized=equalized)
        self.skip = ConvLayer(in_channels, out_channels, 1, down=True, bias=False,
                              activate=False, equalized=equalized)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2.0)


def minibatch_stddev(x: Tensor, group_size: int) -> Tensor:
    """Append one channel: the feature standard deviation within groups of samples.

    Sample n belongs to group n mod (N / G), as in both StyleGAN2 reference
    implementations. G is the largest divisor of N that is at most `group_size`, so
    any batch size works. NVIDIA's and rosinality's code instead require G to divide N.
    """
    n, c, h, w = x.shape
    group = min(group_size, n)
    while n % group:
        group -= 1
    y = x.reshape(group, -1, c, h, w)
    y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8)  # [N/G, C, H, W]
    y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
    y = y.repeat(group, 1, h, w)
    return torch.cat([x, y], dim=1)


# --- resnet discriminator ------------------------------------------------------------------


def _check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise DiscriminatorError(
            f"discriminator resolution must be a power of two >= 8, got {resolution}; "
            "set data.resolution accordingly"
        )


def channel_table(resolution: int, channels: int, max_channels: int) -> dict[int, int]:
    """Map each resolution (full .. 4) to its width: `channels` at full resolution,
    doubling each time the resolution halves, capped at `max_channels`."""
    _check_resolution(resolution)
    if channels < 1 or max_channels < 1:
        raise DiscriminatorError(
            f"disc.channels and disc.max_channels must be positive, got {channels} and {max_channels}"
        )
    table = {}
    res = resolution
    while res >= 4:
        table[res] = min(channels * (resolution // res), max_channels)
        res //= 2
    return table


def stylegan2_config(resolution: int, channel_multiplier: int = 2,
                     base: DiscConfig | None = None) -> DiscConfig:
    """Return a DiscConfig whose resnet has exactly the layout of rosinality's Discriminator.

    rosinality's channel table is {4..32: 512, 64: 256 m, 128: 128 m, 256: 64 m, ...}
    for channel multiplier m, which equals min(512, 16384 m / res): the full-resolution
    width doubling at each halving, capped at 512. Minibatch std uses groups of 4 and
    one feature channel, and layers use equalised learning rate.
    """
    _check_resolution(resolution)
    base = base or DiscConfig()
    return dataclasses.replace(
        base,
        arch="resnet",
        channels=min(512, 16384 * channel_multiplier // resolution),
        max_channels=512,
        mbstd_group=4,
        equalized_lr=True,
    )


def parse_t_cond(text: str) -> tuple[str, ...]:
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [kind for kind in kinds if kind not in T_COND_KINDS]
    if bad or not kinds:
        raise DiscriminatorError(
            f"disc.t_cond: invalid value {text!r}; expected a comma list of {', '.join(T_COND_KINDS)}"
        )
    return kinds


def _check_timesteps(t, batch: int, device) -> Tensor:
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise DiscriminatorError(
            f"timesteps t must have shape [{batch}] (one per image), got {tuple(t.shape)}"
        )
    return t


class ResNetDiscriminator(nn.Module):
    """StyleGAN2 residual discriminator with optional timestep conditioning.

    `channels` maps every resolution from `resolution` down to 4 to its width (see
    `channel_table`). With `t_cond` non-empty the discriminator is noise-aware: a
    sinusoidal embedding of t goes through an MLP, then
    - "proj" adds <W e(t), features> / sqrt(C4) to the logit, with `features` the
      output of the fc layer [N, C4] (the projection discriminator of Miyato and
      Koyama, 2018, as used for labels in StyleGAN2-ADA);
    - "film" scales and shifts the output of every residual block by (1 + s(t), b(t)).
    The last layer of each conditioning branch is zero-initialised, so at step 0 the
    output is the unconditional one for every t (and equals a pretrained
    unconditional D loaded into the backbone).
    """

    def __init__(self, resolution: int, channels: Mapping[int, int], *, in_channels: int = 3,
                 mbstd_group: int = 4, equalized_lr: bool = False, t_cond: tuple[str, ...] = (),
                 t_embed_dim: int = 128):
        super().__init__()
        _check_resolution(resolution)
        expected = sorted(channel_table(resolution, 1, 1))
        if sorted(channels) != expected:
            raise DiscriminatorError(
                f"channel table must have the resolutions {expected}, got {sorted(channels)}"
            )
        if mbstd_group < 0:
            raise DiscriminatorError(f"disc.mbstd_group must be >= 0 (0 disables), got {mbstd_group}")
        self.resolution = resolution
        self.channels = dict(channels)
        self.in_channels = in_channels
        self.mbstd_group = mbstd_group
        self.equalized_lr = equalized_lr
        self.t_cond = tuple(t_cond)
        self.noise_aware = bool(self.t_cond)
        eq = equalized_lr

        self.from_rgb = ConvLayer(in_channels, channels[resolution], 1, equalized=eq)
        self.blocks = nn.ModuleList()
        res = resolution
        while res > 4:
            self.blocks.append(ResBlock(channels[res], channels[res // 2], eq))
            res //= 2
        c4 = channels[4]
        mbstd_channels = 1 if mbstd_group > 0 else 0
        self.conv = ConvLayer(c4 + mbstd_channels, c4, 3, equalized=eq)
        self.fc = LinearLayer(c4 * 4 * 4, c4, equalized=eq)
        self.out = LinearLayer(c4, 1, activate=False, equalized=eq)

        # Every conditioning parameter name starts with "t_": the checkpoint loaders
        # keep these at their (zero) initialisation when a checkpoint lacks them.
        self.t_embed_dim = t_embed_dim
        if self.t_cond:
            self.t_mlp = nn.Sequential(
                nn.Linear(t_embed_dim, t_embed_dim), nn.SiLU(),
                nn.Linear(t_embed_dim, t_embed_dim), nn.SiLU(),
            )
        if "proj" in self.t_cond:
            self.t_proj = _zero_linear(t_embed_dim, c4)
        if "film" in self.t_cond:
            self.t_film = nn.ModuleList(
                _zero_linear(t_embed_dim, 2 * block.conv2.weight.shape[0]) for block in self.blocks
            )

    def _embed(self, t, batch: int, device) -> Tensor | None:
        if not self.noise_aware:
            if t is not None:
                raise DiscriminatorError(
                    "this discriminator is not noise-aware (disc.mode: pixel) but got timesteps t; "
                    "pass t=None or build it with disc.mode: noisy"
                )
            return None
        if t is None:
            raise DiscriminatorError("this noise-aware discriminator (disc.mode: noisy) needs timesteps t")
        t = _check_timesteps(t, batch, device)
        emb = get_timestep_embedding(t, self.t_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.t_mlp(emb)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise DiscriminatorError(
                f"discriminator input must have shape [N, {', '.join(map(str, expected))}], "
                f"got {tuple(x.shape)}"
            )
        emb = self._embed(t, x.shape[0], x.device)

        h = self.from_rgb(x)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if "film" in self.t_cond:
                scale, shift = self.t_film[i](emb).chunk(2, dim=1)
                h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]

        if self.mbstd_group > 0:
            h = minibatch_stddev(h, self.mbstd_group)
        h = self.conv(h)
        features = self.fc(h.flatten(1))
        logits = self.out(features).squeeze(1)
        if "proj" in self.t_cond:
            logits = logits + (self.t_proj(emb) * features).sum(dim=1) / math.sqrt(features.shape[1])
        return logits


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# --- rosinality layout ---------------------------------------------------------------------


def _rosinality_names(model: ResNetDiscriminator) -> dict[str, str]:
    """Map our parameter names to the keys of rosinality's `Discriminator.state_dict()`.

    rosinality's ConvLayer is an nn.Sequential of [Blur (downsampling only),
    EqualConv2d, FusedLeakyReLU]: the conv weight sits at index 0 (or 1 after a Blur)
    and the bias of an activated layer belongs to the FusedLeakyReLU that follows.
    """
    names = {"from_rgb.weight": "convs.0.0.weight", "from_rgb.bias": "convs.0.1.bias"}
    for i in range(len(model.blocks)):
        ours, theirs = f"blocks.{i}", f"convs.{i + 1}"
        names[f"{ours}.conv1.weight"] = f"{theirs}.conv1.0.weight"
        names[f"{ours}.conv1.bias"] = f"{theirs}.conv1.1.bias"
        names[f"{ours}.conv2.weight"] = f"{theirs}.conv2.1.weight"
        names[f"{ours}.conv2.bias"] = f"{theirs}.conv2.2.bias"
        names[f"{ours}.skip.weight"] = f"{theirs}.skip.1.weight"
    names.update({
        "conv.weight": "final_conv.0.weight",
        "conv.bias": "final_conv.1.bias",
        "fc.weight": "final_linear.0.weight",
        "fc.bias": "final_linear.0.bias",
        "out.weight": "final_linear.1.weight",
        "out.bias": "final_linear.1.bias",
    })
    return names


def _rosinality_blur_keys(num_blocks: int) -> list[str]:
    """Keys of the persistent blur-kernel buffers [4, 4] in rosinality's state dict."""
    keys = []
    for i in range(1, num_blocks + 1):
        keys += [f"convs.{i}.conv2.0.kernel", f"convs.{i}.skip.0.kernel"]
    return keys


def is_rosinality_layout(state_dict: Mapping[str, Tensor]) -> bool:
    return "convs.0.0.weight" in state_dict and "final_linear.1.weight" in state_dict


def _format_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:20])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")


def _gain_of(module: nn.Module) -> float:
    """Factor from a rosinality (equalised, N(0, 1)) weight to our stored weight."""
    return 1.0 if module.equalized else module.fan_in_gain


def load_stylegan2_rosinality(model: ResNetDiscriminator, state_dict: Mapping[str, Tensor]) -> None:
    """Copy a rosinality/stylegan2-pytorch `Discriminator` state dict into `model`.

    The checkpoint must have exactly the keys of our layout. Missing, unexpected or
    wrongly shaped entries raise DiscriminatorError listing all of them. The blur
    kernel buffers are optional but must contain the [1, 3, 3, 1] kernel. Timestep
    conditioning parameters ("t_*") are absent from such checkpoints and keep their
    zero initialisation.
    """
    if not isinstance(model, ResNetDiscriminator):
        raise DiscriminatorError(
            f"a StyleGAN2 checkpoint fits only disc.arch: resnet, not {type(model).__name__}"
        )
    names = _rosinality_names(model)
    blur_keys = set(_rosinality_blur_keys(len(model.blocks)))
    expected = set(names.values())
    missing = expected - set(state_dict)
    unexpected = set(state_dict) - expected - blur_keys
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise DiscriminatorError(
            f"StyleGAN2 (rosinality) discriminator state dict does not match a "
            f"{model.resolution}px resnet discriminator; " + "; ".join(parts)
        )

    reference = blur_kernel_2d()
    for key in blur_keys & set(state_dict):
        kernel = state_dict[key].detach().float().cpu()
        if kernel.shape != reference.shape or not torch.allclose(kernel, reference):
            raise DiscriminatorError(
                f"{key}: only the blur kernel [1, 3, 3, 1] is supported, got {kernel.tolist()}"
            )

    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    mismatched = [
        f"{theirs} {tuple(state_dict[theirs].shape)} vs {tuple(params[ours].shape)}"
        for ours, theirs in names.items()
        if tuple(state_dict[theirs].shape) != tuple(params[ours].shape)
    ]
    if mismatched:
        raise DiscriminatorError(
            "StyleGAN2 (rosinality) discriminator shapes do not match (checkpoint vs model): "
            + "; ".join(mismatched)
            + ". Build the model with the checkpoint's channel table (see rosinality_channel_table)"
        )
    with torch.no_grad():
        for ours, theirs in names.items():
            module_name, kind = ours.rsplit(".", 1)
            value = state_dict[theirs].to(params[ours].dtype)
            if kind == "weight":
                value = value * _gain_of(modules[module_name])
            params[ours].copy_(value)


def export_stylegan2_rosinality(model: ResNetDiscriminator) -> dict[str, Tensor]:
    """Return the model's backbone as a rosinality `Discriminator` state dict (the inverse
    of `load_stylegan2_rosinality`, blur kernels included, conditioning left out)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = {}
    for ours, theirs in _rosinality_names(model).items():
        module_name, kind = ours.rsplit(".", 1)
        value = params[ours].detach().clone()
        if kind == "weight":
            value = value / _gain_of(modules[module_name])
        out[theirs] = value
    for key in _rosinality_blur_keys(len(model.blocks)):
        out[key] = blur_kernel_2d()
    return out


def rosinality_channel_table(state_dict: Mapping[str, Tensor]) -> tuple[int, dict[int, int], int, bool]:
    """Read (resolution, channel table, input channels, has minibatch std) from the shapes
    of a rosinality discriminator state dict."""
    try:
        first = state_dict["convs.0.0.weight"]
        num_blocks = len({k.split(".")[1] for k in state_dict if re.match(r"convs\.\d+\.conv1\.", k)})
        resolution = 4 * 2**num_blocks
        table = {}
        res = resolution
        for i in range(1, num_blocks + 1):
            table[res] = state_dict[f"convs.{i}.conv1.0.weight"].shape[0]
            res //= 2
        final = state_dict["final_conv.0.weight"]
    except KeyError as error:
        raise DiscriminatorError(f"StyleGAN2 (rosinality) discriminator state dict lacks the key {error}") from None
    table[4] = final.shape[0]
    has_mbstd = final.shape[1] == final.shape[0] + 1
    return resolution, table, first.shape[1], has_mbstd


def nvidia_to_rosinality(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the state dict of NVIDIA's StyleGAN2(-ADA) `Discriminator` to rosinality's layout.

    NVIDIA's resnet D (stylegan2-ada-pytorch, training/networks.py) has blocks `b{res}`
    for res = R .. 8, each with conv0 (3x3), conv1 (3x3, down 2), skip (1x1, down 2, no
    bias) and, in the first block only, fromrgb (1x1). The epilogue `b4` has mbstd (no
    parameters), conv (3x3), fc and out. Both codes store weights N(0, 1)-scaled with
    the same run-time gains and resample with [1, 3, 3, 1], so values copy unchanged.
    The `resample_filter` buffers are checked and dropped, and the output gains
    rosinality's blur-kernel buffers. Conditional (`mapping.*`) and 'orig' or 'skip'
    architectures raise DiscriminatorError.
    """
    keys = set(state_dict)
    resolutions = sorted({int(m.group(1)) for k in keys if (m := re.match(r"b(\d+)\.", k))}, reverse=True)
    if not resolutions or resolutions[-1] != 4 or len(resolutions) < 2:
        raise DiscriminatorError(
            "not an NVIDIA StyleGAN2 discriminator state dict: expected blocks b{res}.* down to b4, "
            f"found {_format_keys(keys)}"
        )
    size = resolutions[0]
    expected_res = [size // 2**i for i in range(len(resolutions))]
    if resolutions != expected_res:
        raise DiscriminatorError(f"NVIDIA discriminator blocks {resolutions} are not consecutive halvings")

    renames = {
        f"b{size}.fromrgb.weight": "convs.0.0.weight",
        f"b{size}.fromrgb.bias": "convs.0.1.bias",
        "b4.conv.weight": "final_conv.0.weight",
        "b4.conv.bias": "final_conv.1.bias",
        "b4.fc.weight": "final_linear.0.weight",
        "b4.fc.bias": "final_linear.0.bias",
        "b4.out.weight": "final_linear.1.weight",
        "b4.out.bias": "final_linear.1.bias",
    }
    for i, res in enumerate(resolutions[:-1], start=1):
        renames.update({
            f"b{res}.conv0.weight": f"convs.{i}.conv1.0.weight",
            f"b{res}.conv0.bias": f"convs.{i}.conv1.1.bias",
            f"b{res}.conv1.weight": f"convs.{i}.conv2.1.weight",
            f"b{res}.conv1.bias": f"convs.{i}.conv2.2.bias",
            f"b{res}.skip.weight": f"convs.{i}.skip.1.weight",
        })
    filters = {k for k in keys if k.endswith("resample_filter")}
    missing = set(renames) - keys
    unexpected = keys - set(renames) - filters
    if missing or unexpected:
        hint = ""
        if any(k.startswith("mapping.") for k in unexpected):
            hint = " (a class-conditional D is not supported)"
        elif any(".skip." in k for k in missing):
            hint = " (only architecture 'resnet' is supported)"
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise DiscriminatorError(f"NVIDIA discriminator state dict{hint}: " + "; ".join(parts))
    if state_dict["b4.out.weight"].shape[0] != 1:
        raise DiscriminatorError(
            f"b4.out.weight has {state_dict['b4.out.weight'].shape[0]} outputs; "
            "a class-conditional D (cmap_dim > 0) is not supported"
        )
    reference = blur_kernel_2d()
    for key in filters:
        value = state_dict[key].detach().float().cpu()
        if value.shape != reference.shape or not torch.allclose(value, reference):
            raise DiscriminatorError(f"{key}: only the resample filter [1, 3, 3, 1] is supported")

    out = {theirs: state_dict[ours].detach().clone() for ours, theirs in renames.items()}
    for key in _rosinality_blur_keys(len(resolutions) - 1):
        out[key] = reference.clone()
    return out


# --- U-Net feature discriminator -----------------------------------------------------------


class UNetDiscriminator(nn.Module):
    """Logit heads on the down-block and mid-block features of a frozen UNet2DModel.

    The U-Net's time embedding, conv_in, down_blocks and mid_block run at timestep t
    (t=None means t=0, clean images). Its parameters are frozen (requires_grad False,
    kept in eval mode), but the graph still reaches the input x, so generator losses
    and R1 can differentiate with respect to x. Each feature map goes through conv 3x3
    -> leaky ReLU -> conv 1x1 -> spatial mean, and the head logits are summed.

    NOTE: the frozen U-Net is a registered submodule, so `state_dict()` includes its
    weights.
    """

    noise_aware = True

    def __init__(self, unet: UNet2DModel, head_channels: int = 64):
        super().__init__()
        if not isinstance(unet, UNet2DModel):
            raise DiscriminatorError(
                f"disc.arch: unet needs a diffusers UNet2DModel, got {type(unet).__name__}"
            )
        if unet.class_embedding is not None:
            raise DiscriminatorError("disc.arch: unet does not support class-conditional U-Nets")
        self.unet = unet
        self.unet.requires_grad_(False)
        self.unet.eval()
        widths = list(unet.config.block_out_channels)
        if unet.mid_block is not None:
            widths.append(widths[-1])
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, head_channels, 3, padding=1),
                nn.LeakyReLU(LRELU_SLOPE),
                nn.Conv2d(head_channels, 1, 1),
            )
            for width in widths
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()  # dropout of the frozen U-Net stays off
        return self

    def features(self, x: Tensor, t: Tensor | None = None) -> list[Tensor]:
        """Return the output of every down block, then of the mid block (if any)."""
        unet = self.unet
        if x.ndim != 4 or x.shape[1] != unet.config.in_channels:
            raise DiscriminatorError(
                f"discriminator input must have shape [N, {unet.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if t is None:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        t = _check_timesteps(t, x.shape[0], x.device)
        emb = unet.time_embedding(unet.time_proj(t).to(unet.dtype))

        sample = x.to(unet.dtype)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        skip_sample = sample
        sample = unet.conv_in(sample)
        feats = []
        for block in unet.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, _, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
            feats.append(sample)
        if unet.mid_block is not None:
            feats.append(unet.mid_block(sample, emb))
        return feats

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        feats = self.features(x, t)
        logits = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        for head, feat in zip(self.heads, feats):
            logits = logits + head(feat.float()).mean(dim=(1, 2, 3))
        return logits


# --- checkpoints and registry --------------------------------------------------------------


def read_disc_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read a discriminator state dict from a .pt/.pth file or, with allow_pickle, a .pkl.

    A .pt/.pth file is read with torch.load(weights_only=True) and may contain the state
    dict itself or a dict with a "d", "disc" or "state_dict" entry (rosinality's
    training checkpoints keep D under "d"). A .pkl is NVIDIA's network pickle (its "D"
    module is renamed by `nvidia_to_rosinality`) or a pickled state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise DiscriminatorError(f"disc.pretrained: file not found: {path}")
    if path.suffix in (".pkl", ".pickle"):
        if not allow_pickle:
            raise DiscriminatorError(
                f"{path} is a pickle, which can run arbitrary code when read; set "
                "disc.allow_pickle: true only for a file you trust, or convert it with "
                "tools/convert_stylegan2_nvidia.py"
            )
        obj = _read_pickle(path)
    else:
        # rosinality's train.py stores its argparse.Namespace under "args".
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise DiscriminatorError(
                f"{path}: torch.load(weights_only=True) rejected the file ({error}); "
                "save a plain state dict of tensors instead"
            ) from None
    return _extract_state_dict(obj, path)


def _read_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except ModuleNotFoundError as error:
        raise DiscriminatorError(
            f"{path}: unpickling needs the module '{error.name}'; for NVIDIA's network pickles "
            "put the stylegan2-ada-pytorch checkout (torch_utils, dnnlib) on PYTHONPATH"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("D"), nn.Module):
        return nvidia_to_rosinality(obj["D"].state_dict())
    return obj


def _extract_state_dict(obj, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for entry in STATE_DICT_ENTRIES:
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    found = sorted(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
    raise DiscriminatorError(
        f"{path}: expected a discriminator state dict (tensors by name) or a dict with one of the "
        f"entries {', '.join(STATE_DICT_ENTRIES)}; found {found}"
    )


def load_native_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state dict saved from our own discriminator class.

    Timestep conditioning parameters ("t_*") may be absent, so a pixel-mode checkpoint
    can start a noisy-mode model with the conditioning at its zero initialisation.
    Any other missing or unexpected key raises DiscriminatorError listing them.
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("t_")]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys: {_format_keys(result.unexpected_keys)}")
        raise DiscriminatorError(f"discriminator state dict does not match {type(model).__name__}; " + "; ".join(parts))


def load_pretrained_disc(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> None:
    """Load `path` (rosinality or NVIDIA StyleGAN2 D, or our own checkpoint) into `model`."""
    state_dict = read_disc_state_dict(path, allow_pickle)
    try:
        if is_rosinality_layout(state_dict):
            load_stylegan2_rosinality(model, state_dict)
        else:
            load_native_state_dict(model, state_dict)
    except RuntimeError as error:  # shape mismatch in load_state_dict
        raise DiscriminatorError(f"{path}: {error}") from None
    except DiscriminatorError as error:
        raise DiscriminatorError(f"{path}: {error}") from None


def _native_channel_table(state_dict: Mapping[str, Tensor]) -> tuple[int, dict[int, int], int, bool] | None:
    if "from_rgb.weight" not in state_dict or "conv.weight" not in state_dict:
        return None
    num_blocks = len({k.split(".")[1] for k in state_dict if re.match(r"blocks\.\d+\.conv1\.weight", k)})
    resolution = 4 * 2**num_blocks
    table = {}
    res = resolution
    for i in range(num_blocks):
        table[res] = state_dict[f"blocks.{i}.conv1.weight"].shape[0]
        res //= 2
    final = state_dict["conv.weight"]
    table[4] = final.shape[0]
    return resolution, table, state_dict["from_rgb.weight"].shape[1], final.shape[1] == final.shape[0] + 1


def _build_resnet(cfg: DiscConfig, resolution: int, unet, in_channels: int) -> nn.Module:
    t_cond = parse_t_cond(cfg.t_cond) if cfg.mode == "noisy" else ()
    table = channel_table(resolution, cfg.channels, cfg.max_channels)
    state_dict = None
    if cfg.pretrained:
        # The checkpoint's channel table replaces disc.channels and disc.max_channels.
        state_dict = read_disc_state_dict(cfg.pretrained, cfg.allow_pickle)
        if is_rosinality_layout(state_dict):
            shape = rosinality_channel_table(state_dict)
        else:
            shape = _native_channel_table(state_dict)
        if shape is not None:
            ckpt_resolution, table, ckpt_in, has_mbstd = shape
            if (ckpt_resolution, ckpt_in) != (resolution, in_channels):
                raise DiscriminatorError(
                    f"disc.pretrained {cfg.pretrained} is a {ckpt_resolution}px discriminator of "
                    f"{ckpt_in}-channel inputs, but the data is {resolution}px with {in_channels} channels"
                )
            if has_mbstd != (cfg.mbstd_group > 0):
                raise DiscriminatorError(
                    f"disc.pretrained {cfg.pretrained} {'has' if has_mbstd else 'lacks'} a minibatch std "
                    f"layer but disc.mbstd_group is {cfg.mbstd_group}; set it to "
                    f"{'4 (StyleGAN2 default)' if has_mbstd else '0'}"
                )
    model = ResNetDiscriminator(
        resolution, table, in_channels=in_channels, mbstd_group=cfg.mbstd_group,
        equalized_lr=cfg.equalized_lr, t_cond=t_cond, t_embed_dim=cfg.t_embed_dim,
    )
    if state_dict is not None:
        try:
            if is_rosinality_layout(state_dict):
                load_stylegan2_rosinality(model, state_dict)
            else:
                load_native_state_dict(model, state_dict)
        except (DiscriminatorError, RuntimeError) as error:
            raise DiscriminatorError(f"disc.pretrained {cfg.pretrained}: {error}") from None
    return model


def _build_unet(cfg: DiscConfig, resolution: int, unet, in_channels: int) -> nn.Module:
    if unet is None:
        raise DiscriminatorError(
            "disc.arch: unet needs the pretrained UNet2DModel; pass build_discriminator(..., unet=model)"
        )
    # A private frozen copy: the generator's U-Net keeps training, the features do not move.
    model = UNetDiscriminator(copy.deepcopy(unet), head_channels=cfg.head_channels)
    if cfg.pretrained:
        load_pretrained_disc(model, cfg.pretrained, cfg.allow_pickle)
    return model


DISCRIMINATORS = {"resnet": _build_resnet, "unet": _build_unet}


def build_discriminator(cfg: DiscConfig, resolution: int, unet: UNet2DModel | None = None,
                        in_channels: int = 3) -> nn.Module:
    """Build the discriminator of `cfg.arch` for square inputs of side `resolution`.

    With `cfg.pretrained` the weights are loaded from that file (see
    `load_pretrained_disc`). For arch unet, `unet` is the pretrained U-Net, which is
    deep-copied and frozen, so the caller's model is left trainable.
    """
    if cfg.arch not in DISCRIMINATORS:
        raise DiscriminatorError(
            f"disc.arch: invalid value {cfg.arch!r}; expected one of {', '.join(DISCRIMINATORS)}"
        )
    return DISCRIMINATORS[cfg.arch](cfg, resolution, unet, in_channels)
