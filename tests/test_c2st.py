"""Tests of the classifier two-sample test on real face photos and on noise."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.c2st import C2STError, SmallCNN, c2st, c2st_bootstrap_ci, c2st_from_config, roc_auc
from common.config import MetricsConfig

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
STEPS = 100
BATCH = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One thread: on a shared, busy CPU, extra threads mostly wait for each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """Face photos as uint8 [N, 3, 32, 32]: 320 CelebA crops, or 100 LFW crops from scikit-image."""
    folder = FACES / "celeba64"
    files = sorted(folder.glob("*.png"))[:320] if folder.is_dir() else []
    if len(files) >= 320:
        images = []
        for file in files:
            with Image.open(file) as image:
                array = np.array(image.convert("RGB").resize((32, 32), Image.BICUBIC))
            images.append(torch.from_numpy(array).permute(2, 0, 1))
        return torch.stack(images)
    from skimage.data import lfw_subset

    crops = torch.from_numpy(lfw_subset()[:100]).float()  # [100, 25, 25] in [0, 1]; the first 100 are faces
    crops = F.interpolate(crops[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    return (crops.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def uniform_noise(like: torch.Tensor, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, like.shape, generator=generator, dtype=torch.uint8)


def test_classifier_size():
    count = sum(p.numel() for p in SmallCNN().parameters())
    assert 10_000 < count < 200_000


def test_real_halves_near_chance(faces):
    half = faces.shape[0] // 2
    result = c2st(faces[:half], faces[half:], steps=STEPS, batch=BATCH, seed=0)
    assert abs(result["accuracy"] - 0.5) <= 0.15
    assert abs(result["auc"] - 0.5) <= 0.15
    assert result["n_test"] == 2 * round(0.5 * half)
    assert result["n_train"] + result["n_test"] == 2 * half


def test_real_vs_noise_separable(faces):
    half = faces.shape[0] // 2
    result = c2st(faces[:half], uniform_noise(faces[half:]), steps=STEPS, batch=BATCH, seed=0)
    assert result["accuracy"] > 0.9
    assert result["auc"] > 0.9


def test_deterministic_and_rng_untouched(faces):
    real, fake = faces[:32], uniform_noise(faces[:32]) // 4 + faces[32:64] // 2
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = c2st(real, fake, steps=40, batch=16, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = c2st(real, fake, steps=40, batch=16, seed=3)
    assert first["accuracy"] == second["accuracy"]
    assert first["auc"] == second["auc"]
    assert first["train_loss"] == second["train_loss"]
    np.testing.assert_array_equal(first["probs"], second["probs"])
    np.testing.assert_array_equal(first["labels"], second["labels"])
    other = c2st(real, fake, steps=40, batch=16, seed=4)
    assert not np.array_equal(first["probs"], other["probs"])


def test_uint8_equals_float_input(faces):
    real, fake = faces[:32], uniform_noise(faces[:32])
    from_uint8 = c2st(real, fake, steps=10, batch=16, seed=0)
    from_float = c2st(real.float() / 127.5 - 1, fake.float() / 127.5 - 1, steps=10, batch=16, seed=0)
    np.testing.assert_array_equal(from_uint8["probs"], from_float["probs"])


def test_unbalanced_sets_truncated(faces):
    result = c2st(faces[:40], faces[40:60], steps=5, batch=8, seed=0, holdout=0.25)
    assert result["n_train"] + result["n_test"] == 40
    assert result["n_test"] == 10
    assert result["labels"].tolist() == [0] * 5 + [1] * 5
    assert result["probs"].shape == (10,)
    assert ((result["probs"] >= 0) & (result["probs"] <= 1)).all()


def test_resolution_downsamples(faces):
    result = c2st(faces[:16], faces[16:32], steps=3, batch=8, seed=0, resolution=16)
    assert result["n_test"] == 16


def test_too_few_images():
    real = torch.zeros(7, 3, 16, 16, dtype=torch.uint8)
    fake = torch.zeros(50, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(C2STError, match="at least 8 images per class, got 7 real"):
        c2st(real, fake, steps=1, batch=4)


@pytest.mark.parametrize(
    "real, fake, message",
    [
        (torch.zeros(10, 3, 16, 16), torch.zeros(10, 3, 8, 8), "differ in shape"),
        (torch.full((10, 3, 8, 8), 2.0), torch.zeros(10, 3, 8, 8), r"must lie in \[-1, 1\]"),
        (torch.zeros(10, 8, 8), torch.zeros(10, 3, 8, 8), r"expected images of shape"),
        (torch.zeros(10, 3, 8, 8, dtype=torch.int32), torch.zeros(10, 3, 8, 8), "dtype"),
        (torch.full((10, 3, 8, 8), float("nan")), torch.zeros(10, 3, 8, 8), "NaN"),
    ],
)
def test_invalid_images(real, fake, message):
    with pytest.raises(C2STError, match=message):
        c2st(real, fake, steps=1, batch=4)


def test_invalid_holdout():
    images = torch.zeros(10, 3, 8, 8)
    with pytest.raises(C2STError, match="holdout"):
        c2st(images, images, steps=1, batch=4, holdout=1.0)


@pytest.mark.parametrize(
    "scores, labels, expected",
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),
        # The positive at 0.4 beats one negative and ties the other: (1 + 0.5 + 2) / 4.
        ([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1], 0.875),
        # The positive at 0.2 ties both negatives: (0.5 + 0.5 + 2) / 4.
        ([0.2, 0.2, 0.2, 0.9], [1, 0, 0, 1], 0.75),
        ([0.3, 0.1, 0.7], [1, 0, 0], 0.5),
    ],
)
def test_auc_hand_cases(scores, labels, expected):
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_auc_matches_pair_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # few distinct values, so many ties
    labels = rng.integers(0, 2, size=40)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = 0.0
    for positive, negative in itertools.product(positives, negatives):
        if positive > negative:
            wins += 1.0
        elif positive == negative:
            wins += 0.5
    assert roc_auc(scores, labels) == pytest.approx(wins / (positives.size * negatives.size))


def test_auc_needs_both_classes():
    with pytest.raises(C2STError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(C2STError, match="0 or 1"):
        roc_auc([0.1, 0.2], [0, 2])


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    probs = np.clip(0.5 + 0.2 * (labels - 0.5) + rng.normal(0, 0.2, size=100), 0, 1)
    ci = c2st_bootstrap_ci(probs, labels, rounds=300, seed=0)
    accuracy = float(((probs > 0.5) == labels).mean())
    auc = roc_auc(probs, labels)
    assert ci["accuracy"][0] <= accuracy <= ci["accuracy"][1]
    assert ci["auc"][0] <= auc <= ci["auc"][1]
    assert ci["auc"][1] - ci["auc"][0] > 0.01
    assert c2st_bootstrap_ci(probs, labels, rounds=300, seed=0) == ci
    separated = c2st_bootstrap_ci([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], rounds=50, seed=0)
    assert separated == {"accuracy": (1.0, 1.0), "auc": (1.0, 1.0)}


def test_bootstrap_ci_invalid():
    with pytest.raises(C2STError, match="both classes"):
        c2st_bootstrap_ci([0.1, 0.2], [0, 0], rounds=10)
    with pytest.raises(C2STError, match="2 probabilities but 3 labels"):
        c2st_bootstrap_ci([0.1, 0.2], [0, 1, 1], rounds=10)


def test_from_config_uses_fields(faces):
    cfg = dataclasses.replace(MetricsConfig(), c2st_steps=3, c2st_batch=8, c2st_holdout=0.25, c2st_resolution=16)
    result = c2st_from_config(faces[:16], faces[16:32], cfg, seed=0)
    assert result["steps"] == 3
    assert result["n_test"] == 8
