"""Sample a pretrained diffusion model and measure it against real faces.

    python 01_baseline.py configs/celeba32_cpu.yaml model.pretrained=runs/p32/model run_dir=runs/b32
    torchrun --nproc_per_node=N 01_baseline.py configs/celebahq256.yaml data.root=DIR
    python 01_baseline.py CONFIG sample.dir=FOLDER          # evaluate existing images
    python 01_baseline.py CONFIG guidance.disc=D.pt guidance.weights=[0,1,2]   # guidance sweep

Reads the model of `model.pretrained` (hub id or a local diffusers folder) and the
real images of `data.*`. Writes into `run_dir`: samples/000000.png ... (sample i uses
seed sample.seed + i), grid.png, optionally samples.npz, and eval.json with FID, KID
and IS, the sample count, NFE, sampler settings, wall time, img/s and the feature
extractor. A guidance sweep writes one such folder per weight (w<weight>/) and
sweep.json with one row per weight.
"""

import time
from pathlib import Path


from common import dist, metrics
from common.evaluation import evaluate, real_features
from common.guidance import build_guidance
from common.diffusion import Sampler
from common.models import ModelUnavailableError, load_model
from common.sampling import sample_files, write_grid, write_npz, write_samples
from common.training import autocast_dtype, run_stage, setup


def sample_and_describe(cfg, model, weight, out_dir, device):
    """Write the sample set of one guidance weight; returns the eval.json fields of sampling."""
    guidance = build_guidance(cfg, model.scheduler.alphas_cumprod, weight, device, unet=model.unet)
    sampler = Sampler(model.unet, model.scheduler, cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta,
                      guidance=guidance, autocast_dtype=autocast_dtype(cfg, device))
    timing = write_samples(model, sampler, cfg.sample.num, cfg.sample.batch_per_gpu, cfg.sample.seed,
                           out_dir / "samples", device)
    disc_calls = dist.sum_across_ranks([guidance.calls if guidance else 0, guidance.seconds if guidance else 0.0])
    return {
        "model": model.source,
        "num_samples": cfg.sample.num,
        "sampler": {"kind": cfg.sample.sampler, "steps": cfg.sample.steps, "eta": cfg.sample.eta,
                    "seed": cfg.sample.seed, "batch_per_gpu": cfg.sample.batch_per_gpu},
        # NFE per image: U-Net passes, plus one D forward-backward per guided step.
        "nfe": sampler.num_steps,
        "nfe_disc": (disc_calls[0] / max(1, -(-cfg.sample.num // cfg.sample.batch_per_gpu))) if guidance else 0,
        "disc_wall_sec": disc_calls[1],
        "guidance": {"disc": cfg.guidance.disc, "weight": weight, "t_range": cfg.guidance.t_range}
        if guidance else None,
        "world_size": dist.get_world_size(),
        **timing,
    }


def main(cfg):
    device, run = setup(cfg, "01_baseline")

    # Feature extractor first, so missing weights fail before any sampling.
    extractor = metrics.build_extractor(cfg, device, offline=cfg.offline)

    # One sample set per guidance weight (a single unguided set without a sweep).
    if cfg.sample.dir is not None:
        sets = [(None, Path(cfg.sample.dir))]
    else:
        if cfg.model.pretrained is None:
            raise ModelUnavailableError("model.pretrained is not set, so there is no trained model to sample; set "
                                        "model.pretrained=RUN/model (00_pretrain.py) or a hub id, or evaluate "
                                        "existing images with sample.dir=FOLDER")
        model = load_model(cfg)
        model.unet.to(device).eval().requires_grad_(False)
        if model.autoencoder is not None:
            model.autoencoder.to(device)
        weights = cfg.guidance.weights or [cfg.guidance.weight]
        sweep = len(cfg.guidance.weights) > 0
        sets = [(w, run.path / f"w{w:g}" if sweep else run.path) for w in weights]

    # Sample, then evaluate each set with one feature pass.
    rows, real = [], None
    for weight, folder in sets:
        if cfg.sample.dir is not None:
            from common.data import list_image_files

            files = [Path(f) for f in list_image_files(folder)]
            info = {"samples_dir": str(folder), "num_samples": len(files)}
            out_dir = run.path
        else:
            out_dir = folder
            info = sample_and_describe(cfg, model, weight, out_dir, device)
            files = sample_files(out_dir / "samples", cfg.sample.num)
            info["samples_dir"] = str(out_dir / "samples")
            run.log(f"sampled {info['generated']} new images ({cfg.sample.num} total) in {info['wall_sec']:.1f} s, "
                    f"{info['img_per_sec'] or 0:.2f} img/s, NFE {info['nfe']}")
        write_grid(files, out_dir / "grid.png", cfg.sample.grid_size)
        if cfg.sample.save_npz:
            write_npz(files, out_dir / "samples.npz")
        if real is None:  # after the first sample set, so its PNGs are usable while this runs
            start = time.perf_counter()
            real = real_features(cfg, extractor, device)
            run.log(f"reference features: {len(real)} real images, extractor {real.extractor}, "
                    f"{time.perf_counter() - start:.1f} s")
        fake = metrics.extract_from_files(files, extractor, cfg.metrics.batch_size, cfg.metrics.num_workers, device)
        result = {**info, **evaluate(cfg, real, fake, names=["fid", "kid", "is"])}
        if dist.is_main():
            run.write_json(str((out_dir / "eval.json").relative_to(run.path)), result)
            shown = ", ".join(f"{k}={v['value']:.4g}" for k, v in result["metrics"].items())
            run.log(f"eval ({result['extractor']}, weight={weight}): {shown} -> {out_dir / 'eval.json'}")
        rows.append(result)

    # A guidance sweep also gets one table of all weights.
    if len(rows) > 1:
        run.write_json("sweep.json", {"rows": rows})
    run.finish()


if __name__ == "__main__":
    run_stage(main, __doc__)
