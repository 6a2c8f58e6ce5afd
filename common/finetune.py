"""Adversarial fine-tuning of a diffusion U-Net (03_adv_finetune.py): what trains,
the generator's gradient paths, LoRA merge and export, and the memory and time probe.

Gradient paths (`adv.mode`):

- `chain`: sample from noise with gradients on and score the final sample (decoded
  for latent models) with the discriminator. `adv.grad_steps` keeps gradients through
  all steps, the last K, or a random K in [1, adv.grad_steps_max] per batch; the
  earlier steps run without gradients. With `adv.checkpointing` every denoising step is
  one non-reentrant `torch.utils.checkpoint` segment, so activation memory does not
  grow with K.
- `steps`: roll out without gradients to x_t at one timestep of `adv.feedback_t`
  (the nearest sampler step), make one U-Net prediction with gradients, and score its
  x0 prediction.

The per-batch choices that must agree across ranks (K and the feedback timestep)
come from a generator seeded with (config seed, step), so they are the same on every
rank and after a resume.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import dist
from .diffusion import Sampler, denoising_loss, predict_x0
from .losses import g_loss
from .rundir import capture_rng, restore_rng

TRAINABLE_KINDS = ("output_blocks", "patterns", "lora")
LORA_KEYS = ("rank", "alpha", "target_modules")
# Attention projections of diffusers' Attention blocks, the usual LoRA targets of
# diffusers' own training scripts.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Initial-noise seeds of training rollouts start at (stream + 1 + 2 * (seed % 1000)) * 2**32,
# far from the evaluation seeds sample.seed + i. Stream 0 is the generator step, 1 the
# discriminator's fakes. The largest seed stays below 2**43, which the per-step noise
# generators of common.diffusion need (seed * 2**20 + step fits in 64 bits).
SEED_BLOCK = 1 << 32
GIB = 2**30


class FinetuneError(ValueError):
    """An invalid adv.* setting or a run that cannot fit; the message names the key and the fix."""


class MemoryEstimateError(FinetuneError):
    """The probe's memory estimate exceeds adv.max_memory_gb or the device's memory."""


# --- what trains ---------------------------------------------------------------------------


@dataclass
class Trainable:
    """The parameters the fine-tuning updates, and the module the sampler calls.

    `module` is the U-Net itself, or the peft `PeftModel` around it for LoRA. It has
    `state_dict`/`load_state_dict` over the trainable tensors only, so a checkpoint
    stores just what changes.
    """

    module: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    total: int  # all parameters of `module`, frozen ones included
    lora: bool = False

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def share(self) -> float:
        return self.count / max(self.total, 1)

    @property
    def unet(self) -> nn.Module:
        """The UNet2DModel (with LoRA layers injected, for LoRA)."""
        return self.module.get_base_model() if self.lora else self.module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in zip(self.names, self.params)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        unexpected = [n for n in state if n not in self.names]
        if missing or unexpected:
            raise RuntimeError(f"trainable parameters differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(state[name])


def _check_int(value, key: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FinetuneError(f"{key}: expected an integer >= {low}, got {value!r}")
    return value


def parse_trainable(spec) -> tuple[str, object]:
    """Validate `adv.trainable`; returns (kind, options) with kind all, output_blocks, patterns or lora."""
    if spec == "all":
        return "all", None
    if not isinstance(spec, dict) or len(spec) != 1:
        raise FinetuneError(
            f"adv.trainable: expected all or a mapping with one of {', '.join(TRAINABLE_KINDS)}, got {spec!r}; "
            "for example adv.trainable={output_blocks: 2}"
        )
    ((kind, options),) = spec.items()
    if kind not in TRAINABLE_KINDS:
        raise FinetuneError(f"adv.trainable.{kind}: unknown option; expected one of {', '.join(TRAINABLE_KINDS)}")
    if kind == "output_blocks":
        return kind, _check_int(options, "adv.trainable.output_blocks")
    if kind == "patterns":
        return kind, _parse_patterns(options)
    return kind, _parse_lora(options)


def _parse_patterns(options) -> list[re.Pattern]:
    if isinstance(options, str):
        options = [options]
    if not isinstance(options, list) or not options:
        raise FinetuneError(f"adv.trainable.patterns: expected a non-empty list of regular expressions, got {options!r}")
    compiled = []
    for i, pattern in enumerate(options):
        try:
            compiled.append(re.compile(str(pattern)))
        except re.error as error:
            raise FinetuneError(f"adv.trainable.patterns[{i}]: invalid regular expression {pattern!r}: {error}") from None
    return compiled


def _parse_lora(options) -> dict:
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise FinetuneError(f"adv.trainable.lora: expected a mapping of {', '.join(LORA_KEYS)}, got {options!r}")
    for key in options:
        if key not in LORA_KEYS:
            raise FinetuneError(f"adv.trainable.lora.{key}: unknown option; expected some of {', '.join(LORA_KEYS)}")

    rank = _check_int(options.get("rank", 8), "adv.trainable.lora.rank")
    alpha = options.get("alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise FinetuneError(f"adv.trainable.lora.alpha: expected a positive number, got {alpha!r}")
    targets = options.get("target_modules", list(DEFAULT_LORA_TARGETS))
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise FinetuneError(f"adv.trainable.lora.target_modules: expected a list of module names, got {targets!r}")
    return {"rank": rank, "alpha": float(alpha), "target_modules": targets}


def _output_block_prefixes(unet: nn.Module, count: int) -> tuple[str, ...]:
    blocks = len(unet.up_blocks)
    if count > blocks:
        raise FinetuneError(f"adv.trainable.output_blocks: {count} exceeds the U-Net's {blocks} up-blocks")
    return tuple(f"up_blocks.{i}." for i in range(blocks - count, blocks)) + ("conv_norm_out.", "conv_out.")


def add_lora(unet: nn.Module, rank: int, alpha: float, target_modules: list[str]) -> nn.Module:
    """Wrap `unet` in a peft `PeftModel` with LoRA adapters; only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True)
    try:
        return get_peft_model(unet, config)
    except ValueError as error:
        raise FinetuneError(
            f"adv.trainable.lora.target_modules={target_modules}: peft could not add adapters ({error}); "
            "name Linear or Conv2d modules of the U-Net, for example to_q, to_k, to_v, to_out.0, conv1, conv2"
        ) from None


def select_trainable(unet: nn.Module, spec) -> Trainable:
    """Freeze every parameter that `adv.trainable` does not select (LoRA: add adapters first)."""
    kind, options = parse_trainable(spec)
    module = unet
    if kind == "lora":
        module = add_lora(unet, options["rank"], options["alpha"], options["target_modules"])
    else:
        prefixes = _output_block_prefixes(unet, options) if kind == "output_blocks" else None
        for name, p in unet.named_parameters():
            if kind == "all":
                keep = True
            elif kind == "output_blocks":
                keep = name.startswith(prefixes)
            else:
                keep = any(pattern.search(name) for pattern in options)
            p.requires_grad_(keep)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise FinetuneError(f"adv.trainable={spec!r} selects no parameter of the U-Net; check the names or patterns")
    total = sum(p.numel() for p in module.parameters())
    return Trainable(module, [n for n, _ in named], [p for _, p in named], total, lora=kind == "lora")


def merged_unet(trainable: Trainable) -> nn.Module:
    """Return a plain UNet2DModel copy with the LoRA update merged into its weights (the U-Net itself without LoRA)."""
    if not trainable.lora:
        return trainable.module
    return copy.deepcopy(trainable.module).merge_and_unload()


def export_model(trainable: Trainable, model, folder: str | Path) -> None:
    """Write the current weights as a DDPMPipeline folder (LoRA merged into a copy).

    For a latent model the autoencoder is saved next to the U-Net (vqvae/ or vae/),
    where `common.models.load_model` finds it. NOTE: `DDPMPipeline` itself ignores that
    folder and would sample latents, so latent models load correctly only through load_model.
    """
    from .models import export_pipeline

    folder = Path(folder)
    export_pipeline(merged_unet(trainable), model.scheduler, folder)
    if model.autoencoder is not None:
        name = "vae" if type(model.autoencoder).__name__ == "AutoencoderKL" else "vqvae"
        model.autoencoder.save_pretrained(folder / name)


def save_lora_adapter(trainable: Trainable, folder: str | Path) -> None:
    """Write the adapter with peft's `save_pretrained` (adapter_config.json + safetensors)."""
    trainable.module.save_pretrained(str(folder))


@contextlib.contextmanager
def ema_parameters(ema, params: list[nn.Parameter]):
    """Temporarily copy the EMA shadow into `params` (the trainable parameters)."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


# --- rollout plans and fakes ---------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPlan:
    """Per-batch choices shared by all ranks: steps with gradient, and the scored step (steps mode)."""

    grad_steps: int  # K; 1 in steps mode
    index: int | None = None  # steps mode: sampler step index of the scored x_t
    t: int | None = None  # steps mode: its timestep


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """CPU generator for the choices of generator step `step` (identical on every rank)."""
    return torch.Generator().manual_seed((seed % 2**20) * 2**40 + stream * 2**36 + step)


def plan_rollout(adv, sampler: Sampler, seed: int, step: int) -> RolloutPlan:
    """Draw K (`adv.grad_steps`) or the feedback timestep (`adv.feedback_t`) for one batch."""
    generator = step_generator(seed, step)
    if adv.mode == "steps":
        t_target = adv.feedback_t[int(torch.randint(len(adv.feedback_t), (1,), generator=generator))]
        index = min(range(sampler.num_steps), key=lambda i: abs(sampler.timesteps[i] - t_target))
        return RolloutPlan(grad_steps=1, index=index, t=sampler.timesteps[index])
    if adv.grad_steps == "all":
        return RolloutPlan(grad_steps=sampler.num_steps)
    if adv.grad_steps == "random":
        high = min(adv.grad_steps_max, sampler.num_steps)
        return RolloutPlan(grad_steps=int(torch.randint(1, high + 1, (1,), generator=generator)))
    return RolloutPlan(grad_steps=int(adv.grad_steps))


def worst_case_plan(adv, sampler: Sampler) -> RolloutPlan:
    """Return the plan with the most steps under gradient (for the memory probe)."""
    if adv.mode == "steps":
        index = sampler.num_steps - 1
        return RolloutPlan(grad_steps=1, index=index, t=sampler.timesteps[index])
    if adv.grad_steps == "all":
        return RolloutPlan(grad_steps=sampler.num_steps)
    if adv.grad_steps == "random":
        return RolloutPlan(grad_steps=min(adv.grad_steps_max, sampler.num_steps))
    return RolloutPlan(grad_steps=int(adv.grad_steps))


def rollout_seeds(seed: int, stream: int, index: int, batch: int) -> list[int]:
    """Initial-noise seeds of this rank's part of global batch number `index`.

    Global sample j of the batch gets seed base + index * global_batch + j, so one
    process with the global batch and N processes draw the same samples.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    base = (stream + 1 + 2 * (seed % 1000)) * SEED_BLOCK + index * batch * world + rank * batch
    return [base + i for i in range(batch)]


def generate_fakes(sampler: Sampler, decode: Callable, seeds: list[int], shape: tuple[int, int, int],
                   device: torch.device, plan: RolloutPlan, mode: str, grad: bool,
                   use_checkpoint: bool = True) -> torch.Tensor:
    """Images [N, 3, H, W] (about [-1, 1], not clamped) that the discriminator scores.

    chain: the final samples, with gradients through the last `plan.grad_steps` steps
    when `grad`. steps: the x0 prediction of one U-Net call at `plan.t`, from an x_t
    rolled out without gradients.
    """
    if mode == "chain":
        if grad:
            z = sampler.sample(seeds, shape, device, grad_steps=plan.grad_steps, use_checkpoint=use_checkpoint)
        else:
            with torch.no_grad():
                z = sampler.sample(seeds, shape, device)
    elif mode == "steps":
        with torch.no_grad():
            x_t = sampler.sample(seeds, shape, device, stop_index=plan.index)
        with torch.set_grad_enabled(grad):
            output = sampler.model_output(x_t, plan.t)
            t_batch = torch.full((len(seeds),), plan.t, device=device, dtype=torch.long)
            z = predict_x0(output, x_t, t_batch, sampler.alphas_cumprod, sampler.prediction_type)
    else:
        raise FinetuneError(f"adv.mode: invalid value {mode!r}; expected chain or steps")
    with torch.set_grad_enabled(grad):
        return decode(z)


def l2_to_initial(params: Iterable[nn.Parameter], initial: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squared differences between the trainable parameters and their initial values."""
    terms = [(p.float() - p0.float()).square().sum() for p, p0 in zip(params, initial)]
    return torch.stack(terms).sum()


def effective_disc_config(disc_cfg, disc: nn.Module):
    """`disc_cfg` with `mode` set to what the discriminator is (a loaded D keeps its own mode)."""
    return dataclasses.replace(disc_cfg, mode="noisy" if getattr(disc, "noise_aware", False) else "pixel")


def generator_loss(fakes: torch.Tensor, disc: nn.Module, real: torch.Tensor, gen: nn.Module, scheduler, cfg,
                   generator: torch.Generator, params: list[nn.Parameter] | None = None,
                   initial: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda_adv * g_loss(D(fakes)) + lambda_dsm * denoising loss(real) + lambda_l2 * ||theta - theta_0||^2.

    `disc` is the unwrapped discriminator (no DDP), `real` a batch in the U-Net's space
    (encoded for latent models). The fakes reach D as in the D step (`gan.to_disc_input`:
    DiffAugment, then for a noise-aware D q_sample to a timestep of `disc.t_range`
    with fresh noise from `generator`). Terms with a zero weight are not computed and
    are reported as 0.
    """
    from .gan import call_disc, to_disc_input

    adv = cfg.adv
    x, t = to_disc_input(fakes, effective_disc_config(cfg.disc, disc), generator, scheduler.alphas_cumprod)
    logits = call_disc(disc, x, t)
    zero = torch.zeros((), device=fakes.device)
    adv_term = g_loss(logits, cfg.disc.loss) if adv.lambda_adv > 0 else zero
    dsm_term = denoising_loss(gen, scheduler, real) if adv.lambda_dsm > 0 else zero
    l2_term = l2_to_initial(params, initial) if adv.lambda_l2 > 0 else zero
    total = adv.lambda_adv * adv_term + adv.lambda_dsm * dsm_term + adv.lambda_l2 * l2_term
    parts = {"g_adv": adv_term, "g_dsm": dsm_term, "g_l2": l2_term}
    return total, parts


# --- memory and time probe -----------------------------------------------------------------


def _cpu_to(obj):
    """Copy every tensor of a (nested) state dict to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_to(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_to(v) for v in obj]
    return copy.deepcopy(obj)


@contextlib.contextmanager
def preserved_state(*objects):
    """Restore the state dicts of `objects` (modules, optimizers) and every RNG on exit.

    Snapshots are kept on the CPU, so they do not add to the device memory the probe measures.
    """
    saved = [_cpu_to(o.state_dict()) for o in objects]
    rng = capture_rng()
    try:
        yield
    finally:
        for obj, state in zip(objects, saved):
            obj.load_state_dict(state)
            if isinstance(obj, nn.Module):
                obj.zero_grad(set_to_none=True)
        restore_rng(rng)


def _rss_bytes() -> int:
    """Resident set size now, from /proc/self/statm (Linux); 0 where that file is absent."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_gb(device: torch.device) -> float:
    """Total memory of the device: the GPU's, or the machine's physical RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


@dataclass(frozen=True)
class Estimate:
    peak_gb: float
    sec_per_step: float
    total_min: float
    probe_batch: int
    batch: int
    grad_steps: int
    method: str

    def line(self) -> str:
        return (f"estimate: {self.peak_gb:.3f} GB peak, {self.sec_per_step:.2f} s/step, {self.total_min:.1f} min total "
                f"(probe: batch {self.probe_batch} -> {self.batch}, K={self.grad_steps}, {self.method})")


@dataclass(frozen=True)
class Probe:
    """Measurements of `measure`: memory over the first step, seconds of warm steps per batch size."""
    before: int  # bytes in use before the first step
    peak: int  # peak bytes during the first step, at the largest probe batch
    seconds: dict[int, float]  # batch size -> seconds of one warm step


def measure(step_fn: Callable[[int], None], probe_batch: int, device: torch.device) -> Probe:
    """Run step_fn(probe_batch) twice, then step_fn(1) twice when probe_batch > 1.

    Memory comes from the first call, at the largest batch. CUDA: memory_allocated
    before and max_memory_allocated during the call. CPU: the resident set size before
    and the process's peak RSS (getrusage) after. That peak covers the whole process so
    far: it over-estimates the step when an earlier phase used more memory, and it
    cannot see a later, smaller call.

    Time comes only from the second call at each batch size. The first call at a new
    shape pays one-off costs (allocator growth, oneDNN primitive creation, cuDNN
    autotuning): timing a single first step made the estimate about 2x too high on a
    2-core CPU.
    """
    def timed(batch: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step_fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes() or _peak_rss_bytes()
    timed(probe_batch)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = max(_peak_rss_bytes(), before)
    seconds = {probe_batch: timed(probe_batch)}
    if probe_batch > 1:
        timed(1)
        seconds[1] = timed(1)
    return Probe(before, peak, seconds)


def extrapolate(probe: Probe, state_bytes: int, batch: int, steps: int, grad_steps: int, method: str) -> Estimate:
    """Scale the probe to `batch`: memory linearly, time along a line through the warm steps.

    Memory = before + state + (peak - before - state) * batch / probe_batch, where
    `state_bytes` (gradients and optimizer moments, created by the first step) does
    not grow with the batch.

    Time = t(b) + slope * (batch - b) at the largest probe batch b, with the slope
    from the steps at batch 1 and b: a step has a part that does not grow with the
    batch (Python, kernel launches, a GPU not yet full). The slope is kept between 0
    and t(b) / b (no fixed part), so noise between the two timings cannot give a
    time that falls with the batch or grows faster than in proportion. With one
    timing the time is scaled in proportion, an upper bound.
    """
    probe_batch = max(probe.seconds)
    activations = max(probe.peak - probe.before - state_bytes, 0)
    peak_gb = (probe.before + state_bytes + activations * batch / probe_batch) / GIB
    top = probe.seconds[probe_batch]
    slope = top / probe_batch
    if len(probe.seconds) > 1:
        low = min(probe.seconds)
        slope = min(max((top - probe.seconds[low]) / (probe_batch - low), 0.0), slope)
    sec = top + slope * (batch - probe_batch)
    return Estimate(peak_gb, sec, sec * steps / 60, probe_batch, batch, grad_steps, method)


def optimizer_state_bytes(*param_lists: list[nn.Parameter]) -> int:
    """Bytes of one gradient and two Adam moments per trainable parameter (float32)."""
    return sum(3 * 4 * p.numel() for params in param_lists for p in params)


def check_estimate(estimate: Estimate, max_memory_gb: float | None, device: torch.device, mode: str) -> None:
    """Raise MemoryEstimateError when the estimate exceeds adv.max_memory_gb or the device's memory."""
    limits = [(device_memory_gb(device), f"the {device.type} memory")]
    if max_memory_gb is not None:
        limits.append((max_memory_gb, "adv.max_memory_gb"))
    for limit, name in limits:
        if estimate.peak_gb > limit:
            hints = [f"adv.grad_steps=K with K < {estimate.grad_steps}" if mode == "chain" and estimate.grad_steps > 1
                     else None,
                     "adv.mode=steps" if mode == "chain" else None,
                     "adv.trainable={lora: {rank: 8}}",
                     f"adv.batch_per_gpu below {estimate.batch}" if estimate.batch > 1 else None]
            raise MemoryEstimateError(
                f"estimated peak memory {estimate.peak_gb:.3f} GB exceeds {name} ({limit:.3f} GB); "
                f"try {', or '.join(h for h in hints if h)}"
            )



# --- evaluation ----------------------------------------------------------------------------

INCEPTION_METRICS = ("fid", "kid", "is", "pr", "dc")


def check_eval_metrics(names: list[str]) -> None:
    unknown = [n for n in names if n not in INCEPTION_METRICS + ("c2st",)]
    if unknown:
        raise FinetuneError(
            f"adv.eval_metrics: unknown metric {unknown[0]!r}; expected some of {', '.join(INCEPTION_METRICS)}, c2st"
        )


def generate_images(model, sampler: Sampler, num: int, batch: int, seed: int, image_size: int,
                    device: torch.device) -> torch.Tensor:
    """uint8 images [num, 3, S, S] with seeds seed + i, generated in rank chunks and gathered on every rank."""
    from .data import tensor_to_uint8
    from .sampling import generate_batch, rank_chunks

    local = torch.zeros((0, 3, image_size, image_size), dtype=torch.int32, device=device)
    index: list[int] = []
    for chunk in rank_chunks(num, batch):
        images = tensor_to_uint8(generate_batch(model, sampler, [seed + i for i in chunk], device))
        local = torch.cat([local, images.to(torch.int32)])
        index.extend(chunk)
    # int32 because gather_rows sums zero-filled rows over ranks, which NCCL and gloo support for int32.
    gathered = dist.gather_rows(local, torch.tensor(index, dtype=torch.long, device=device), num)
    return gathered.to(torch.uint8).cpu()


def real_images(dataset, num: int) -> torch.Tensor:
    """Return the first `num` dataset images, unflipped, as uint8 [num, 3, R, R]."""
    count = min(num, len(dataset))
    return torch.stack([torch.from_numpy(dataset.uint8_image(i)).permute(2, 0, 1) for i in range(count)])


class SampleMetrics:
    """Metrics of generated images against a fixed real set, with the real features computed once.

    Inception metrics use `common.metrics` with the extractor of `metrics.features`.
    The real features of a folder dataset come from `reference_features`, cached on
    disk in `metrics.cache_dir`. Those of the embedded LFW faces come from the images.
    C2ST uses `common.c2st.c2st_from_config` on the same real images as the fakes' count.
    Every rank calls `__call__`; metrics run on rank 0 and are broadcast.
    """

    def __init__(self, cfg, dataset, names: list[str], device: torch.device) -> None:
        check_eval_metrics(names)
        self.cfg = cfg
        self.device = device
        self.names = list(names)
        self.real = real_images(dataset, max(cfg.adv.eval_num, 2))
        self.dataset = dataset
        self.extractor = None
        self.real_features = None

    def _inception(self):
        from . import metrics

        if self.extractor is None:
            self.extractor = metrics.build_extractor(self.cfg, self.device, offline=self.cfg.offline or None)
            if self.cfg.data.source == "folder":
                self.real_features = metrics.reference_features(
                    self.dataset.files, self.extractor, self.cfg, self.device, resolution=self.cfg.data.resolution,
                    resize_filter=self.cfg.data.resize_filter, progress=False)
            else:
                self.real_features = metrics.extract_from_images(
                    self.real, self.extractor, self.cfg.metrics.batch_size, self.device, progress=False)
        return self.extractor

    def __call__(self, fake: torch.Tensor) -> dict:
        """{"metrics": {name: {"value", "ci"}}, "extractor", "comparable_to_literature"} of uint8 fakes."""
        from . import metrics

        result: dict = {}
        inception_names = [n for n in self.names if n in INCEPTION_METRICS]
        fake_features = None
        if inception_names:
            extractor = self._inception()
            fake_features = metrics.extract_from_images(fake, extractor, self.cfg.metrics.batch_size, self.device,
                                                        progress=False)
        if dist.is_main():
            from .evaluation import to_table_metrics

            table: dict = {}
            if fake_features is not None:
                flat = metrics.compute_metrics(self.real_features, fake_features, self.cfg, inception_names)
                table.update(to_table_metrics(flat))
                result["extractor"] = flat["extractor"]
                result["comparable_to_literature"] = flat["comparable_to_literature"]
            if "c2st" in self.names:
                from .c2st import c2st_from_config

                out = c2st_from_config(self.real, fake, self.cfg.metrics, seed=self.cfg.metrics.seed, device=self.device)
                table["c2st_accuracy"] = {"value": float(out["accuracy"]), "ci": None}
                table["c2st_auc"] = {"value": float(out["auc"]), "ci": None}
            result["metrics"] = table
        return dist.broadcast_object(result)


def check_replicas(*param_lists: list[nn.Parameter]) -> None:
    """Raise RuntimeError when the parameters differ across ranks (a collective call).

    Compares a float64 checksum per parameter list; DDP keeps replicas equal, so a
    difference means a parameter escaped gradient synchronisation.
    """
    if dist.get_world_size() == 1:
        return
    local = [float(sum(p.detach().double().sum() for p in params)) for params in param_lists]
    totals = dist.sum_across_ranks(local)
    for value, total in zip(local, totals):
        mean = total / dist.get_world_size()
        if abs(value - mean) > 1e-6 * max(1.0, abs(mean)):
            raise RuntimeError(
                f"parameters differ across ranks (checksum {value} on rank {dist.get_rank()}, mean {mean}); "
                "a trainable parameter is not synchronised by DDP"
            )
