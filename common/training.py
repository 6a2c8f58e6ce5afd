"""Pieces every training stage shares: setup, autocast, EMA, checkpoint state, step timing."""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from . import dist
from .config import Config, dump_yaml, parse_cli
from .rundir import RunDir, RunDirError, gather_rng, load_checkpoint, restore_rank_rng


def setup(cfg: Config, stage: str) -> tuple[torch.device, RunDir]:
    """Init the process group, create the run directory (config written first) and seed this rank."""
    device = dist.init(cfg.device)
    run = RunDir(cfg, stage)
    seed = dist.rank_seed(cfg.seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    run.log(f"{stage}: run_dir={run.path} world_size={dist.get_world_size()} device={device} "
            f"torch={torch.__version__} threads={torch.get_num_threads()}")
    return device, run


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that report bad input or a stopped run: shown as one line, no traceback."""
    from . import c2st, data, discriminators, finetune, losses, metrics, models, report, rundir
    from .config import ConfigError

    return (ConfigError, data.ImageDataError, models.ModelUnavailableError, rundir.RunDirError,
            rundir.NonFiniteLossError, metrics.MetricError, discriminators.DiscriminatorError, losses.LossError,
            c2st.C2STError, report.ReportError, finetune.FinetuneError)


def run_stage(main, description: str) -> None:
    """Parse the command line, handle --dry-run, run `main(cfg)`, report bad input in one line."""
    cfg, dry_run = parse_cli(description=description)
    if dry_run:
        print(dump_yaml(cfg), end="")
        sys.exit(0)
    try:
        main(cfg)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        dist.cleanup()
        sys.exit(1)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when precision=bf16; a no-op on CPU (tests and CPU runs stay fp32)."""
    if device.type == "cuda" and cfg.precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" and cfg.precision == "bf16" else None


def make_ema(module: torch.nn.Module, decay: float, warmup: bool) -> EMAModel:
    return EMAModel(module.parameters(), decay=decay, use_ema_warmup=warmup,
                    model_cls=type(module), model_config=getattr(module, "config", None))


@contextlib.contextmanager
def ema_weights(ema: EMAModel, module: torch.nn.Module):
    """Temporarily swap the EMA weights into `module` (for grids and evaluation)."""
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield module
    finally:
        ema.restore(module.parameters())


def save_training_state(run: RunDir, step: int, keep_last: int, **parts) -> Path:
    """Write a checkpoint with every state dict in `parts`, the step and all ranks' RNG.

    Every rank must call this (the RNG states are gathered); rank 0 writes.
    """
    state = {name: part.state_dict() if hasattr(part, "state_dict") else part for name, part in parts.items()}
    state["step"] = step
    state["rng"] = gather_rng()
    path = run.save(state, step, keep_last)
    run.log(f"saved checkpoint {path}")
    return path


def load_training_state(path: Path, **parts) -> dict:
    """Load a checkpoint into the given objects; returns the whole state (for step, extras).

    A checkpoint whose tensors do not fit the objects (another config or architecture)
    raises RunDirError naming the file and the first mismatching entry.
    """
    state = load_checkpoint(path)
    missing = [name for name in parts if name not in state]
    if missing:
        raise RunDirError(f"checkpoint {path} has no {', '.join(missing)}; it was written by another stage")
    for name, part in parts.items():
        try:
            part.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as error:
            # torch's message starts with "Error(s) in loading state_dict for X:" and lists
            # one mismatch per following line; the first of those says what differs.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            first = "; ".join(lines[:2])[:300]
            raise RunDirError(
                f"checkpoint {path} does not match this run's {name} (another config or architecture?): {first}; "
                "use the config the checkpoint was written with, or resume=none with a new run_dir"
            ) from None
    restore_rank_rng(state["rng"])
    return state


class StepTimer:
    """Seconds per step and images per second over the steps since the last report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.images = 0

    def update(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def report(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"sec_per_step": elapsed / max(self.steps, 1), "img_per_sec": self.images / elapsed}
        self.__init__()
        return out


def lr_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` optimizer steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1))
    )


def grad_norm(parameters) -> float:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
