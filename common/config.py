"""Typed, frozen configuration shared by all stage scripts.

A config is one YAML file read with `yaml.safe_load`, then dotted `key=value`
overrides from the command line:

    python 00_pretrain.py configs/tiny.yaml run_dir=runs/a train.lr=2e-4

Every stage reads the same schema (the `Config` dataclass below) and uses the
sections it needs, so one YAML file describes a whole experiment. Unknown keys and
values of the wrong type raise `ConfigError`, which names the key and the closest
valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid config file, key or value. The message names the key and the fix."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "folder"  # folder (an image folder or .zip) | lfw_subset (embedded in scikit-image)
    root: str | None = None  # image folder or .zip; required when source is folder
    resolution: int = 32  # output side in pixels, after short-side resize and centre crop
    resize_filter: str = "lanczos"  # lanczos | bicubic | bilinear | box | nearest
    flip: bool = True  # random horizontal flip (training only)
    on_bad_image: str = "error"  # error | skip: what to do with a corrupt or unreadable file
    on_small_image: str = "upscale"  # upscale | skip | error: images whose short side < resolution
    max_images: int | None = None  # use only the first N files in sorted order
    num_workers: int = 0  # DataLoader worker processes per rank
    cache_mb: int = 2048  # keep preprocessed uint8 images in RAM (per rank) when they fit in this many MiB; 0 disables


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `diffusers.UNet2DModel` built from scratch (ignored with `model.pretrained`)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    )
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int | None = 8
    dropout: float = 0.0


@dataclass(frozen=True)
class SchedulerConfig:
    """Noise schedule of a model built from scratch (ignored with `model.pretrained`)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    clip_sample: bool = True


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str | None = None  # hub id (google/ddpm-ema-celebahq-256) or a local diffusers folder
    revision: str | None = None  # hub revision (branch, tag or commit)
    offline: bool = False  # never contact the hub; same as HF_HUB_OFFLINE=1
    cache_dir: str | None = None  # hub cache folder; default: the huggingface_hub default
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class TrainConfig:
    """Diffusion pretraining (00_pretrain.py)."""

    steps: int = 1000  # optimizer steps
    batch_per_gpu: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warmup, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True  # EMAModel's warmup of the decay (1 + step) / (10 + step)
    log_every: int = 10
    sample_every: int = 500  # fixed-seed sample grid every N steps; 0 disables
    ckpt_every: int = 500
    keep_last: int = 2  # checkpoints kept on disk
    grid_size: int = 16  # images in the sample grid
    grid_steps: int = 50  # DDIM steps for the sample grid


@dataclass(frozen=True)
class GuidanceConfig:
    """Discriminator guidance at sampling time (Kim et al., ICML 2023)."""

    disc: str | None = None  # checkpoint of a noise-aware discriminator from 02_train_disc.py
    weight: float = 0.0  # w in eps <- eps - w * sqrt(1 - alpha_bar_t) * grad log(D / (1 - D))
    weights: list[float] = field(default_factory=list)  # sweep: one evaluation per weight
    t_range: list[int] = field(default_factory=lambda: [0, 1000])  # apply for t_min <= t < t_max


@dataclass(frozen=True)
class SampleConfig:
    num: int = 64  # images to generate in total over all ranks
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50  # denoising steps (NFE of the U-Net)
    eta: float = 0.0  # DDIM eta; 0 is deterministic given the initial noise
    batch_per_gpu: int = 32
    seed: int = 0  # sample i uses seed + i, whatever the batch size or number of ranks
    dir: str | None = None  # evaluate the images of this folder instead of sampling
    save_npz: bool = False  # also write samples.npz (uint8, N x H x W x 3)
    grid_size: int = 64  # images in the fixed-seed grid


@dataclass(frozen=True)
class MetricsConfig:
    features: str = "inception"  # inception (pytorch-fid weights) | inception-random (fixed-seed random init)
    inception_weights: str | None = None  # path of pt_inception-2015-12-05-6726825d.pth
    batch_size: int = 64
    num_workers: int = 0  # image decoding processes for feature extraction
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    is_splits: int = 10
    pr_k: int = 3  # k of the k-NN manifolds for precision and recall (Kynkaanniemi et al. 2019)
    dc_k: int = 5  # k for density and coverage (Naeem et al. 2020)
    # Bootstrap rounds for 95 % confidence intervals; 0 disables. Each FID round runs one
    # 2048 x 2048 scipy sqrtm (seconds on a CPU), so the default is kept moderate.
    bootstrap: int = 100
    bootstrap_metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "is", "pr", "dc"])  # names in common.metrics.METRICS
    seed: int = 0  # KID subsets and bootstrap resampling
    offline: bool = False  # never download the Inception weights; same as the top-level offline
    memorization_quantile: float = 0.05  # threshold: this quantile of train-to-train NN distances
    cache_dir: str = "runs/.cache"  # reference statistics (.npz)
    real_max: int | None = None  # use at most N reference images
    c2st: bool = True
    c2st_steps: int = 300
    c2st_batch: int = 64
    c2st_lr: float = 1e-3  # Adam learning rate of the C2ST classifier
    c2st_holdout: float = 0.5  # fraction of each class held out to measure accuracy and AUC
    c2st_resolution: int | None = None  # downsample both sets to this side first; None keeps the size
    memorization: bool = True


@dataclass(frozen=True)
class DiscConfig:
    """Discriminator (02_train_disc.py) and the online D of 03_adv_finetune.py."""

    arch: str = "resnet"  # resnet | unet
    mode: str = "pixel"  # pixel (clean images) | noisy (images noised to t, D conditioned on t)
    channels: int = 64  # width at full resolution (resnet)
    max_channels: int = 256
    mbstd_group: int = 4  # minibatch standard deviation group size; 0 disables
    equalized_lr: bool = False
    t_embed_dim: int = 128
    t_cond: str = "proj,film"  # noisy mode, resnet: proj (projection term) and/or film (per-block scale and shift)
    head_channels: int = 64  # unet arch: hidden width of each feature head
    t_range: list[int] = field(default_factory=lambda: [0, 1000])  # training t for noisy mode
    t_dist: str = "uniform"  # uniform | low (denser at small t)
    pretrained: str | None = None  # StyleGAN2 checkpoint (rosinality layout) or 02 checkpoint
    allow_pickle: bool = False  # required to read a pickle (NVIDIA's official .pkl)
    fakes: str | None = None  # folder of generated images; None generates on the fly
    fake_buffer: int = 512  # rolling buffer of on-the-fly fakes
    loss: str = "ns"  # ns (non-saturating logistic) | hinge
    r1_gamma: float = 0.1
    r1_every: int = 16  # lazy R1 interval in D steps
    diffaug: str = "color,translation,cutout"  # comma list; empty disables
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    steps: int = 1000
    batch_per_gpu: int = 32
    eval_every: int = 250
    eval_num: int = 256  # held-out images per class
    t_buckets: int = 10
    log_every: int = 10
    ckpt_every: int = 250
    keep_last: int = 2


@dataclass(frozen=True)
class AdvConfig:
    """Adversarial fine-tuning (03_adv_finetune.py)."""

    mode: str = "chain"  # chain | steps
    grad_steps: Any = "all"  # all | K (last K steps keep gradients) | random
    grad_steps_max: int = 5  # K_max for grad_steps: random
    checkpointing: bool = True  # torch.utils.checkpoint per denoising step
    feedback_t: list[int] = field(default_factory=lambda: [200, 500])  # steps mode: timesteps scored
    sampler: str = "ddim"
    steps: int = 10  # denoising steps of the training rollout
    eta: float = 0.0
    trainable: Any = "all"  # all | {output_blocks: N} | {patterns: [regex]} | {lora: {...}}
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    lambda_adv: float = 1.0
    lambda_dsm: float = 1.0
    lambda_l2: float = 0.0  # L2 pull towards the initial weights
    d_steps: int = 1
    batch_per_gpu: int = 4
    steps_total: int = 200  # generator steps
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    max_memory_gb: float | None = None
    probe: bool = True  # measure memory and time with four small steps before the run
    eval_every: int = 100  # 0 disables the periodic evaluation
    eval_num: int = 256
    # Computed at each evaluation: names of common.metrics.METRICS (Inception features) and c2st.
    eval_metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "is", "pr", "dc", "c2st"])
    log_every: int = 5
    ckpt_every: int = 50
    keep_last: int = 2
    disc_ckpt: str | None = None  # 02_train_disc.py checkpoint; None starts a fresh D
    grid_size: int = 16


@dataclass(frozen=True)
class EvalConfig:
    """04_eval.py: run directories or sample folders to compare."""

    runs: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    baseline: str | None = None  # run used as the reference for paired comparisons


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"  # auto | none | PATH of a checkpoint file
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 autocast on CUDA (never on CPU) | fp32
    offline: bool = False  # no network access at all: hub, weight downloads
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # 04_eval.py takes `runs=[...]` at the top level as a short form of eval.runs.
    runs: list[str] = field(default_factory=list)


# --- parsing -------------------------------------------------------------------------------


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(sorted(valid))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation and convert the safe cases.

    YAML 1.1 reads `1e-4` as a string and `2` as an int, so a float field accepts
    both; every other mismatch raises ConfigError naming the key.
    """
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write it as [a, b, ...]")
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a hub revision or a path written as a bare number
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {annotation!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full_key = prefix + str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{full_key}': {_suggest(str(key), list(fields))}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value or {}, full_key + ".")
        else:
            kwargs[key] = _coerce(value, annotation, full_key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_dotted_key(dotted: str) -> None:
    """Raise ConfigError for an override key that names no field, with a suggestion."""
    cls: Any = Config
    walked = []
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{dotted}': '{'.'.join(walked)}' has no sub-keys")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            prefix = ".".join(walked + [""])
            suggestion = _suggest(part, names)
            if suggestion.startswith("did you mean"):
                close = suggestion.split("'")[1]
                suggestion = f"did you mean '{prefix}{close}'?"
            raise ConfigError(f"unknown config key '{dotted}': {suggestion}")
        walked.append(part)
        cls = typing.get_type_hints(cls)[part]


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Format a YAML syntax error as one line: the problem, then its line and column (1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is read as YAML, so `[1, 2]`, `true` and `null` work.

    An empty value (`disc.diffaug=`) is the empty string, not null.
    """
    if "=" not in text:
        raise ConfigError(f"invalid override '{text}': expected key=value, for example train.lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"invalid override '{text}': the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid value in override '{text}': {_yaml_problem(error)}") from None
    return key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides and validate everything."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"invalid YAML in {path}: {_yaml_problem(error)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(tree).__name__}")
    overridden = []
    for text in overrides:
        key, value = parse_override(text)
        _check_dotted_key(key)
        _set_dotted(tree, key, value)
        overridden.append(key)
    try:
        cfg = _build(Config, tree, "")
    except ConfigError as error:
        # The message starts with the dotted key; name where its value came from.
        bad_key = str(error).split(":", 1)[0]
        if any(bad_key == k or bad_key.startswith(k + ".") for k in overridden):
            raise ConfigError(f"{error} (from the command line)") from None
        raise ConfigError(f"{error} (in {path})" if path is not None else str(error)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    choices = {
        "data.source": (cfg.data.source, ("folder", "lfw_subset")),
        "data.on_bad_image": (cfg.data.on_bad_image, ("error", "skip")),
        "data.on_small_image": (cfg.data.on_small_image, ("upscale", "skip", "error")),
        "data.resize_filter": (cfg.data.resize_filter, ("lanczos", "bicubic", "bilinear", "box", "nearest")),
        "model.scheduler.prediction_type": (cfg.model.scheduler.prediction_type, ("epsilon", "v_prediction", "sample")),
        "sample.sampler": (cfg.sample.sampler, ("ddim", "ddpm")),
        "adv.sampler": (cfg.adv.sampler, ("ddim", "ddpm")),
        "metrics.features": (cfg.metrics.features, ("inception", "inception-random")),
        "disc.arch": (cfg.disc.arch, ("resnet", "unet")),
        "disc.mode": (cfg.disc.mode, ("pixel", "noisy")),
        "disc.loss": (cfg.disc.loss, ("ns", "hinge")),
        "disc.t_dist": (cfg.disc.t_dist, ("uniform", "low")),
        "adv.mode": (cfg.adv.mode, ("chain", "steps")),
        "device": (cfg.device, ("auto", "cpu", "cuda")),
        "precision": (cfg.precision, ("bf16", "fp32")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: invalid value {value!r}; expected one of {', '.join(allowed)}")
    positive = {
        "data.resolution": cfg.data.resolution,
        "train.steps": cfg.train.steps,
        "train.batch_per_gpu": cfg.train.batch_per_gpu,
        "train.grad_accum": cfg.train.grad_accum,
        "train.log_every": cfg.train.log_every,
        "train.ckpt_every": cfg.train.ckpt_every,
        "train.keep_last": cfg.train.keep_last,
        "train.grid_size": cfg.train.grid_size,
        "train.grid_steps": cfg.train.grid_steps,
        "sample.batch_per_gpu": cfg.sample.batch_per_gpu,
        "sample.steps": cfg.sample.steps,
        "metrics.batch_size": cfg.metrics.batch_size,
        "metrics.kid_subset_size": cfg.metrics.kid_subset_size,
        "metrics.kid_subsets": cfg.metrics.kid_subsets,
        "metrics.is_splits": cfg.metrics.is_splits,
        "metrics.pr_k": cfg.metrics.pr_k,
        "metrics.dc_k": cfg.metrics.dc_k,
        "metrics.c2st_batch": cfg.metrics.c2st_batch,
        "disc.steps": cfg.disc.steps,
        "disc.batch_per_gpu": cfg.disc.batch_per_gpu,
        "disc.log_every": cfg.disc.log_every,
        "disc.ckpt_every": cfg.disc.ckpt_every,
        "disc.keep_last": cfg.disc.keep_last,
        "disc.t_buckets": cfg.disc.t_buckets,
        "disc.r1_every": cfg.disc.r1_every,
        "adv.steps": cfg.adv.steps,
        "adv.d_steps": cfg.adv.d_steps,
        "adv.batch_per_gpu": cfg.adv.batch_per_gpu,
        "adv.steps_total": cfg.adv.steps_total,
        "adv.log_every": cfg.adv.log_every,
        "adv.ckpt_every": cfg.adv.ckpt_every,
        "adv.keep_last": cfg.adv.keep_last,
        "adv.grid_size": cfg.adv.grid_size,
        "adv.grad_steps_max": cfg.adv.grad_steps_max,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    # 0 disables each of these.
    not_negative = {
        "train.sample_every": cfg.train.sample_every,
        "train.warmup_steps": cfg.train.warmup_steps,
        "train.grad_clip": cfg.train.grad_clip,
        "train.weight_decay": cfg.train.weight_decay,
        "metrics.bootstrap": cfg.metrics.bootstrap,
        "metrics.c2st_steps": cfg.metrics.c2st_steps,
        "disc.eval_every": cfg.disc.eval_every,
        "disc.mbstd_group": cfg.disc.mbstd_group,
        "disc.r1_gamma": cfg.disc.r1_gamma,
        "adv.eval_every": cfg.adv.eval_every,
        "adv.grad_clip": cfg.adv.grad_clip,
        "adv.lambda_adv": cfg.adv.lambda_adv,
        "adv.lambda_dsm": cfg.adv.lambda_dsm,
        "adv.lambda_l2": cfg.adv.lambda_l2,
    }
    for key, value in not_negative.items():
        if not 0 <= value < math.inf:
            raise ConfigError(f"{key}: must be a finite number >= 0 (0 disables it), got {value}")
    for key, value in {"train.lr": cfg.train.lr, "disc.lr": cfg.disc.lr, "adv.lr": cfg.adv.lr}.items():
        if not 0 <= value < math.inf:  # 0 is allowed: it freezes that network
            raise ConfigError(f"{key}: the learning rate must be a finite number >= 0, got {value}")
    for key, value in {"train.ema_decay": cfg.train.ema_decay, "adv.ema_decay": cfg.adv.ema_decay}.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    resolution = cfg.data.resolution
    if resolution < 8 or resolution & (resolution - 1):
        # The discriminators halve the image down to 4 x 4, so 02 and 03 need a power of two.
        raise ConfigError(f"data.resolution: must be a power of two >= 8 (16, 32, 64, 256, ...), got {resolution}")
    if cfg.model.pretrained is None:
        # Each down block but the last halves the resolution, and the up path must restore it.
        factor = 2 ** (len(cfg.model.unet.block_out_channels) - 1)
        if cfg.data.resolution % factor:
            raise ConfigError(f"data.resolution={cfg.data.resolution} must be divisible by {factor} for a U-Net "
                              f"with {len(cfg.model.unet.block_out_channels)} blocks (model.unet.block_out_channels)")
    if cfg.sample.num < 0:
        raise ConfigError(f"sample.num: must be >= 0, got {cfg.sample.num}")
    gs = cfg.adv.grad_steps
    if not (gs in ("all", "random") or (isinstance(gs, int) and not isinstance(gs, bool) and gs >= 1)):
        raise ConfigError(f"adv.grad_steps: expected all, random or a positive integer K, got {gs!r}")
    if isinstance(gs, int) and gs > cfg.adv.steps:
        raise ConfigError(f"adv.grad_steps: K={gs} exceeds adv.steps={cfg.adv.steps}")
    lo, hi = (cfg.guidance.t_range + [None, None])[:2]
    if len(cfg.guidance.t_range) != 2 or lo >= hi:
        raise ConfigError(f"guidance.t_range: expected [t_min, t_max] with t_min < t_max, got {cfg.guidance.t_range}")
    if len(cfg.disc.t_range) != 2 or cfg.disc.t_range[0] >= cfg.disc.t_range[1]:
        raise ConfigError(f"disc.t_range: expected [t_min, t_max] with t_min < t_max, got {cfg.disc.t_range}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_cli(argv: list[str] | None = None, description: str = "") -> tuple[Config, bool]:
    """Parse `CONFIG.yaml [key=value ...] [--dry-run]` into a Config.

    Returns (config, dry_run). A ConfigError is printed as one line and exits with
    code 2, so a typo never shows a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {Path(sys.argv[0]).name} CONFIG.yaml [key=value ...] [--dry-run]\n\n{description}")
        sys.exit(0)
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    unknown_flags = [a for a in argv if a.startswith("--")]
    if unknown_flags:
        print(f"error: unknown option {unknown_flags[0]}; options are --dry-run and --help", file=sys.stderr)
        sys.exit(2)
    path = None
    if argv and "=" not in argv[0]:
        path = argv.pop(0)
    try:
        cfg = load_config(path, argv)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    return cfg, dry_run
