"""FID wall time: the project's feature pass + FID against `python -m pytorch_fid`.

    python bench/metrics.py                        # 200 real faces vs 200 blurred faces, CPU
    python bench/metrics.py --num 10000 --device cuda --batch-size 200 --workers 8

Both sides load the same Inception weights: a fixed-seed random initialisation written
with `common.metrics.save_random_inception_weights` to
TMP/torch_home/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth. pytorch-fid finds it
there through TORCH_HOME; the project's extractor reads it through
`metrics.features=inception` and `metrics.inception_weights`. So both compute FID on
identical features and must agree to within 1e-3 (checked; exit code 1 otherwise).

Image folders: `--num` real faces (the first files of the CelebA 64x64 folder next to
the repository, linked into a temporary folder) and `--num` other images (the next
`--num` faces with a Gaussian blur, written as PNG). Without that folder both sets
are synthetic smooth noise images from two seeds.

What is timed:
- pytorch-fid: the whole `python -m pytorch_fid REAL FAKE` subprocess (interpreter
  start, imports, network build, weight loading, both feature passes, FID). The
  printed interpreter start-up time (`python -c "import torch, pytorch_fid.fid_score"`)
  shows how much of it is fixed cost.
- ours, cold: in this process, `build_extractor` (network build and weight loading),
  `reference_features` on the real folder with an empty cache (extraction plus writing
  the .npz cache), `extract_from_files` on the fake folder, and `fid`. Imports are not
  timed.
- ours, cached: the same calls again; `reference_features` now reads the cache.
Runs are interleaved (pytorch-fid, ours cold, ours cached) for `--repeats` rounds,
each cold run with a new empty cache folder.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# The repository root goes first on sys.path, so `common` is the project package and
# not bench/common.py, which is imported as bench.common.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from bench.common import REPO_ROOT, add_common_args, format_spread, print_header, setup_device, spread  # noqa: E402

FACES = REPO_ROOT.parent / "shared" / "data" / "faces" / "celeba64"
TOLERANCE = 1e-3
COLD_TARGET = 1.5
CACHED_TARGET = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=200, help="images per set (default: 200)")
    parser.add_argument("--faces", default=str(FACES), help="folder of real face images (default: CelebA 64x64)")
    parser.add_argument("--batch-size", type=int, default=50, help="Inception batch of both tools (default: 50)")
    parser.add_argument("--workers", type=int, default=1,
                        help="image decoding processes of both tools (DataLoader num_workers; default: 1)")
    add_common_args(parser, repeats=1)
    return parser.parse_args(argv)


def prepare_folders(args: argparse.Namespace, root: Path) -> tuple[Path, Path, str]:
    """Fill root/real and root/fake; return them and a description of their content."""
    real, fake = root / "real", root / "fake"
    real.mkdir()
    fake.mkdir()
    faces = Path(args.faces)
    files = sorted(faces.glob("*.png")) + sorted(faces.glob("*.jpg")) if faces.is_dir() else []
    if len(files) >= 2 * args.num:
        for i, path in enumerate(files[: args.num]):
            (real / f"{i:05d}{path.suffix}").symlink_to(path.resolve())
        for i, path in enumerate(files[args.num : 2 * args.num]):
            with Image.open(path) as image:
                image.convert("RGB").filter(ImageFilter.GaussianBlur(1.5)).save(fake / f"{i:05d}.png")
        return real, fake, (f"real: first {args.num} files of {faces.name}; fake: the next {args.num}, "
                            "Gaussian blur radius 1.5, PNG")
    print(f"NOTE: {faces} has fewer than {2 * args.num} images; using synthetic images for both sets")
    for folder, seed in ((real, 0), (fake, 1)):
        rng = np.random.default_rng(seed)
        for i in range(args.num):
            noise = rng.normal(size=(8, 8, 3)) * 60 + 128
            image = Image.fromarray(noise.clip(0, 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
            image.save(folder / f"{i:05d}.png")
    return real, fake, f"synthetic 64x64 smooth noise, seeds 0 (real) and 1 (fake), {args.num} each"


def run_pytorch_fid(args: argparse.Namespace, real: Path, fake: Path, torch_home: Path) -> tuple[float, float]:
    """Run pytorch-fid's command line; return (FID, wall seconds of the whole subprocess)."""
    env = dict(os.environ, TORCH_HOME=str(torch_home), OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "pytorch_fid", str(real), str(fake), "--device", args.device,
               "--batch-size", str(args.batch_size), "--num-workers", str(args.workers)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    match = re.search(r"FID:\s+(\S+)", done.stdout)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"error: pytorch-fid failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
    return float(match.group(1)), seconds


def startup_seconds(args: argparse.Namespace) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, pytorch_fid.fid_score"], env=env, check=True)
    return time.perf_counter() - start


def run_ours(cfg, real: Path, fake: Path, device: torch.device) -> tuple[float, float, dict[str, float]]:
    """Extractor build, reference features (cache or extraction), fake features and FID.

    Returns (FID, total seconds, seconds of each part).
    """
    from common import metrics

    parts: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        parts[name] = now - last
        last = now

    with warnings.catch_warnings():
        # The random weights are not the published file, so the extractor warns that results
        # are not comparable to the literature; that is expected here.
        warnings.simplefilter("ignore", metrics.MetricWarning)
        extractor = metrics.build_extractor(cfg, device)
        lap("build_extractor")
        reference = metrics.reference_features(sorted(real.iterdir()), extractor, cfg, device, progress=False)
        lap("reference_features")
        fake_features = metrics.extract_from_files(sorted(fake.iterdir()), extractor, cfg.batch_size,
                                                   cfg.num_workers, device, progress=False)
        lap("extract_from_files (fake)")
        value = metrics.fid(reference, fake_features, cfg)["fid"]
        lap("fid (scipy sqrtm of a 2048x2048 product)")
    # Not part of the timed total: the QR-based distance that the bootstrap rounds use.
    fast_start = time.perf_counter()
    parts["fast_fid_value"] = metrics.frechet_distance_fast(reference, fake_features)
    parts["frechet_distance_fast (not in total)"] = time.perf_counter() - fast_start
    return value, last - start, parts


def main(argv=None) -> int:
    args = parse_args(argv)
    if argv is None and os.environ.get("OMP_NUM_THREADS") != str(args.threads):
        # BLAS (scipy's sqrtm) reads OMP_NUM_THREADS at import, so restart with it set,
        # as the pytorch-fid subprocess gets it.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    device = setup_device(args)
    from common import metrics
    from common.config import MetricsConfig

    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        root = Path(tmp)
        real, fake, content = prepare_folders(args, root)
        torch_home = root / "torch_home"
        weights = metrics.save_random_inception_weights(
            torch_home / "hub" / "checkpoints" / metrics.FID_WEIGHTS_NAME, seed=0)
        print_header("bench/metrics.py: feature pass + FID vs python -m pytorch_fid", device, {
            "images": content, "inception_weights": "fixed-seed random init (seed 0), same file for both",
            "batch_size": args.batch_size, "decoding_workers": args.workers, "repeats": args.repeats,
        })

        times: dict[str, list[float]] = {"pytorch-fid": [], "ours cold": [], "ours cached": []}
        values: dict[str, float] = {}
        breakdown: dict[str, list[dict[str, float]]] = {"ours cold": [], "ours cached": []}
        for round_index in range(args.repeats):
            cfg = MetricsConfig(features="inception", inception_weights=str(weights), batch_size=args.batch_size,
                                num_workers=args.workers, cache_dir=str(root / f"cache{round_index}"))
            values["pytorch-fid"], seconds = run_pytorch_fid(args, real, fake, torch_home)
            times["pytorch-fid"].append(seconds)
            for name in ("ours cold", "ours cached"):
                values[name], seconds, parts = run_ours(cfg, real, fake, device)
                times[name].append(seconds)
                breakdown[name].append(parts)

        startup = startup_seconds(args)
    print(f"\ninterpreter start-up with `import torch, pytorch_fid.fid_score` (part of the pytorch-fid time): "
          f"{startup:.2f} s")
    print("\nwall time:")
    for name, values_s in times.items():
        print(f"  {name:<12} {format_spread(values_s, digits=2)}")
    for name, rounds in breakdown.items():
        print(f"  {name} parts (last round):")
        for part, seconds in rounds[-1].items():
            if part != "fast_fid_value":
                print(f"    {part:<42} {seconds:.2f} s")
    print("\nFID:")
    for name, value in values.items():
        print(f"  {name:<12} {value:.6f}")
    print(f"  {'QR-based frechet_distance_fast':<12} {breakdown['ours cold'][-1]['fast_fid_value']:.6f} "
          "(used by the bootstrap rounds; not compared)")
    worst = max(abs(values[name] - values["pytorch-fid"]) for name in ("ours cold", "ours cached"))
    print(f"  max abs difference to pytorch-fid: {worst:.3g} (tolerance {TOLERANCE:g})")

    print("\nspeed-up (pytorch-fid time / our time, median):")
    base = spread(times["pytorch-fid"])[1]
    for name, target in (("ours cold", COLD_TARGET), ("ours cached", CACHED_TARGET)):
        ratio = base / spread(times[name])[1]
        print(f"  {name:<12} {ratio:.2f}x (target >= {target}x: {'met' if ratio >= target else 'MISSED'})")
    if worst >= TOLERANCE:
        print(f"error: FID differs from pytorch-fid by {worst:.3g} >= {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
