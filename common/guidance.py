"""Discriminator guidance (Kim et al., "Refining Generative Process with Discriminator
Guidance in Score-based Diffusion Models", ICML 2023).

A noise-aware discriminator D(x_t, t) estimates the probability that x_t lies on the
real-data path. Its log density ratio log(D / (1 - D)) is exactly D's logit, so the
correction needs no log of a probability and cannot hit log(0):

    eps <- eps - w * sqrt(1 - alpha_bar_t) * grad_x logit(x_t, t)

applied only for t in [t_min, t_max) where D is informative. The sampler converts
eps back to the model's prediction type, so epsilon, v and x0 models all work.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import Config, ConfigError
from .diffusion import _gather


class DiscriminatorGuidance:
    """Callable guidance hook for `Sampler(guidance=...)`; counts calls and their time."""

    def __init__(self, disc: torch.nn.Module, alphas_cumprod: torch.Tensor, weight: float,
                 t_range: tuple[int, int]) -> None:
        self.disc = disc.eval().requires_grad_(False)
        self.alphas_cumprod = alphas_cumprod.float()
        self.weight = float(weight)
        self.t_min, self.t_max = int(t_range[0]), int(t_range[1])
        self.source: str | None = None  # path of the discriminator file, recorded with the samples
        self.calls = 0  # discriminator forward + backward passes, one per guided step and batch
        self.seconds = 0.0

    def log_ratio_grad(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x log(D / (1 - D)) = grad_x of D's logit, for a batch [N, C, H, W]."""
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            logits = self.disc(x, t)
            (grad,) = torch.autograd.grad(logits.sum(), x)
        return grad

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.weight == 0.0:
            return eps
        active = (t >= self.t_min) & (t < self.t_max)
        if not bool(active.any()):
            return eps
        start = time.perf_counter()
        grad = self.log_ratio_grad(x_t, t)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        scale = self.weight * (1 - _gather(self.alphas_cumprod, t, x_t.ndim)).sqrt()
        return torch.where(active.view(-1, *([1] * (x_t.ndim - 1))), eps - scale * grad, eps)


def build_guidance(cfg: Config, alphas_cumprod: torch.Tensor, weight: float, device: torch.device,
                   unet=None) -> DiscriminatorGuidance | None:
    """The guidance hook of the `guidance` config block, or None when it is off."""
    if cfg.guidance.disc is None:
        if weight != 0.0 or cfg.guidance.weights:
            raise ConfigError("guidance.weight is set but guidance.disc is not; "
                             "pass guidance.disc=RUN/disc_final.pt from 02_train_disc.py with disc.mode=noisy")
        return None
    from .gan import load_disc_checkpoint

    if not Path(cfg.guidance.disc).is_file():
        raise ConfigError(f"guidance.disc={cfg.guidance.disc}: file not found; pass the disc_final.pt of a "
                         "02_train_disc.py run with disc.mode=noisy")

    disc = load_disc_checkpoint(cfg.guidance.disc, cfg, unet=unet, require_noise_aware=True).to(device)
    guidance = DiscriminatorGuidance(disc, alphas_cumprod, weight, tuple(cfg.guidance.t_range))
    guidance.source = cfg.guidance.disc
    return guidance
