"""Generate numbered sample sets, sharded across ranks.

Sample i always uses seed `sample.seed + i`. The global index range is cut into
chunks of `batch_per_gpu` consecutive indices and chunk j runs on rank
j mod world_size, so every chunk contains the same samples whatever the number of
processes. With the same batch size, 1 and N processes therefore run identical
batches and write identical PNG bytes (on the same hardware and thread count).
Across batch sizes the images agree to float rounding, not bit for bit, because
CPU and GPU kernels may sum in another order for another batch shape.

CPU kernels also sum in another order for another intra-op thread count, and
torchrun gives each process one thread. So on CPU every batch runs on one thread,
and a process with T threads runs T batches at once in a thread pool: the PNGs of
`python` and of `torchrun --nproc_per_node=N` are then byte-identical.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data, dist
from .diffusion import Sampler
from .models import DiffusionModel


def rank_chunks(num: int, batch: int) -> list[list[int]]:
    """Global sample indices of this rank's batches (chunk j goes to rank j mod world)."""
    chunks = [list(range(start, min(start + batch, num))) for start in range(0, num, batch)]
    return chunks[dist.get_rank()::dist.get_world_size()]


def generate_batch(model: DiffusionModel, sampler: Sampler, seeds: list[int], device: torch.device) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] for the given seeds, without gradients."""
    with torch.no_grad():
        z = sampler.sample(seeds, model.sample_shape, device)
        return model.decode(z).clamp(-1, 1)


def write_samples(model: DiffusionModel, sampler: Sampler, num: int, batch: int, seed: int,
                  out_dir: Path, device: torch.device) -> dict:
    """Write `num` PNGs `out_dir/000000.png` ... over all ranks; returns timing on rank 0.

    Images already on disk from an interrupted run are kept, and their chunks are
    skipped, so a rerun only generates what is missing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = rank_chunks(num, batch)
    todo = [c for c in chunks if not all((out_dir / f"{i:06d}.png").exists() for i in c)]
    start = time.perf_counter()

    def run_chunk(chunk: list[int]) -> int:
        images = generate_batch(model, sampler, [seed + i for i in chunk], device).cpu()
        for i, image in zip(chunk, images):
            data.save_png(image, out_dir / f"{i:06d}.png")
        return len(chunk)

    bar = tqdm(total=len(todo), desc="sampling", disable=not dist.is_main(), unit="batch", dynamic_ncols=True)
    generated = 0
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for count in pool.map(run_chunk, todo):
                    generated += count
                    bar.update(1)
        finally:
            torch.set_num_threads(threads)
    else:
        for chunk in todo:
            generated += run_chunk(chunk)
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start
    totals = dist.sum_across_ranks([generated, elapsed])
    dist.barrier()
    wall = totals[1] / dist.get_world_size()
    return {"generated": int(totals[0]), "wall_sec": wall, "img_per_sec": totals[0] / wall if wall > 0 else None}


def sample_files(out_dir: Path, num: int) -> list[Path]:
    files = [out_dir / f"{i:06d}.png" for i in range(num)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {num} samples missing in {out_dir}, first {missing[0]}")
    return files


def write_grid(files: list[Path], path: Path, count: int) -> None:
    """Grid of the first `count` images of a sample set (rank 0)."""
    if not dist.is_main() or not files:
        return
    from .evaluation import files_uint8

    data.save_image_grid(files_uint8(files[:count]), path)


def write_npz(files: list[Path], path: Path) -> None:
    """Write all samples as one uint8 array [N, H, W, 3] in `arr_0` (the layout of ADM's evaluator)."""
    if not dist.is_main():
        return
    arrays = np.stack([np.asarray(data.open_rgb(str(f))) for f in files])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, arrays)
    tmp.replace(path)
