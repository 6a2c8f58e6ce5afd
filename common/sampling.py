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

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data, dist
from .diffusion import Sampler
from .models import DiffusionModel
from .rundir import atomic_write_text


def rank_chunks(num: int, batch: int) -> list[list[int]]:
    """Global sample indices of this rank's batches (chunk j goes to rank j mod world)."""
    chunks = [list(range(start, min(start + batch, num))) for start in range(0, num, batch)]
    return chunks[dist.get_rank()::dist.get_world_size()]


def generate_batch(model: DiffusionModel, sampler: Sampler, seeds: list[int], device: torch.device) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] for the given seeds, without gradients."""
    with torch.no_grad():
        z = sampler.sample(seeds, model.sample_shape, device)
        return model.decode(z).clamp(-1, 1)


SETTINGS_FILE = ".sample_settings.json"  # in the sample folder; image listings skip it (not an image)


def _file_fingerprint(source: str | None) -> list | None:
    """(relative path, size, mtime in ns) of a local file or of every file of a folder; None for a hub id."""
    path = Path(source) if source else None
    if path is None or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([file.name if file == path else str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return entries


def sample_settings(model: DiffusionModel, sampler: Sampler, batch: int, seed: int) -> dict:
    """Everything that decides the bytes of a sample set, recorded next to its PNGs."""
    guidance = sampler.guidance
    return {
        "model": str(Path(model.source).resolve()) if Path(model.source).exists() else model.source,
        "model_files": _file_fingerprint(model.source),
        "sampler": {"kind": sampler.kind, "timesteps": sampler.timesteps, "eta": sampler.eta},
        "seed": seed,
        "batch_per_gpu": batch,  # CPU and GPU kernels may round differently for another batch shape
        "guidance": None if guidance is None else {
            "weight": guidance.weight, "t_range": [guidance.t_min, guidance.t_max],
            "disc": guidance.source, "disc_file": _file_fingerprint(guidance.source),
        },
    }


def _claim_sample_dir(out_dir: Path, settings: dict) -> None:
    """Keep the PNGs of out_dir only if the same settings wrote them; otherwise move them aside.

    Reusing them would evaluate another model's images under this run's name. Rank 0
    moves the old folder to `<out_dir>.replaced-<time>`, so nothing is lost.
    """
    if dist.is_main():
        record = out_dir / SETTINGS_FILE
        has_images = out_dir.is_dir() and any(p.suffix == ".png" for p in out_dir.iterdir())
        settings = json.loads(json.dumps(settings))  # tuples become lists, as in the file
        if has_images and record.is_file() and json.loads(record.read_text()) != settings:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}")
            os.replace(out_dir, target)
            print(f"{out_dir} contained samples of other settings (model, sampler, seed or guidance); "
                  f"moved them to {target}", flush=True)
        elif has_images and not record.is_file():
            # NOTE: folders written before the settings record existed are trusted as they are.
            print(f"{out_dir} has no {SETTINGS_FILE}; its images are kept and reused as they are", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(settings, indent=1) + "\n")
    dist.barrier()


def write_samples(model: DiffusionModel, sampler: Sampler, num: int, batch: int, seed: int,
                  out_dir: Path, device: torch.device) -> dict:
    """Write `num` PNGs `out_dir/000000.png` ... over all ranks; returns timing on rank 0.

    Images already on disk from an interrupted run with the same settings are kept,
    and their chunks are skipped, so a rerun only generates what is missing. Images
    of other settings are moved aside first (see `_claim_sample_dir`).
    """
    _claim_sample_dir(out_dir, sample_settings(model, sampler, batch, seed))
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
