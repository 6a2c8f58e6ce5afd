"""Memory and time of backpropagating through the last K steps of a DDIM chain.

    python bench/chain_backprop.py                  # 32 px U-Net of configs/celeba32_cpu.yaml, CPU
    python bench/chain_backprop.py --device cuda --batch 16 --ks 1,5,10,20

One training step is `Sampler.sample(seeds, grad_steps=K, use_checkpoint=...)` on a
`--steps`-step DDIM chain (the first steps - K steps without gradients), the loss
mean(x0^2), and `backward()` into every U-Net parameter. No optimizer step is taken.

Each (K, checkpointed or plain) configuration runs in a fresh subprocess, so the
peak memory of one configuration cannot hide in memory an earlier one left behind:

- CUDA: `torch.cuda.max_memory_allocated` during the first step minus
  `torch.cuda.memory_allocated` just before it (tensors only, not the caching
  allocator's reserve).
- CPU: the process's peak resident set size (`getrusage` ru_maxrss) after the first
  step minus the resident set size (/proc/self/statm) just before it. The subprocess
  runs with MALLOC_MMAP_THRESHOLD_=65536, so glibc serves every allocation of 64 KiB or
  more with mmap and returns it on free, and RSS follows the live tensors closely.
  NOTE: RSS counts pages, not tensors. Small allocations from glibc arenas, pages the
  kernel has not yet touched, and memory of other libraries (oneDNN scratch buffers)
  blur the figure by a few MiB, so differences below about 5 MiB mean nothing.

The first step carries the memory measurement; `--repeats` further steps in the same
subprocess give the step time (min / median / max). Configurations with the same K
run back to back, so the checkpointed/plain time ratio of one K is taken under
similar load.

The last section runs the memory and time probe of 03_adv_finetune.py
(`common.finetune.measure`: warm steps at `--probe-batch` and 1, scaled with
`common.finetune.extrapolate`)
on the same chain step and compares its estimate with the value measured at `--batch`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

# The repository root goes first on sys.path, so `common` is the project package and
# not bench/common.py, which is imported as bench.common.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import REPO_ROOT, add_common_args, print_header, setup_device, spread, time_call  # noqa: E402

MIB = 2**20
MEMORY_TARGET = 1.3  # checkpointed peak at the largest K / at the smallest K
TIME_TARGET = 1.4  # checkpointed step time / plain step time at the same K
ESTIMATE_TOLERANCE = 0.2  # relative error of the probe's estimate
RESULT_PREFIX = "RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "celeba32_cpu.yaml"),
                        help="config whose model.unet and model.scheduler build the random-weight U-Net")
    parser.add_argument("--batch", type=int, default=4, help="images per step (default: 4)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the chain (default: 20)")
    parser.add_argument("--ks", default="1,5,10,20", help="comma-separated K values (default: 1,5,10,20)")
    parser.add_argument("--probe-batch", type=int, default=2,
                        help="batch of the probe, as 03_adv_finetune.py uses min(2, adv.batch_per_gpu) (default: 2)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "K,checkpoint(0/1),batch,probe(0/1)"
    add_common_args(parser, repeats=2)
    args = parser.parse_args(argv)
    args.k_values = [int(k) for k in args.ks.split(",")]
    bad = [k for k in args.k_values if not 1 <= k <= args.steps]
    if bad:
        parser.error(f"--ks: K={bad[0]} is outside [1, --steps={args.steps}]")
    return args


# --- worker: one configuration in this process ----------------------------------------------


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def run_worker(args: argparse.Namespace) -> dict:
    from common import finetune
    from common.config import load_config
    from common.diffusion import Sampler
    from common.models import build_scheduler, build_unet

    k, use_checkpoint, batch, probe = (int(v) for v in args.worker.split(","))
    device = setup_device(args)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    unet = build_unet(cfg).to(device).eval()
    sampler = Sampler(unet, build_scheduler(cfg), "ddim", steps=args.steps)
    size = cfg.data.resolution
    params = [p for p in unet.parameters() if p.requires_grad]

    def step(n: int = batch) -> None:
        for p in params:
            p.grad = None
        x0 = sampler.sample(list(range(n)), (3, size, size), device, grad_steps=k,
                            use_checkpoint=bool(use_checkpoint))
        loss = x0.float().square().mean()
        loss.backward()

    result = {"k": k, "checkpoint": bool(use_checkpoint), "batch": batch}
    if probe:
        # The probe exactly as 03_adv_finetune.py runs it, on this step instead of a G + D step.
        method = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"
        estimate = finetune.extrapolate(finetune.measure(step, batch, device), 4 * sum(p.numel() for p in params),
                                        args.batch, steps=1, grad_steps=k, method=method)
        result.update(estimate_peak_bytes=estimate.peak_gb * finetune.GIB, estimate_seconds=estimate.sec_per_step,
                      probe_line=estimate.line())
        return result

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        first = time_call(step, device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = _rss_bytes()
        first = time_call(step, device)
        peak = max(_peak_rss_bytes(), before)
    times = [time_call(step, device) for _ in range(args.repeats)]
    result.update(before_bytes=before, peak_bytes=peak, step_bytes=peak - before, first_seconds=first, seconds=times)
    return result


# --- driver -------------------------------------------------------------------------------


def launch(args: argparse.Namespace, k: int, use_checkpoint: bool, batch: int, probe: bool = False) -> dict:
    """Run one configuration in a fresh interpreter and return its RESULT line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker",
               f"{k},{int(use_checkpoint)},{batch},{int(probe)}", "--config", args.config, "--batch", str(args.batch),
               "--steps", str(args.steps), "--ks", args.ks, "--device", args.device, "--threads", str(args.threads),
               "--repeats", str(args.repeats)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"error: worker K={k} checkpoint={use_checkpoint} batch={batch} failed "
                         f"(exit code {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_worker(args)))
        return 0
    device = setup_device(args)
    from common.config import load_config
    from common.models import build_unet, count_parameters

    cfg = load_config(args.config)
    memory_method = ("cuda max_memory_allocated - memory_allocated before the step" if device.type == "cuda"
                     else "peak RSS (ru_maxrss) - RSS before the step, fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536")
    print_header("bench/chain_backprop.py: gradients through the last K steps of a DDIM chain", device, {
        "model": f"random init of {Path(args.config).name}", "parameters": count_parameters(build_unet(cfg)),
        "image": f"3x{cfg.data.resolution}x{cfg.data.resolution}", "batch": args.batch, "ddim_steps": args.steps,
        "K": args.ks, "loss": "mean(x0^2), backward into all U-Net parameters, no optimizer step",
        "timed_steps_per_configuration": args.repeats, "memory": memory_method,
    })

    rows = {}
    for k in args.k_values:
        for use_checkpoint in (True, False):
            rows[(k, use_checkpoint)] = launch(args, k, use_checkpoint, args.batch)

    print("\n| K | checkpointed | step peak above baseline (MiB) | process peak (MiB) | first step (s) "
          "| step time min / median / max (s) |")
    print("|---|---|---|---|---|---|")
    for (k, use_checkpoint), row in rows.items():
        low, mid, high = spread(row["seconds"])
        print(f"| {k} | {'yes' if use_checkpoint else 'no'} | {row['step_bytes'] / MIB:.1f} | "
              f"{row['peak_bytes'] / MIB:.1f} | {row['first_seconds']:.3f} | {low:.3f} / {mid:.3f} / {high:.3f} |")

    print("\ntargets:")
    k_low, k_high = min(args.k_values), max(args.k_values)
    low_bytes = max(rows[(k_low, True)]["step_bytes"], 1)
    memory_ratio = rows[(k_high, True)]["step_bytes"] / low_bytes
    print(f"  checkpointed step peak K={k_high} / K={k_low}: {memory_ratio:.3f} (target <= {MEMORY_TARGET}: "
          f"{'met' if memory_ratio <= MEMORY_TARGET else 'MISSED'})")
    if k_high > k_low:
        per_step = (rows[(k_high, True)]["step_bytes"] - rows[(k_low, True)]["step_bytes"]) / (k_high - k_low)
        print(f"  checkpointed: {per_step / MIB:.2f} MiB more step peak per extra step with gradients "
              f"(the autograd graph and the saved input of each checkpointed step)")
    for k in args.k_values:
        ratio = spread(rows[(k, True)]["seconds"])[1] / spread(rows[(k, False)]["seconds"])[1]
        print(f"  K={k}: checkpointed / plain median step time {ratio:.3f} (target <= {TIME_TARGET}: "
              f"{'met' if ratio <= TIME_TARGET else 'MISSED'})")
    for k in args.k_values:
        ratio = rows[(k, False)]["step_bytes"] / max(rows[(k, True)]["step_bytes"], 1)
        print(f"  K={k}: plain / checkpointed step peak {ratio:.2f}")

    # The probe of 03_adv_finetune.py on the largest K, checkpointed (adv.checkpointing defaults to true).
    probe = launch(args, k_high, True, args.probe_batch, probe=True)
    measured = rows[(k_high, True)]
    print(f"\n03_adv_finetune.py probe at batch {args.probe_batch}, scaled to batch {args.batch} "
          f"(K={k_high}, checkpointed):\n  {probe['probe_line']}")
    for name, estimate, actual in (
        ("process peak memory (MiB)", probe["estimate_peak_bytes"] / MIB, measured["peak_bytes"] / MIB),
        ("step time vs median measured step (s)", probe["estimate_seconds"], spread(measured["seconds"])[1]),
    ):
        error = estimate / actual - 1
        verdict = "within" if abs(error) <= ESTIMATE_TOLERANCE else "NOT within"
        print(f"  {name}: estimate {estimate:.3f}, measured {actual:.3f}, error {100 * error:+.1f} % "
              f"({verdict} {100 * ESTIMATE_TOLERANCE:.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
