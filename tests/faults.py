"""Fault injection for the stage scripts: SIGKILL or SIGUSR1 at seeded random moments.

`run_with_kills` starts a stage as a subprocess, kills it with SIGKILL at a moment
drawn from a seeded RNG, reruns it with resume=auto, and repeats until the stage
finishes. A kill moment is one of:

    delay   a random delay after a new checkpoint (or its temporary file) appears
    step    when metrics.jsonl reaches a random step
    write   as soon as a checkpoint's temporary file exists, so the kill usually
            lands inside torch.save or before the rename

Every run uses OMP_NUM_THREADS=1, so the tests stay light on a shared machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLL_SEC = 0.002
KILL_MODES = ("delay", "step", "write")


@dataclass
class Attempt:
    """One subprocess run: how it was stopped and how it ended."""

    mode: str | None  # None: left to finish
    killed: bool  # a signal reached a live process
    returncode: int
    checkpoints_before: list[str]
    stdout: str = ""
    stderr: str = ""


@dataclass
class FaultRun:
    run_dir: Path
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(a.killed for a in self.attempts)


def stage_command(script: str, config: str | Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / script), str(config), f"run_dir={run_dir}", *overrides]


def stage_env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def _checkpoint_entries(run_dir: Path) -> set[str]:
    """File names in checkpoints/, temporary files included."""
    folder = run_dir / "checkpoints"
    try:
        return {p.name for p in folder.iterdir()}
    except FileNotFoundError:
        return set()


def _temporary_files(run_dir: Path) -> list[str]:
    return [name for name in _checkpoint_entries(run_dir) if name.endswith(".tmp")]


def _last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line still being written
    return 0


def _wait(proc: subprocess.Popen, condition, timeout: float) -> bool:
    """Poll `condition()` until it holds (True) or the process exits (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if condition():
            return True
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"condition not reached within {timeout} s; process killed")
        time.sleep(POLL_SEC)
    return False


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=stage_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_at_moment(proc: subprocess.Popen, run_dir: Path, mode: str, rng: random.Random, sig: int,
                     max_delay: float, max_step: int, timeout: float) -> bool:
    """Send `sig` at the moment `mode` draws from `rng`; returns whether the process was still alive."""
    initial = _checkpoint_entries(run_dir)
    if mode == "write":
        reached = _wait(proc, lambda: bool(_temporary_files(run_dir)), timeout)
    elif mode == "step":
        target = _last_logged_step(run_dir) + rng.randint(1, max(1, max_step))
        reached = _wait(proc, lambda: _last_logged_step(run_dir) >= target, timeout)
    elif mode == "delay":
        reached = _wait(proc, lambda: _checkpoint_entries(run_dir) - initial, timeout)
        if reached:
            time.sleep(rng.uniform(0.0, max_delay))
    else:
        raise ValueError(f"unknown kill mode {mode!r}; expected one of {KILL_MODES}")
    if not reached or proc.poll() is not None:
        return False
    proc.send_signal(sig)
    return True


def run_with_kills(script: str, config: str | Path, run_dir: Path, *overrides: str, kills: int = 1,
                   seed: int = 0, modes: list[str] | None = None, max_delay: float = 1.0, max_step: int = 4,
                   timeout: float = 300.0, env: dict | None = None) -> FaultRun:
    """Run a stage to completion through `kills` SIGKILLs at seeded random moments.

    `modes` fixes the kind of each kill moment; by default each is drawn from
    KILL_MODES. Every run after the first uses resume=auto. Raises AssertionError
    when a run that was not killed fails, with its output.
    """
    rng = random.Random(seed)
    modes = list(modes) if modes is not None else [rng.choice(KILL_MODES) for _ in range(kills)]
    if len(modes) != kills:
        raise ValueError(f"modes: expected {kills} entries, got {len(modes)}")
    result = FaultRun(Path(run_dir))
    cmd = stage_command(script, config, run_dir, *overrides, "resume=auto")
    plan = modes + [None]
    index = 0
    while index < len(plan):
        mode = plan[index]
        before = sorted(_checkpoint_entries(result.run_dir))
        proc = start(cmd, env)
        killed = False
        if mode is not None:
            killed = signal_at_moment(proc, result.run_dir, mode, rng, signal.SIGKILL, max_delay, max_step, timeout)
        stdout, stderr = proc.communicate(timeout=timeout)
        attempt = Attempt(mode, killed, proc.returncode, before, stdout, stderr)
        result.attempts.append(attempt)
        if not killed and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode} without a kill\n"
                                 f"{stdout[-3000:]}\n{stderr[-3000:]}")
        if not killed and mode is not None:
            break  # the stage finished before the kill moment: nothing left to resume
        index += 1
    return result


def run_with_stop_signal(script: str, config: str | Path, run_dir: Path, *overrides: str, sig: int = signal.SIGUSR1,
                         after_step: int = 1, timeout: float = 300.0, env: dict | None = None
                         ) -> subprocess.CompletedProcess:
    """Start a stage, send `sig` once metrics.jsonl reaches `after_step`, and wait for it to exit."""
    cmd = stage_command(script, config, run_dir, *overrides)
    proc = start(cmd, env)
    reached = _wait(proc, lambda: _last_logged_step(run_dir) >= after_step, timeout)
    if reached:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
