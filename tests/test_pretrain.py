"""00_pretrain.py: the files of a run and the exported pipeline."""

import json

import torch
from diffusers import DDPMPipeline, UNet2DModel

from conftest import run_stage


def test_pretrain_writes_run_and_exports_pipeline(tiny_config, tmp_path):
    run = tmp_path / "p"
    result = run_stage("00_pretrain.py", str(tiny_config), f"run_dir={run}")
    assert "exported EMA model" in result.stdout
    assert (run / "config.yaml").read_text().startswith("# stage: 00_pretrain")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]
    for key in ("loss", "lr", "grad_norm", "sec_per_step", "img_per_sec"):
        assert all(isinstance(row[key], float) for row in rows), key
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt_000003.pt", "ckpt_000006.pt"]
    state = torch.load(run / "checkpoints" / "ckpt_000006.pt", weights_only=True)
    assert state["step"] == 6
    assert {"unet", "ema", "optimizer", "lr_schedule", "rng"} <= set(state)
    assert (run / "grids" / "step_000006.png").stat().st_size > 0

    # The export is the EMA weights, loadable by diffusers without this project.
    pipe = DDPMPipeline.from_pretrained(run / "model")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    exported = UNet2DModel.from_pretrained(run / "model" / "unet")
    shadow = state["ema"]["shadow_params"]
    for param, ema_param in zip(exported.parameters(), shadow):
        torch.testing.assert_close(param.detach(), ema_param)
