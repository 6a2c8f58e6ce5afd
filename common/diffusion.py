"""Noise schedule maths and the DDPM/DDIM sampling loop.

The update rules come from diffusers' `DDPMScheduler` and `DDIMScheduler`; this
module adds what the stages need around them:

- per-sample noise: sample i draws its initial noise and every step's noise from
  generators seeded by (seeds[i], step), so an image does not depend on the batch
  size, on its position in the batch, or on the number of processes;
- gradients through the chain, optionally truncated to the last K steps, with one
  `torch.utils.checkpoint` segment per denoising step so activation memory does not
  grow with the number of steps;
- a guidance hook that corrects the model's prediction at each step (discriminator
  guidance).

All schedule maths runs in float32, also under bf16 autocast.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.utils.checkpoint import checkpoint

# Generators for step noise are seeded with seed * _SEED_STRIDE + step + 1, so the
# streams of different samples and steps never coincide for seeds below 2**40.
_SEED_STRIDE = 1 << 20


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] as float32, shaped [N, 1, 1, ...] to broadcast over a batch of images."""
    out = values.to(device=t.device, dtype=torch.float32)[t.long()]
    return out.reshape(-1, *([1] * (ndim - 1)))


def q_sample(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with a_t = alphas_cumprod[t] (t int64 [N])."""
    a = _gather(alphas_cumprod, t, x0.ndim)
    return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


def predict_x0(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """x0 implied by a model output that is epsilon, v or x0 itself."""
    a = _gather(alphas_cumprod, t, x_t.ndim)
    output, x_t = output.float(), x_t.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def predict_eps(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """epsilon implied by a model output that is epsilon, v or x0."""
    a = _gather(alphas_cumprod, t, x_t.ndim)
    output, x_t = output.float(), x_t.float()
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return (1 - a).sqrt() * x_t + a.sqrt() * output
    if prediction_type == "sample":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def eps_to_output(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction_type: str) -> torch.Tensor:
    """Inverse of `predict_eps`: the model output of the given type that implies `eps`."""
    a = _gather(alphas_cumprod, t, x_t.ndim)
    x_t = x_t.float()
    if prediction_type == "epsilon":
        return eps
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """Regression target of the denoising loss for the scheduler's prediction type."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "sample":
        return x0.float()
    if prediction_type == "v_prediction":
        a = _gather(alphas_cumprod, t, x0.ndim)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def denoising_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard denoising loss: MSE between the U-Net output and its target at a random t.

    `x0` is in [-1, 1] (or latents); t is uniform over the training timesteps.
    """
    n = x0.shape[0]
    num_t = scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (n,), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
    x_t = q_sample(scheduler.alphas_cumprod, x0, t, noise)
    output = unet(x_t.to(x0.dtype), t).sample
    target = training_target(x0, noise, t, scheduler.alphas_cumprod, scheduler.config.prediction_type)
    return torch.nn.functional.mse_loss(output.float(), target)


# --- per-sample noise ------------------------------------------------------------------------


def initial_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """x_T for each sample: torch.randn from a CPU generator seeded with its seed.

    This is the noise `DDIMPipeline` draws with `generator=[torch.Generator().manual_seed(s) ...]`.
    """
    rows = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows).to(device)


def _step_generators(seeds: list[int], step: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s) * _SEED_STRIDE + step + 1) for s in seeds]


def step_noise(seeds: list[int], step: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows = [torch.randn((1, *shape), generator=g) for g in _step_generators(seeds, step)]
    return torch.cat(rows).to(device)


# --- sampler -------------------------------------------------------------------------------

# guidance(x_t, t, eps) -> corrected eps; x_t [N, C, H, W], t int64 [N], eps float32.
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler:
    """DDPM or DDIM sampling over `steps` timesteps of a trained noise schedule.

    `train_scheduler` is the model's training scheduler; the sampling scheduler is
    built from its config so betas, clipping and prediction type match.
    """

    def __init__(self, unet: torch.nn.Module, train_scheduler: DDPMScheduler, kind: str = "ddim",
                 steps: int = 50, eta: float = 0.0, guidance: GuidanceFn | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        if kind == "ddim":
            self.scheduler = DDIMScheduler.from_config(train_scheduler.config)
        elif kind == "ddpm":
            self.scheduler = DDPMScheduler.from_config(train_scheduler.config)
        else:
            raise ValueError(f"unknown sampler {kind!r}; expected ddim or ddpm")
        num_train = train_scheduler.config.num_train_timesteps
        if not 1 <= steps <= num_train:
            raise ValueError(f"sampling steps must be in [1, {num_train}], got {steps}")
        self.scheduler.set_timesteps(steps)
        self.unet = unet
        self.kind = kind
        self.eta = eta
        self.guidance = guidance
        self.autocast_dtype = autocast_dtype
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()
        self.prediction_type = self.scheduler.config.prediction_type
        self.timesteps = [int(t) for t in self.scheduler.timesteps]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def model_output(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """U-Net output at integer timestep t, in float32 (autocast only around the U-Net)."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if self.autocast_dtype is not None and x.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                out = self.unet(x, t_batch).sample
        else:
            out = self.unet(x, t_batch).sample
        out = out.float()
        # A zero-weight hook is skipped entirely, so weight 0 reproduces unguided samples bit for bit.
        if self.guidance is not None and getattr(self.guidance, "weight", 1.0) != 0.0:
            eps = predict_eps(out, x, t_batch, self.alphas_cumprod, self.prediction_type)
            eps = self.guidance(x, t_batch, eps)
            out = eps_to_output(eps, x, t_batch, self.alphas_cumprod, self.prediction_type)
        return out

    def step(self, x: torch.Tensor, index: int, seeds: list[int]) -> torch.Tensor:
        """Run one denoising step x_t -> x_{t-1} (index counts from 0 at the noisiest step)."""
        t = self.timesteps[index]
        out = self.model_output(x, t)
        if self.kind == "ddim":
            noise = None
            if self.eta > 0:
                noise = step_noise(seeds, index, tuple(x.shape[1:]), x.device)
            return self.scheduler.step(out, t, x.float(), eta=self.eta, variance_noise=noise).prev_sample
        # DDPM draws its own noise; a fresh generator per (sample, step) keeps it per-sample
        # and lets a checkpointed step recompute exactly the same noise.
        generators = _step_generators(seeds, index)
        return self.scheduler.step(out, t, x.float(), generator=generators).prev_sample

    def sample(self, seeds: list[int], shape: tuple[int, int, int], device: torch.device,
               grad_steps: int | None = None, use_checkpoint: bool = False, start_index: int = 0,
               x_start: torch.Tensor | None = None, stop_index: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """Run the chain for samples with the given seeds; returns x_0 (or x at `stop_index`).

        grad_steps: None samples without gradients; K keeps gradients through the last K
        steps only (0 < K <= num_steps; the earlier steps run under no_grad). Gradients
        then flow to every parameter the U-Net uses in those steps.
        use_checkpoint: recompute each step's activations in the backward pass.
        x_start/start_index: continue a chain from an intermediate x (default: fresh noise).
        stop_index: stop before this step index and return that x_t.
        """
        if x_start is None:
            x = initial_noise(seeds, shape, device) * self.scheduler.init_noise_sigma
        else:
            x = x_start
        stop = self.num_steps if stop_index is None else stop_index
        first_grad = stop if grad_steps is None else max(start_index, stop - grad_steps)
        indices = range(start_index, stop)
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc="denoising", leave=False)
        for index in indices:
            if index < first_grad:
                with torch.no_grad():
                    x = self.step(x, index, seeds)
            elif use_checkpoint:
                x = checkpoint(self.step, x, index, seeds, use_reentrant=False)
            else:
                x = self.step(x, index, seeds)
        return x
