"""Sampling speed: common.diffusion.Sampler against diffusers.DDIMPipeline on the same U-Net.

    python bench/sampling.py                       # 32 px U-Net of configs/celeba32_cpu.yaml, random weights
    python bench/sampling.py --model runs/p32/model --batch 64 --steps 50 --device cuda

Both samplers start from the same noise: sample i is drawn from a CPU generator
seeded with seeds[i], which is what `DDIMPipeline(generator=[Generator().manual_seed(s)
...])` does, so their images must agree (the max abs difference is printed; above
1e-5 the script exits with code 1). The two variants are timed interleaved, and
images/s and the per-round ratio are reported as min / median / max. `--profile`
adds a torch.profiler table of one call of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The repository root goes first on sys.path, so `common` is the project package and
# not bench/common.py, which is imported as bench.common.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import DDIMPipeline  # noqa: E402

from bench.common import (REPO_ROOT, add_common_args, format_spread, interleaved_times, paired_ratios,  # noqa: E402
                          print_header, setup_device, spread, synchronize, time_call)
from common.config import load_config  # noqa: E402
from common.diffusion import Sampler  # noqa: E402
from common.models import build_scheduler, build_unet, count_parameters, load_model  # noqa: E402

TOLERANCE = 1e-5  # max abs difference of images in [0, 1]
TARGET_RATIO = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "celeba32_cpu.yaml"),
                        help="config whose model.unet and model.scheduler build the random-weight U-Net")
    parser.add_argument("--model", default=None, help="diffusers model folder to load instead of random weights")
    parser.add_argument("--batch", type=int, default=8, help="images per sampling call (default: 8)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="first noise seed; image i uses seed + i")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one call of each")
    add_common_args(parser, repeats=5)
    return parser.parse_args(argv)


def load_unet(args: argparse.Namespace):
    """U-Net and training scheduler: a model folder, or random weights (seed 0) from the config."""
    overrides = [f"model.pretrained={args.model}"] if args.model else []
    cfg = load_config(args.config, overrides)
    if args.model:
        model = load_model(cfg)
        if model.is_latent:
            sys.exit(f"error: --model {args.model} is a latent model; DDIMPipeline samples pixels only")
        return model.unet, model.scheduler, f"weights from {args.model}"
    torch.manual_seed(0)
    return build_unet(cfg), build_scheduler(cfg), f"random init (seed 0) of {Path(args.config).name}"


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] samples -> [0, 1], as DDIMPipeline post-processes them."""
    return (x / 2 + 0.5).clamp(0, 1)


def print_profile(name: str, fn) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    print(f"\nprofile of one {name} call (top 12 ops by self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def unet_share(unet: torch.nn.Module, fn, device: torch.device) -> tuple[float, float]:
    """Run `fn` once and return (seconds inside unet.forward, total seconds).

    The U-Net time bounds any sampler-side speed-up: a sampler that only removed its
    own overhead could be at most total / (U-Net time) times faster.
    """
    spent = [0.0]
    start = [0.0]

    def before(*_):
        synchronize(device)
        start[0] = time.perf_counter()

    def after(*_):
        synchronize(device)
        spent[0] += time.perf_counter() - start[0]

    handles = [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]
    try:
        total = time_call(fn, device)
    finally:
        for handle in handles:
            handle.remove()
    return spent[0], total


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup_device(args)
    unet, scheduler, source = load_unet(args)
    unet = unet.to(device).eval().requires_grad_(False)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    shape = (unet.config.in_channels, size, size)
    seeds = list(range(args.seed, args.seed + args.batch))
    print_header("bench/sampling.py: Sampler vs diffusers DDIMPipeline", device, {
        "model": source, "parameters": count_parameters(unet), "image": "x".join(map(str, shape)),
        "batch": args.batch, "ddim_steps": args.steps, "eta": 0.0, "repeats": args.repeats,
    })

    sampler = Sampler(unet, scheduler, "ddim", steps=args.steps, eta=0.0)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def run_ours() -> torch.Tensor:
        return to_unit(sampler.sample(seeds, shape, device))

    def run_diffusers() -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(batch_size=args.batch, generator=generators, num_inference_steps=args.steps, eta=0.0,
                    output_type="pt").images

    ours, theirs = run_ours(), run_diffusers()
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"\nmax abs difference of the images in [0, 1]: {diff:.3g} (tolerance {TOLERANCE:g})")

    times = interleaved_times({"Sampler": run_ours, "DDIMPipeline": run_diffusers}, args.repeats, device, warmup=0)
    print("\nseconds per call (interleaved, after one untimed call of each):")
    for name, values in times.items():
        rates = [args.batch / v for v in values]
        print(f"  {name:<13} {format_spread(values)}   images/s: {format_spread(rates, unit='img/s', digits=2)}")
    ratios = paired_ratios(times["DDIMPipeline"], times["Sampler"])
    low, mid, high = spread(ratios)
    verdict = "met" if mid >= TARGET_RATIO else "MISSED"
    print(f"speed-up Sampler / DDIMPipeline (pipeline time / Sampler time, per round): min {low:.3f} / "
          f"median {mid:.3f} / max {high:.3f}; target >= {TARGET_RATIO} on the median: {verdict}")

    print("\ntime inside the U-Net forward (one extra call of each, device synchronised around each forward):")
    for name, fn in (("Sampler", run_ours), ("DDIMPipeline", run_diffusers)):
        inside, total = unet_share(unet, fn, device)
        print(f"  {name:<13} {inside:.3f} s of {total:.3f} s = {100 * inside / total:.1f} %; "
              f"upper bound on a speed-up from the code around the U-Net: {total / inside:.3f}x")

    if args.profile:
        print_profile("Sampler.sample", run_ours)
        print_profile("DDIMPipeline", run_diffusers)
    if diff >= TOLERANCE:
        print(f"error: images differ by {diff:.3g} >= {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
