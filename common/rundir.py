"""Run directory I/O: resolved config, atomic checkpoints, JSONL logs, lock, stop signals.

Layout of a run directory:

    config.yaml              resolved config, written before any work
    config.<time>.yaml       an earlier, different config.yaml of this directory
    log.txt                  human-readable status lines (rank 0)
    metrics.jsonl            one JSON object per logged step (rank 0)
    checkpoints/ckpt_000500.pt   resume state; only complete files carry this name
    .lock                    held (flock) by the live rank-0 process

A checkpoint is a dict of state dicts, tensors and plain Python data, so it loads
with `torch.load(weights_only=True)`. It is written to a temporary file in the same
folder, fsynced and renamed, so a kill at any moment leaves either the old set of
checkpoints or the new one, never a half-written file under a checkpoint name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist
from .config import Config, dump_yaml

# Exit code of a stage that stopped on SIGUSR1/SIGTERM after writing a checkpoint.
# The SLURM templates requeue the job on it; `resume: auto` then continues.
EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"

_UMASK = os.umask(0)
os.umask(_UMASK)

CKPT_PATTERN = re.compile(r"^ckpt_(\d{6,})\.pt$")


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked: locked, missing checkpoint, full disk."""


class NonFiniteLossError(RuntimeError):
    """A NaN or inf loss. The run stops and keeps its last good checkpoint."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary file next to `path`, fsync, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give results the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, then rename over `path`.

    On a full disk the temporary file is removed, earlier files stay as they were,
    and RunDirError says how much space is free.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free_mb = _free_mb(path.parent)
            raise RunDirError(
                f"no space left on device while writing {path} ({free_mb} MB free); "
                "the previous checkpoints are intact: free disk space or lower keep_last, then rerun with resume=auto"
            ) from error
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _free_mb(folder: Path) -> int:
    try:
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize // 2**20
    except OSError:
        return -1


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True; a missing or unreadable file raises RunDirError."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in str(error):
            # torch's own advice (weights_only=False) would run arbitrary pickled code.
            first = "it contains Python objects that a safe load (weights_only=True) does not read"
        raise RunDirError(f"{path} is not a readable checkpoint of this tool (corrupt, truncated, or another "
                          f"format): {first}") from None


# --- RNG state -----------------------------------------------------------------------------


def capture_rng() -> dict:
    """RNG state of this process as tensors and plain data (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng() -> list[dict]:
    """RNG states of every rank, in rank order (all ranks call this)."""
    local = capture_rng()
    if dist.get_world_size() == 1:
        return [local]
    states: list = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(states, local)
    return states


def restore_rank_rng(states: list[dict]) -> None:
    rank = dist.get_rank()
    if len(states) != dist.get_world_size():
        dist.print0(
            f"warning: checkpoint holds RNG states of {len(states)} ranks but {dist.get_world_size()} run now; "
            "the noise streams differ from an uninterrupted run"
        )
    restore_rng(states[rank % len(states)])


# --- stop signals --------------------------------------------------------------------------


class StopSignal:
    """Record SIGUSR1, SIGTERM or Ctrl-C so the loop can checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without a checkpoint
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("Ctrl-C: writing a checkpoint at the end of this step (press again to abort)", flush=True)

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank received a signal (a collective call)."""
        return dist.sum_across_ranks([1.0 if self.received else 0.0])[0] > 0

    def exit_for_requeue(self, run: "RunDir", step: int) -> None:
        """Log, leave the process group and exit with EXIT_REQUEUE (the checkpoint is already written)."""
        run.log(f"received {self.received or 'a stop signal on another rank'}; "
                f"checkpoint written at step {step}, exiting with code {EXIT_REQUEUE} for requeue")
        run.release()
        dist.cleanup()
        sys.exit(EXIT_REQUEUE)


# --- run directory -------------------------------------------------------------------------


class RunDir:
    """The run directory of one stage; rank 0 writes, every rank reads checkpoints."""

    def __init__(self, cfg: Config, stage: str) -> None:
        self.path = Path(cfg.run_dir)
        self.stage = stage
        self.ckpt_dir = self.path / "checkpoints"
        self._lock_file = None
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run_dir={self.path} is an existing file, not a folder; choose another run_dir")
        error = None
        if dist.is_main():
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                self.ckpt_dir.mkdir(exist_ok=True)
                self._acquire_lock()
                self._remove_stale_temporary_files()
                self._write_config(f"# stage: {stage}\n" + dump_yaml(cfg))
            except (RunDirError, OSError) as caught:
                error = str(caught)
                self.release()
        # Every rank raises rank 0's error, so none is left waiting in a collective call.
        error = dist.broadcast_object(error)
        if error is not None:
            raise RunDirError(error)
        self._log_handler = None
        self._showwarning = None
        if dist.is_main():
            self._copy_warnings_to_log()

    def _copy_warnings_to_log(self) -> None:
        """Append warnings of the `common` loggers and of warnings.warn to log.txt too.

        They still go to stderr as well. A run directory read later then shows why the run
        skipped images or reported a biased metric.
        """
        handler = _LogTxtHandler(self)
        logger = logging.getLogger("common")
        logger.addHandler(handler)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in logger.handlers):
            # With a handler attached, logging no longer prints to stderr by itself.
            stderr = logging.StreamHandler()
            stderr.setLevel(logging.WARNING)
            logger.addHandler(stderr)
        self._log_handler = handler
        self._showwarning = original = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            original(message, category, filename, lineno, file, line)
            self._append_log(f"warning: {category.__name__}: {message}")

        warnings.showwarning = showwarning

    def _remove_stale_temporary_files(self) -> None:
        """Delete checkpoint temporary files left by a killed writer (safe: this process holds the lock)."""
        for tmp in self.ckpt_dir.glob(".ckpt_*.tmp"):
            tmp.unlink(missing_ok=True)

    def _write_config(self, text: str) -> None:
        """Write config.yaml; a different earlier one is kept as config.<its mtime>.yaml.

        A rerun with another config (or one that fails on bad input) must not erase
        the record of the config that wrote the existing checkpoints.
        """
        path = self.path / "config.yaml"
        if path.is_file() and path.read_text() != text:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            os.replace(path, _unused_path(self.path, f"config.{stamp}", ".yaml"))
        atomic_write_text(path, text)

    def _acquire_lock(self) -> None:
        lock_path = self.path / ".lock"
        self._lock_file = open(lock_path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            owner = self._lock_file.read().strip() or "another process"
            raise RunDirError(
                f"run directory {self.path} is in use by a live run ({owner}); "
                "wait for it to finish or choose another run_dir"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._lock_file.flush()

    def finish(self) -> None:
        """End a stage: wait for every rank, release the lock, leave the process group."""
        dist.barrier()
        self.release()
        dist.cleanup()

    def release(self) -> None:
        if getattr(self, "_log_handler", None) is not None:
            logging.getLogger("common").removeHandler(self._log_handler)
            warnings.showwarning = self._showwarning
            self._log_handler = None
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary files never match the pattern)."""
        if not self.ckpt_dir.is_dir():
            return []
        found = [p for p in self.ckpt_dir.iterdir() if CKPT_PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(CKPT_PATTERN.match(p.name).group(1)))

    def resume_path(self, resume: str) -> Path | None:
        """Resolve `resume: auto | none | PATH`; a PATH that does not exist is an error.

        `none` in a run directory that already contains checkpoints first moves them and
        the step logs (*.jsonl) into `replaced-<time>/`. Otherwise a fresh run would mix
        its steps with the old ones, and pruning could delete the new checkpoints.
        """
        if resume == "none":
            self._set_aside_previous_run()
            return None
        if resume == "auto":
            found = self.checkpoints()
            return found[-1] if found else None
        path = Path(resume)
        if not path.is_file():
            raise RunDirError(f"resume={resume}: checkpoint not found; use resume=auto or resume=none to start fresh")
        return path

    def _set_aside_previous_run(self) -> None:
        if dist.is_main() and self.checkpoints():
            target = _unused_path(self.path, f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            target.mkdir()
            for old in [self.ckpt_dir, *sorted(self.path.glob("*.jsonl"))]:
                os.replace(old, target / old.name)
            self.ckpt_dir.mkdir()
            self.log(f"resume=none: moved the previous checkpoints and step logs of {self.path} to {target}")
        dist.barrier()

    def save(self, state: dict, step: int, keep_last: int) -> Path:
        """Write checkpoint `ckpt_<step>.pt` on rank 0, keep the newest `keep_last`; barrier after."""
        path = self.ckpt_dir / f"ckpt_{step:06d}.pt"
        if dist.is_main():
            atomic_torch_save(state, path)
            for old in self.checkpoints()[:-keep_last]:
                old.unlink(missing_ok=True)
        dist.barrier()
        return path

    # logs

    def truncate_jsonl(self, name: str, after_step: int) -> None:
        """Drop records with step > after_step (written after the checkpoint we resume from)."""
        path = self.path / name
        if not dist.is_main() or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", -1) <= after_step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def jsonl_steps(self, name: str) -> set[int]:
        """Steps of the complete records of `name` (a line cut short by a kill is skipped)."""
        path = self.path / name
        steps = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    steps.add(json.loads(line)["step"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        return steps

    def append_jsonl(self, name: str, record: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def log(self, line: str) -> None:
        """Print a status line on rank 0 and append it to log.txt."""
        if not dist.is_main():
            return
        print(line, flush=True)
        self._append_log(line)

    def _append_log(self, line: str) -> None:
        try:
            with open(self.path / "log.txt", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError:
            pass  # The line was already printed, so a full disk must not turn a warning into a crash.

    def write_json(self, name: str, data: dict) -> None:
        if dist.is_main():
            atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")


class _LogTxtHandler(logging.Handler):
    """Handler that writes WARNING and above records of the `common` loggers into a run's log.txt."""

    def __init__(self, run: RunDir) -> None:
        super().__init__(logging.WARNING)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        self.run._append_log(f"warning: {record.getMessage()}")


def _unused_path(directory: Path, stem: str, suffix: str = "") -> Path:
    """directory/stem+suffix, or directory/stem-N+suffix with the first N not yet taken."""
    path, number = directory / f"{stem}{suffix}", 1
    while path.exists():
        path, number = directory / f"{stem}-{number}{suffix}", number + 1
    return path


def check_finite(step: int, **losses: torch.Tensor) -> None:
    """Raise NonFiniteLossError naming the step and the first non-finite loss term.

    A collective call: every rank raises when any rank has a non-finite loss, so no
    rank is left waiting in the next all-reduce.
    """
    flags = [0.0 if bool(torch.isfinite(value).all()) else 1.0 for value in losses.values()]
    flags = dist.sum_across_ranks(flags)
    for (name, value), flag in zip(losses.items(), flags):
        if flag > 0:
            raise NonFiniteLossError(
                f"non-finite {name} at step {step} (on {int(flag)} rank(s); here {value.detach().float().mean().item()}); "
                "the run stopped and its last checkpoint is kept: lower the learning rate or "
                "use precision=fp32, then rerun with resume=auto"
            )
