"""GAN losses, the R1 gradient penalty and DiffAugment.

Logits are raw discriminator outputs [N] (before any sigmoid). Images are [N, C, H, W]
in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

LOSS_KINDS = ("ns", "hinge")


class LossError(ValueError):
    """An invalid loss or augmentation setting. The message names the fix."""


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise LossError(f"disc.loss: invalid value {kind!r}; expected one of {', '.join(LOSS_KINDS)}")


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "ns") -> Tensor:
    """Discriminator loss, the mean over real plus the mean over fake samples.

    ns: softplus(-D(real)) + softplus(D(fake)), the logistic loss of StyleGAN2.
    hinge: relu(1 - D(real)) + relu(1 + D(fake)).
    """
    _check_kind(kind)
    if kind == "ns":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_loss(fake_logits: Tensor, kind: str = "ns") -> Tensor:
    """Generator loss: mean softplus(-D(fake)) (non-saturating) or mean -D(fake) (hinge)."""
    _check_kind(kind)
    if kind == "ns":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


# --- R1 -----------------------------------------------------------------------------------


def r1_penalty(D: Callable[..., Tensor], real_x: Tensor, t: Tensor | None = None,
               gamma: float = 1.0) -> Tensor:
    """Return gamma / 2 * E_n[ ||d D(x_n) / d x_n||^2 ] on real images (Mescheder et al., 2018).

    `D` is called as D(x, t), so a wrapper may apply DiffAugment inside. The gradient
    is built with create_graph=True, so backpropagating the penalty differentiates it
    once more (double backward) into D's parameters. The forward pass runs with
    PyTorch's math attention kernel, because the fused CUDA kernels of
    scaled_dot_product_attention (flash, memory-efficient) lack a double backward,
    which matters for the attention layers of the U-Net discriminator.
    NOTE: the double backward through the U-Net D is tested on CPU only.
    """
    x = real_x.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        logits = D(x, t) if t is not None else D(x)
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return 0.5 * gamma * grad.square().sum(dim=tuple(range(1, grad.ndim))).mean()


def lazy_r1_penalty(D: Callable[..., Tensor], real_x: Tensor, step: int, *, gamma: float,
                    every: int, t: Tensor | None = None) -> Tensor | None:
    """Return the R1 penalty times `every` on steps divisible by `every`, else None.

    This is StyleGAN2's lazy regularisation: evaluating R1 once per `every` D steps
    with the weight scaled by `every` keeps its average strength. `every` <= 0 or
    gamma == 0 disables R1 (always None).
    """
    if every <= 0 or gamma == 0 or step % every:
        return None
    return r1_penalty(D, real_x, t, gamma=gamma) * every


# --- DiffAugment --------------------------------------------------------------------------
# Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS
# 2020. Their default strengths: brightness shift U(-0.5, 0.5), saturation factor
# U(0, 2), contrast factor U(0.5, 1.5), translation up to 1/8 of the side with zero
# fill, and one zeroed square of half the side.

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _uniform(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    # Draw on the generator's device, so one CPU generator serves inputs on any device.
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def _randint(low: int, high: int, shape, generator: torch.Generator, device) -> Tensor:
    return torch.randint(low, high, shape, generator=generator, device=generator.device).to(device)


def augment_color(x: Tensor, generator: torch.Generator) -> Tensor:
    n = x.shape[0]
    x = x + (_uniform((n, 1, 1, 1), generator, x) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform((n, 1, 1, 1), generator, x) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (_uniform((n, 1, 1, 1), generator, x) + 0.5) + mean
    return x


def augment_translation(x: Tensor, generator: torch.Generator, ratio: float = TRANSLATION_RATIO) -> Tensor:
    """Shift every image by integer offsets in [-s, s] per axis, s = round(ratio * side); zero fill."""
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(-sy, sy + 1, (n, 1), generator, x.device)
    dx = _randint(-sx, sx + 1, (n, 1), generator, x.device)
    padded = F.pad(x, [sx, sx, sy, sy])
    rows = torch.arange(h, device=x.device)[None, :] + sy + dy  # [N, H] rows of the padded image
    cols = torch.arange(w, device=x.device)[None, :] + sx + dx  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2)


def augment_cutout(x: Tensor, generator: torch.Generator, ratio: float = CUTOUT_RATIO) -> Tensor:
    """Zero one square of side round(ratio * side) per image.

    The centre is uniform over the image, so the square may be clipped at the border.
    """
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = _randint(0, h + (1 - ch % 2), (n, 1, 1), generator, x.device)
    cx = _randint(0, w + (1 - cw % 2), (n, 1, 1), generator, x.device)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = (rows >= cy - ch // 2) & (rows < cy - ch // 2 + ch) & (cols >= cx - cw // 2) & (cols < cx - cw // 2 + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTATIONS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}


def parse_policy(policy: str) -> list[str]:
    names = [part.strip() for part in policy.split(",") if part.strip()]
    bad = [name for name in names if name not in AUGMENTATIONS]
    if bad:
        raise LossError(
            f"disc.diffaug: unknown augmentation {', '.join(map(repr, bad))} in {policy!r}; "
            f"expected a comma list of {', '.join(AUGMENTATIONS)} (empty disables)"
        )
    return names


def diff_augment(x: Tensor, policy: str, generator: torch.Generator) -> Tensor:
    """Apply the DiffAugment `policy` (comma list, e.g. "color,translation,cutout") to x.

    Apply it to real and fake batches alike before D. Every operation is
    differentiable with respect to x, and all randomness comes from `generator`, so
    a generator with the same seed gives the same output. An empty policy returns x.
    """
    for name in parse_policy(policy):
        x = AUGMENTATIONS[name](x, generator)
    return x
