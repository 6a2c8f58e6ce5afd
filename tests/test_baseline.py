"""01_baseline.py: sampling, eval.json, process-count invariance, guidance sweeps, latent models."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

from common.config import load_config
from common.diffusion import Sampler
from common.discriminators import build_discriminator
from common.gan import save_disc_checkpoint
from common.models import build_scheduler, build_unet, export_pipeline, load_model
from conftest import run_stage

FAST = ["metrics.real_max=16", "sample.num=6", "sample.batch_per_gpu=4", "metrics.kid_subset_size=4",
        "metrics.is_splits=2"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random-weight 16 px pipeline folder, exported like 00_pretrain.py does."""
    cfg = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "model"
    export_pipeline(build_unet(cfg), build_scheduler(cfg), folder)
    return folder


@pytest.fixture(scope="module")
def noisy_disc(tmp_path_factory):
    """disc_final.pt files of an untrained noise-aware and an untrained pixel D."""
    folder = tmp_path_factory.mktemp("disc")
    paths = {}
    for mode in ("noisy", "pixel"):
        cfg = load_config("configs/tiny.yaml", [f"disc.mode={mode}", "disc.mbstd_group=0"])
        torch.manual_seed(1)
        paths[mode] = folder / f"{mode}.pt"
        save_disc_checkpoint(paths[mode], build_discriminator(cfg.disc, cfg.data.resolution), cfg)
    return paths


def test_baseline_writes_samples_grid_and_eval(tiny_config, tiny_model, tmp_path):
    run = tmp_path / "b"
    run_stage("01_baseline.py", str(tiny_config), f"run_dir={run}", f"model.pretrained={tiny_model}",
              "sample.save_npz=true", *FAST)
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    assert json.loads((run / "samples" / ".sample_settings.json").read_text())["seed"] == 0
    assert (run / "grid.png").stat().st_size > 0
    assert (run / "config.yaml").is_file()
    import numpy as np

    assert np.load(run / "samples.npz")["arr_0"].shape == (6, 16, 16, 3)
    result = json.loads((run / "eval.json").read_text())
    assert result["num_samples"] == 6
    assert result["nfe"] == 4
    assert result["extractor"] == "inception-random-seed0"
    assert result["comparable_to_literature"] is False
    for name in ("fid", "kid", "is"):
        assert isinstance(result["metrics"][name]["value"], float), name
    assert result["wall_sec"] > 0
    assert result["img_per_sec"] > 0


def test_two_processes_write_identical_pngs(tiny_config, tiny_model, tmp_path):
    args = [str(tiny_config), f"model.pretrained={tiny_model}", *FAST, "sample.num=9", "metrics.kid_subset_size=4"]
    # The single process keeps two threads: sampling must not depend on the thread count.
    run_stage("01_baseline.py", *args, f"run_dir={tmp_path / 'one'}", env={"OMP_NUM_THREADS": "2"})
    run_stage("01_baseline.py", *args, f"run_dir={tmp_path / 'two'}", nproc=2)
    for i in range(9):
        name = f"{i:06d}.png"
        assert (tmp_path / "one" / "samples" / name).read_bytes() == (tmp_path / "two" / "samples" / name).read_bytes()
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["world_size"] == 2
    assert one["metrics"]["fid"]["value"] == pytest.approx(two["metrics"]["fid"]["value"], rel=1e-6)


def test_other_settings_set_samples_aside(tiny_config, tiny_model, tmp_path):
    from common.sampling import write_samples

    cfg = load_config(tiny_config, [f"model.pretrained={tiny_model}"])
    model = load_model(cfg)
    sampler = Sampler(model.unet, model.scheduler, "ddim", 2, 0.0)
    out = tmp_path / "samples"
    write_samples(model, sampler, 2, 2, seed=0, out_dir=out, device=torch.device("cpu"))
    first = (out / "000000.png").read_bytes()

    same = write_samples(model, sampler, 2, 2, seed=0, out_dir=out, device=torch.device("cpu"))
    other = write_samples(model, sampler, 2, 2, seed=5, out_dir=out, device=torch.device("cpu"))

    assert same["generated"] == 0  # the same settings reuse the images
    assert other["generated"] == 2
    aside = list(tmp_path.glob("samples.replaced-*"))
    assert len(aside) == 1
    assert (aside[0] / "000000.png").read_bytes() == first
    assert (out / "000000.png").read_bytes() != first


def test_sample_dir_evaluates_without_model(tiny_config, tiny_model, tmp_path):
    run_stage("01_baseline.py", str(tiny_config), f"run_dir={tmp_path / 'b'}", f"model.pretrained={tiny_model}", *FAST)
    run_stage("01_baseline.py", str(tiny_config), f"run_dir={tmp_path / 'again'}",
              f"sample.dir={tmp_path / 'b' / 'samples'}", "model.pretrained=/nonexistent", *FAST)
    first = json.loads((tmp_path / "b" / "eval.json").read_text())
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["num_samples"] == 6
    assert again["metrics"]["fid"]["value"] == pytest.approx(first["metrics"]["fid"]["value"], rel=1e-6)


def test_guidance_sweep_rows_and_zero_weight(tiny_config, tiny_model, noisy_disc, tmp_path):
    run_stage("01_baseline.py", str(tiny_config), f"run_dir={tmp_path / 'plain'}", f"model.pretrained={tiny_model}",
              *FAST)
    run_stage("01_baseline.py", str(tiny_config), f"run_dir={tmp_path / 'sweep'}", f"model.pretrained={tiny_model}",
              f"guidance.disc={noisy_disc['noisy']}", "guidance.weights=[0,4]", *FAST)
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["guidance"]["weight"] for row in sweep["rows"]] == [0.0, 4.0]
    assert sweep["rows"][1]["nfe_disc"] > 0
    assert sweep["rows"][1]["disc_wall_sec"] > 0
    assert sweep["rows"][0]["nfe_disc"] == 0
    for i in range(6):
        name = f"{i:06d}.png"
        plain = (tmp_path / "plain" / "samples" / name).read_bytes()
        assert (tmp_path / "sweep" / "w0" / "samples" / name).read_bytes() == plain
    assert any((tmp_path / "sweep" / "w4" / "samples" / f"{i:06d}.png").read_bytes()
               != (tmp_path / "plain" / "samples" / f"{i:06d}.png").read_bytes() for i in range(6))


def test_pixel_disc_rejected_for_guidance(tiny_config, tiny_model, noisy_disc, tmp_path):
    result = run_stage("01_baseline.py", str(tiny_config), f"run_dir={tmp_path / 'g'}",
                       f"model.pretrained={tiny_model}", f"guidance.disc={noisy_disc['pixel']}",
                       "guidance.weight=1.0", *FAST, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "pixel-mode discriminator" in result.stderr


def test_missing_hub_model_offline_names_fix(tiny_config, tmp_path):
    result = run_stage("01_baseline.py", str(tiny_config), f"run_dir={tmp_path / 'h'}",
                       "model.pretrained=google/ddpm-ema-celebahq-256", "offline=true", *FAST, check=False,
                       env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "google/ddpm-ema-celebahq-256" in result.stderr
    assert "huggingface-cli download" in result.stderr
    assert "model.pretrained" in result.stderr


def test_latent_model_matches_ldm_pipeline(tmp_path):
    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 16),
                    latent_channels=3, norm_num_groups=8, num_vq_embeddings=32, sample_size=16)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    pipe = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "ldm")

    cfg = load_config("configs/tiny.yaml", [f"model.pretrained={tmp_path / 'ldm'}"])
    model = load_model(cfg)
    assert model.is_latent
    assert model.sample_shape == (3, 8, 8)
    seeds = [5, 6]
    with torch.no_grad():
        z = Sampler(model.unet, model.scheduler, "ddim", steps=5).sample(seeds, model.sample_shape, torch.device("cpu"))
        ours = model.decode(z)
    assert ours.shape == (2, 3, 16, 16)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in seeds],
                     num_inference_steps=5, eta=0.0, output_type="np").images
    ours = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert abs(ours - reference).max() < 1e-4
