"""Distributed helpers: the same script runs under `torchrun` and plain `python`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the defaults give one
process (rank 0 of 1) and no process group is created. gloo is used on CPU and
NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as torch_dist


def get_rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return get_rank() == 0


def init(device: str = "auto") -> torch.device:
    """Create the process group when launched by torchrun and return this rank's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available; use device=cpu or device=auto")
    if use_cuda:
        torch.cuda.set_device(get_local_rank())
        dev = torch.device("cuda", get_local_rank())
    else:
        dev = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch_dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        # A long timeout: rank 0 may spend minutes writing checkpoints or caching statistics.
        torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return dev


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)
        sys.stdout.flush()


def rank_seed(seed: int) -> int:
    """Seed for this rank's noise streams: seed * world + rank."""
    return seed * get_world_size() + get_rank()


@contextlib.contextmanager
def rank0_first():
    """Let rank 0 run the block first (a download or cache write), then the other ranks."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def sum_across_ranks(values: list[float]) -> list[float]:
    """Sum a few host-side numbers over all ranks (NCCL needs them on the GPU)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if not torch_dist.is_initialized():
        return tensor.tolist()
    if torch_dist.get_backend() == "nccl":
        tensor = tensor.to(torch.device("cuda", get_local_rank()))
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def broadcast_object(obj):
    """Send a picklable object from rank 0 to every rank."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(local: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """Assemble a [total, ...] tensor on every rank from rows sharded across ranks.

    `local` holds this rank's rows and `index` their global positions (int64). Rows
    no rank holds stay zero. All ranks call it, whatever their row count (possibly 0).
    """
    shape = (total,) + tuple(local.shape[1:])
    out = torch.zeros(shape, dtype=local.dtype, device=local.device)
    if len(index):
        out[index] = local
    return all_reduce_sum(out)


def shard_indices(total: int) -> list[int]:
    """Global sample indices of this rank: rank, rank + world, ... (exact, no padding)."""
    return list(range(get_rank(), total, get_world_size()))
