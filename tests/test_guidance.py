"""Discriminator guidance: zero weight is a no-op, the correction points to the real data."""

import pytest
import torch
from diffusers import DDPMScheduler

from common.diffusion import Sampler, predict_x0
from common.guidance import DiscriminatorGuidance


class LinearLogit(torch.nn.Module):
    """Exact log density ratio of N(mu_real, I) vs N(mu_fake, I): (mu_real - mu_fake) . x + c."""

    noise_aware = True

    def __init__(self, mu_real, mu_fake, scale=1.0):
        super().__init__()
        self.direction = torch.nn.Parameter((mu_real - mu_fake) * scale)
        self.offset = 0.5 * (mu_fake.square().sum() - mu_real.square().sum()) * scale

    def forward(self, x, t=None):
        return (x.flatten(1) * self.direction.flatten()).sum(1) + self.offset


class GaussianDenoiser(torch.nn.Module):
    """The exact eps predictor for data N(mu, I): E[eps | x_t] = sqrt(1 - a_t) (x_t - sqrt(a_t) mu)."""

    def __init__(self, mu, alphas_cumprod):
        super().__init__()
        self.mu, self.alphas_cumprod = mu, alphas_cumprod

    def forward(self, x, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return type("Out", (), {"sample": (1 - a).sqrt() * (x - a.sqrt() * self.mu)})()


class NoisyLogRatio(torch.nn.Module):
    """Exact log density ratio of the noised marginals N(sqrt(a_t) mu_real, I) vs N(sqrt(a_t) mu_fake, I)."""

    noise_aware = True

    def __init__(self, mu_real, mu_fake, alphas_cumprod):
        super().__init__()
        self.mu_real, self.mu_fake, self.alphas_cumprod = mu_real, mu_fake, alphas_cumprod

    def forward(self, x, t):
        root_a = self.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        real, fake = root_a * self.mu_real, root_a * self.mu_fake
        return (-0.5 * (x - real).square() + 0.5 * (x - fake).square()).flatten(1).sum(1)


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False)


MU_REAL = torch.tensor([2.0, -1.0]).view(2, 1, 1)
MU_FAKE = torch.tensor([0.0, 0.0]).view(2, 1, 1)


def test_weight_zero_is_bit_identical(scheduler):
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(16, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8).eval()
    disc = LinearLogit(torch.ones(3, 8, 8), torch.zeros(3, 8, 8))
    guided = Sampler(unet, scheduler, "ddpm", steps=4,
                     guidance=DiscriminatorGuidance(disc, scheduler.alphas_cumprod, 0.0, (0, 1000)))
    plain = Sampler(unet, scheduler, "ddpm", steps=4)
    with torch.no_grad():
        a = guided.sample([1, 2], (3, 8, 8), torch.device("cpu"))
        b = plain.sample([1, 2], (3, 8, 8), torch.device("cpu"))
    assert torch.equal(a, b)
    assert guided.guidance.calls == 0


def test_correction_moves_x0_towards_real(scheduler):
    disc = LinearLogit(MU_REAL, MU_FAKE)
    guidance = DiscriminatorGuidance(disc, scheduler.alphas_cumprod, 1.0, (0, 1000))
    x_t = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 300)
    eps = torch.zeros_like(x_t)
    before = predict_x0(eps, x_t, t, scheduler.alphas_cumprod, "epsilon")
    after = predict_x0(guidance(x_t, t, eps), x_t, t, scheduler.alphas_cumprod, "epsilon")
    moved = after - before
    direction = (MU_REAL - MU_FAKE).view(1, 2, 1, 1)
    cosine = torch.nn.functional.cosine_similarity(moved.flatten(1), direction.flatten(1).expand(16, -1))
    assert (cosine > 0.999).all()
    # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), so the shift is w (1 - a) / sqrt(a) * grad.
    a = scheduler.alphas_cumprod[300]
    torch.testing.assert_close(moved, ((1 - a) / a.sqrt() * direction).expand_as(moved), atol=1e-5, rtol=1e-5)


def test_exact_guidance_samples_real_distribution(scheduler):
    """Model of N(mu_fake, I) plus the exact noisy log ratio at w = 1 samples N(mu_real, I)."""
    ac = scheduler.alphas_cumprod
    model = GaussianDenoiser(MU_FAKE, ac)
    seeds = list(range(400))
    shape = (2, 1, 1)
    plain = Sampler(model, scheduler, "ddim", steps=50).sample(seeds, shape, torch.device("cpu"))
    guidance = DiscriminatorGuidance(NoisyLogRatio(MU_REAL, MU_FAKE, ac), ac, 1.0, (0, 1000))
    guided = Sampler(model, scheduler, "ddim", steps=50, guidance=guidance).sample(seeds, shape, torch.device("cpu"))
    # 400 samples: the standard error of each mean coordinate is 0.05.
    torch.testing.assert_close(plain.mean(0).flatten(), MU_FAKE.flatten(), atol=0.2, rtol=0)
    torch.testing.assert_close(guided.mean(0).flatten(), MU_REAL.flatten(), atol=0.2, rtol=0)
    assert guidance.calls == 50


def test_t_range_limits_guidance(scheduler):
    disc = LinearLogit(MU_REAL, MU_FAKE)
    guidance = DiscriminatorGuidance(disc, scheduler.alphas_cumprod, 1.0, (0, 500))
    x_t = torch.randn(4, 2, 1, 1)
    t = torch.tensor([100, 499, 500, 900])
    out = guidance(x_t, t, torch.zeros_like(x_t))
    assert (out[:2].abs().sum((1, 2, 3)) > 0).all()
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


def test_saturated_discriminator_gradient_is_finite(scheduler):
    """D = sigmoid(logit) is 0 or 1 in float32 here; the gradient of the logit is still exact."""
    disc = LinearLogit(MU_REAL, MU_FAKE, scale=500.0)
    guidance = DiscriminatorGuidance(disc, scheduler.alphas_cumprod, 1.0, (0, 1000))
    x_t = torch.tensor([[[[50.0]], [[-50.0]]], [[[-50.0]], [[50.0]]]])
    assert set(torch.sigmoid(disc(x_t)).tolist()) <= {0.0, 1.0}
    grad = guidance.log_ratio_grad(x_t, torch.tensor([10, 10]))
    expected = ((MU_REAL - MU_FAKE) * 500.0).view(1, 2, 1, 1).expand(2, -1, -1, -1)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected)
