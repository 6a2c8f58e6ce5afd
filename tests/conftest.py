"""Shared test fixtures: the repository on sys.path, paths to configs and real faces."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "data" / "faces"
sys.path.insert(0, str(REPO))


@pytest.fixture
def tiny_config() -> Path:
    return REPO / "configs" / "tiny.yaml"


@pytest.fixture
def faces_dir() -> Path:
    folder = FACES / "celeba64"
    if not folder.is_dir():
        pytest.skip(f"real face folder {folder} is absent (it sits beside the repository on the team's machines)")
    return folder


def run_stage(script: str, *args: str, nproc: int = 1, timeout: int = 600, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run a stage script as a user would (python, or torchrun for nproc > 1), from the repo root."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone", str(REPO / script), *args]
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
