"""Noise schedule maths and the sampler: closed forms, determinism, gradients."""

import pytest
import torch
from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

from common.diffusion import (Sampler, denoising_loss, eps_to_output, initial_noise, predict_eps, predict_x0,
                              q_sample, training_target)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, block_out_channels=(16, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


def test_q_sample_closed_form(scheduler):
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(q_sample(scheduler.alphas_cumprod, x0, t, noise), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_sample(scheduler.alphas_cumprod, x0, t, noise),
                               scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_recovered_from_each_prediction_type(scheduler, prediction_type):
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    noise = torch.randn(3, 3, 8, 8)
    t = torch.tensor([5, 300, 900])
    x_t = q_sample(scheduler.alphas_cumprod, x0, t, noise)
    target = training_target(x0, noise, t, scheduler.alphas_cumprod, prediction_type)
    torch.testing.assert_close(predict_x0(target, x_t, t, scheduler.alphas_cumprod, prediction_type), x0,
                               atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(predict_eps(target, x_t, t, scheduler.alphas_cumprod, prediction_type), noise,
                               atol=2e-3, rtol=1e-3)
    back = eps_to_output(noise, x_t, t, scheduler.alphas_cumprod, prediction_type)
    torch.testing.assert_close(back, target, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_samples_independent_of_batch(unet, scheduler, kind, eta):
    sampler = Sampler(unet, scheduler, kind, steps=5, eta=eta)
    with torch.no_grad():
        together = sampler.sample([10, 11, 12, 13], (3, 8, 8), torch.device("cpu"))
        apart = torch.cat([sampler.sample([12], (3, 8, 8), torch.device("cpu")),
                           sampler.sample([13, 10], (3, 8, 8), torch.device("cpu"))])
    torch.testing.assert_close(together[2], apart[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(together[3], apart[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(together[0], apart[2], atol=1e-4, rtol=0)


def test_different_seeds_differ(unet, scheduler):
    sampler = Sampler(unet, scheduler, "ddpm", steps=3)
    with torch.no_grad():
        out = sampler.sample([0, 1], (3, 8, 8), torch.device("cpu"))
    assert (out[0] - out[1]).abs().max() > 0.1


def test_ddim_matches_diffusers_pipeline(unet, scheduler):
    from diffusers import DDIMScheduler

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    seeds = [3, 4]
    reference = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in seeds],
                     num_inference_steps=6, eta=0.0, output_type="np").images  # [N, H, W, 3] in [0, 1]
    with torch.no_grad():
        ours = Sampler(unet, scheduler, "ddim", steps=6).sample(seeds, (3, 8, 8), torch.device("cpu"))
    ours = ((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert abs(ours - reference).max() < 1e-5


def test_initial_noise_matches_generator(unet):
    noise = initial_noise([7], (3, 8, 8), torch.device("cpu"))
    expected = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(noise, expected)


def _grads(unet):
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_checkpointed_chain_gradients_equal_plain(scheduler, kind):
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, block_out_channels=(16, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8, dropout=0.1)
    unet.train()  # dropout on: checkpoint must replay the same dropout masks
    sampler = Sampler(unet, scheduler, kind, steps=4, eta=0.5)
    grads = []
    for use_checkpoint in (False, True):
        unet.zero_grad()
        torch.manual_seed(5)
        x = sampler.sample([0, 1], (3, 8, 8), torch.device("cpu"), grad_steps=4, use_checkpoint=use_checkpoint)
        x.square().mean().backward()
        grads.append(_grads(unet))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_truncated_chain_ignores_early_steps(unet, scheduler):
    """With K=2 of 5 steps, the gradient equals that of a chain started from the detached x after step 3."""
    sampler = Sampler(unet, scheduler, "ddim", steps=5)
    unet.zero_grad()
    sampler.sample([0, 1], (3, 8, 8), torch.device("cpu"), grad_steps=2).square().mean().backward()
    truncated = _grads(unet)
    unet.zero_grad()
    with torch.no_grad():
        x_mid = sampler.sample([0, 1], (3, 8, 8), torch.device("cpu"), stop_index=3)
    sampler.sample([0, 1], (3, 8, 8), torch.device("cpu"), grad_steps=2, x_start=x_mid,
                   start_index=3).square().mean().backward()
    manual = _grads(unet)
    torch.testing.assert_close(truncated, manual)
    unet.zero_grad()
    sampler.sample([0, 1], (3, 8, 8), torch.device("cpu"), grad_steps=5).square().mean().backward()
    assert (_grads(unet) - truncated).abs().max() > 0, "the full chain should see the early steps"
    unet.zero_grad()


def test_denoising_loss_near_one_for_zero_output(scheduler):
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    loss = denoising_loss(Zero(), scheduler, torch.zeros(256, 3, 8, 8), torch.Generator().manual_seed(0))
    assert 0.95 < loss.item() < 1.05  # E[eps^2] = 1 for the epsilon target
