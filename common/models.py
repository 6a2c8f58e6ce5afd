"""Diffusion models: load a pretrained diffusers model (hub id or local folder) or build one.

Pixel models (`google/ddpm-ema-celebahq-256`, an `00_pretrain.py` export) are a
`UNet2DModel` plus a scheduler. Latent models (`CompVis/ldm-celebahq-256`) add an
autoencoder (`vqvae/` or `vae/`); sampling runs in latent space and `decode` maps
the final latents to images. Either way images are float tensors in [-1, 1].
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DModel, VQModel

from . import dist
from .config import Config, ConfigError, ModelConfig


class ModelUnavailableError(RuntimeError):
    """Weights that cannot be found locally or downloaded. The message gives the command that fetches them."""


@dataclass
class DiffusionModel:
    unet: UNet2DModel
    scheduler: DDPMScheduler  # training noise schedule; samplers are built from its config
    autoencoder: VQModel | AutoencoderKL | None = None
    source: str = "scratch"  # hub id, local path, or "scratch"

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the space the U-Net denoises: pixels, or latents for a latent model."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the model generates (after decoding, for a latent model)."""
        size = self.sample_shape[1]
        if self.autoencoder is None:
            return size
        # diffusers' VQ and KL autoencoders downsample by 2 between consecutive blocks.
        return size * 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Map final samples to images in [-1, 1]; the identity for pixel models."""
        if self.autoencoder is None:
            return z
        scale = getattr(self.autoencoder.config, "scaling_factor", 1.0) or 1.0
        return self.autoencoder.decode(z / scale).sample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [-1, 1] to the U-Net's space (for the denoising loss on real data)."""
        if self.autoencoder is None:
            return images
        scale = getattr(self.autoencoder.config, "scaling_factor", 1.0) or 1.0
        if isinstance(self.autoencoder, AutoencoderKL):
            return self.autoencoder.encode(images).latent_dist.mode() * scale
        return self.autoencoder.encode(images).latents * scale


def build_unet(cfg: Config) -> UNet2DModel:
    u = cfg.model.unet
    if not len(u.block_out_channels) == len(u.down_block_types) == len(u.up_block_types):
        raise ValueError(
            "model.unet: block_out_channels, down_block_types and up_block_types must have the same length, got "
            f"{len(u.block_out_channels)}, {len(u.down_block_types)}, {len(u.up_block_types)}"
        )
    return UNet2DModel(
        sample_size=cfg.data.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(u.block_out_channels),
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        layers_per_block=u.layers_per_block,
        norm_num_groups=u.norm_num_groups,
        attention_head_dim=u.attention_head_dim,
        dropout=u.dropout,
    )


def build_scheduler(cfg: Config) -> DDPMScheduler:
    s = cfg.model.scheduler
    return DDPMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        beta_schedule=s.beta_schedule,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        prediction_type=s.prediction_type,
        clip_sample=s.clip_sample,
        variance_type="fixed_small",
    )


def _is_offline(model_cfg: ModelConfig, global_offline: bool) -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return env or model_cfg.offline or global_offline


def _unavailable_message(name: str, offline: bool, reason: str) -> str:
    how = "offline mode is on" if offline else "the hub could not be reached"
    return (
        f"pretrained model '{name}' is not available ({how}: {reason}). "
        f"On a machine with internet run: huggingface-cli download {name} --local-dir models/{name.split('/')[-1]} "
        f"(or python -c \"from diffusers import DiffusionPipeline; DiffusionPipeline.download('{name}')\" "
        "to fill the hub cache), copy the folder here, and set model.pretrained=PATH/TO/THAT/FOLDER"
    )


def resolve_model_dir(model_cfg: ModelConfig, global_offline: bool = False) -> Path:
    """Return a local folder in diffusers layout for a hub id or a local path."""
    name = model_cfg.pretrained
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelUnavailableError(f"model.pretrained={name} is a file; expected a folder in diffusers layout")
        return local
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelUnavailableError(
            f"model.pretrained={name}: no such folder, and it is not a hub id of the form owner/name"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _is_offline(model_cfg, global_offline)
    try:
        with dist.rank0_first():
            path = snapshot_download(
                name,
                revision=model_cfg.revision,
                cache_dir=model_cfg.cache_dir,
                local_files_only=offline,
            )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelUnavailableError(_unavailable_message(name, offline, reason)) from None
    return Path(path)


def _read_part(path: Path, load):
    """Run `load()`; a damaged file becomes a ModelUnavailableError naming `path`."""
    try:
        return load()
    except (OSError, ValueError, EnvironmentError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0][:300]
        raise ModelUnavailableError(
            f"failed to load {path} ({type(error).__name__}: {first}); the model folder is damaged or incomplete: "
            "export or download it again"
        ) from None


def _load_folder(folder: Path) -> DiffusionModel:
    """Load `unet/` + `scheduler/` (+ `vqvae/` or `vae/`) or a bare UNet2DModel folder."""
    if (folder / "unet").is_dir():
        unet_dir = folder / "unet"
    elif (folder / "config.json").is_file():
        unet_dir = folder
    else:
        raise ModelUnavailableError(
            f"{folder} is not a diffusers model folder: expected unet/config.json (a pipeline) or config.json"
        )
    config = _read_part(unet_dir / "config.json", lambda: json.loads((unet_dir / "config.json").read_text()))
    if config.get("_class_name") not in (None, "UNet2DModel"):
        raise ModelUnavailableError(
            f"{unet_dir}: U-Net class {config.get('_class_name')} is not supported; expected UNet2DModel"
        )
    unet = _read_part(unet_dir, lambda: UNet2DModel.from_pretrained(unet_dir))
    sched_dir = folder / "scheduler"
    if sched_dir.is_dir():
        scheduler = _read_part(sched_dir, lambda: DDPMScheduler.from_pretrained(sched_dir))
    elif (folder / "scheduler_config.json").is_file():
        scheduler = _read_part(folder / "scheduler_config.json", lambda: DDPMScheduler.from_pretrained(folder))
    else:
        raise ModelUnavailableError(f"{folder}: no scheduler/ folder or scheduler_config.json found")
    autoencoder = None
    if (folder / "vqvae").is_dir():
        autoencoder = _read_part(folder / "vqvae", lambda: VQModel.from_pretrained(folder / "vqvae"))
    elif (folder / "vae").is_dir():
        autoencoder = _read_part(folder / "vae", lambda: AutoencoderKL.from_pretrained(folder / "vae"))
    if autoencoder is not None:
        autoencoder.requires_grad_(False).eval()
    return DiffusionModel(unet=unet, scheduler=scheduler, autoencoder=autoencoder, source=str(folder))


def load_model(cfg: Config) -> DiffusionModel:
    """Load the pretrained model of `model.pretrained`, or build a fresh one from `model.unet`."""
    if cfg.model.pretrained is None:
        return DiffusionModel(unet=build_unet(cfg), scheduler=build_scheduler(cfg))
    folder = resolve_model_dir(cfg.model, cfg.offline)
    model = _load_folder(folder)
    model.source = cfg.model.pretrained
    if model.image_size != cfg.data.resolution:
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained} generates {model.image_size} px images but "
            f"data.resolution={cfg.data.resolution}; set data.resolution={model.image_size}, so that real and "
            "generated images are compared at one size"
        )
    return model


def export_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | Path) -> None:
    """Save a `DDPMPipeline` folder (loadable by `DDPMPipeline.from_pretrained`), atomically.

    The pipeline is written next to `folder` and renamed into place, so a kill during
    the export leaves the previous export (if any) untouched.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
