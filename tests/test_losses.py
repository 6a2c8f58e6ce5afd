import pytest
import torch
from torch import nn

from common.losses import (
    LossError,
    augment_cutout,
    augment_translation,
    d_loss,
    diff_augment,
    g_loss,
    lazy_r1_penalty,
    r1_penalty,
)

torch.set_num_threads(1)

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def test_ns_losses_known_values():
    # softplus(-2) = 0.126928, softplus(1) = 1.313262, softplus(0.5) = 0.974077,
    # softplus(-3) = 0.048587, softplus(3) = 3.048587, softplus(-0.5) = 0.474077
    expected_d = (0.126928 + 1.313262) / 2 + (0.974077 + 0.048587) / 2
    expected_g = (0.474077 + 3.048587) / 2
    assert d_loss(REAL, FAKE, "ns").item() == pytest.approx(expected_d, abs=1e-5)
    assert g_loss(FAKE, "ns").item() == pytest.approx(expected_g, abs=1e-5)


def test_hinge_losses_known_values():
    # D: mean(relu(1 - [2, -1])) = (0 + 2) / 2, mean(relu(1 + [0.5, -3])) = (1.5 + 0) / 2
    assert d_loss(REAL, FAKE, "hinge").item() == pytest.approx(1.75)
    assert g_loss(FAKE, "hinge").item() == pytest.approx(1.25)


def test_unknown_loss_rejected():
    with pytest.raises(LossError, match="disc.loss"):
        d_loss(REAL, FAKE, "wgan")
    with pytest.raises(LossError, match="disc.loss"):
        g_loss(FAKE, "lsgan")


class QuadraticD(nn.Module):
    """D(x_n) = a / 2 * ||x_n||^2 + <w, x_n>, so grad_x D = a x_n + w."""

    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.w = nn.Parameter(torch.linspace(-1, 1, torch.Size(shape).numel()).reshape(shape))

    def forward(self, x, t=None):
        return 0.5 * self.a * x.square().flatten(1).sum(1) + (x * self.w).flatten(1).sum(1)


def test_r1_matches_analytic_gradient():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    D = QuadraticD(x.shape[1:])
    gamma = 2.5
    penalty = r1_penalty(D, x, gamma=gamma)
    grad = D.a.detach() * x + D.w.detach()
    expected = gamma / 2 * grad.square().flatten(1).sum(1).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)

    # Double backward: d penalty / d a = gamma * mean_n <a x_n + w, x_n>.
    penalty.backward()
    expected_da = gamma * (grad * x).flatten(1).sum(1).mean()
    assert D.a.grad.item() == pytest.approx(expected_da.item(), rel=1e-5)


def test_r1_passes_timesteps():
    seen = []

    def D(x, t):
        seen.append(t)
        return x.flatten(1).sum(1) * 3.0

    t = torch.tensor([1, 2])
    penalty = r1_penalty(D, torch.zeros(2, 1, 2, 2), t, gamma=1.0)
    assert seen[0] is t
    # grad = 3 everywhere over 4 pixels: 0.5 * 4 * 9
    assert penalty.item() == pytest.approx(18.0)


def test_r1_leaves_input_untouched():
    x = torch.randn(2, 3, 4, 4)
    r1_penalty(QuadraticD(x.shape[1:]), x, gamma=1.0)
    assert not x.requires_grad
    assert x.grad is None


def test_lazy_r1_schedule():
    x = torch.randn(2, 3, 4, 4)
    D = QuadraticD(x.shape[1:])
    full = r1_penalty(D, x, gamma=0.5)
    assert lazy_r1_penalty(D, x, 0, gamma=0.5, every=16).item() == pytest.approx(16 * full.item(), rel=1e-6)
    assert lazy_r1_penalty(D, x, 32, gamma=0.5, every=16) is not None
    assert lazy_r1_penalty(D, x, 5, gamma=0.5, every=16) is None
    assert lazy_r1_penalty(D, x, 0, gamma=0.5, every=0) is None
    assert lazy_r1_penalty(D, x, 0, gamma=0.0, every=4) is None


POLICY = "color,translation,cutout"


def test_diffaug_deterministic_per_seed():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    a = diff_augment(x, POLICY, torch.Generator().manual_seed(3))
    b = diff_augment(x, POLICY, torch.Generator().manual_seed(3))
    c = diff_augment(x, POLICY, torch.Generator().manual_seed(4))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_diffaug_differentiable():
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = diff_augment(x, POLICY, torch.Generator().manual_seed(0))
    out.square().sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_diffaug_empty_policy_is_identity():
    x = torch.rand(2, 3, 8, 8)
    assert diff_augment(x, "", torch.Generator()) is x


def test_diffaug_unknown_op_rejected():
    with pytest.raises(LossError, match="'rotate'"):
        diff_augment(torch.zeros(1, 3, 8, 8), "color,rotate", torch.Generator())


def test_translation_shifts_with_zero_fill():
    n, side = 64, 16
    x = torch.ones(n, 3, side, side)
    out = augment_translation(x, torch.Generator().manual_seed(0))
    shift = 2  # round(16 / 8)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    zero_rows = (out[:, 0] == 0).all(dim=2).sum(dim=1)  # fully zero rows per image
    zero_cols = (out[:, 0] == 0).all(dim=1).sum(dim=1)
    assert zero_rows.max() <= shift
    assert zero_cols.max() <= shift
    assert (zero_rows > 0).any()
    # The content moves as a whole: an image of row indices stays consecutive.
    ramp = torch.arange(side, dtype=torch.float32).view(1, 1, side, 1).expand(n, 3, side, side) + 1
    moved = augment_translation(ramp, torch.Generator().manual_seed(0))[:, 0, :, side // 2]
    for column in moved:
        values = column[column > 0]
        assert torch.equal(values.diff(), torch.ones_like(values.diff()))


def test_cutout_zeroes_clipped_half_square():
    n, side = 64, 16
    out = augment_cutout(torch.ones(n, 3, side, side), torch.Generator().manual_seed(0))
    zeros = (out[:, 0] == 0).flatten(1).sum(1)
    # an 8 x 8 square whose centre may sit on the border keeps at least 4 x 4 inside
    assert zeros.max() <= 64
    assert zeros.min() >= 16
    assert (zeros == 64).any()
    assert torch.equal(out[:, 0], out[:, 2])  # the same square in every channel
