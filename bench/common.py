"""Shared pieces of the benchmark scripts: machine and version header, repeat statistics.

Every script prints the same header (machine, versions, settings) so a pasted output
says where and how its numbers were measured. Timings of several variants are taken
interleaved (A, B, A, B, ...) so a load change on a shared machine hits all variants
alike and their ratio stays meaningful even when the absolute times drift.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def print_header(title: str, device: torch.device, settings: dict) -> None:
    """Print the date, machine, library versions and the benchmark's settings."""
    print(f"== {title} ==")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
          f"load average (1/5/15 min) {load_average()}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"gpu: {props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")
    else:
        print("gpu: none used")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"diffusers {package_version('diffusers')}, pytorch-fid {package_version('pytorch-fid')}, "
          f"numpy {package_version('numpy')}, scipy {package_version('scipy')}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("NOTE: timings on a machine shared with other jobs vary from run to run; compare ratios "
          "measured in the same run (variants are interleaved).")


def add_common_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    # One thread by default: with 2 threads on 2 cores that another process also used, OpenMP
    # spin-waiting made a U-Net forward about 160x slower (1.76 s against 0.011 s, torch 2.14).
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1; raise it only on an otherwise idle machine)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed repeats of each variant, interleaved (default: {repeats})")


def setup_device(args: argparse.Namespace) -> torch.device:
    """Set torch's thread count and return the requested device; exit with a message if it is unavailable."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"error: --device {args.device}: expected cpu or cuda")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Time each variant `repeats` times in round-robin order after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_call(fn, device))
    return times


def spread(values: list[float]) -> tuple[float, float, float]:
    """Return (min, median, max)."""
    return min(values), statistics.median(values), max(values)


def format_spread(values: list[float], unit: str = "s", scale: float = 1.0, digits: int = 3) -> str:
    low, mid, high = spread([v * scale for v in values])
    return f"min {low:.{digits}f} / median {mid:.{digits}f} / max {high:.{digits}f} {unit} (n={len(values)})"


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Ratio of the i-th timings of two interleaved variants (same round, so similar load)."""
    return [a / b for a, b in zip(numerator, denominator)]
