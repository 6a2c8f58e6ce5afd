"""Classifier two-sample test (C2ST) between real and generated images.

Lopez-Paz and Oquab, "Revisiting Classifier Two-Sample Tests", ICLR 2017: train a
classifier to tell the two sets apart and measure it on held-out images. Held-out
accuracy near 0.5 (and ROC AUC near 0.5) means the classifier found no difference
that it could learn within its budget; 1.0 means the sets are fully separable.

The classifier is a fresh small CNN trained on pixels, so the test does not depend
on pretrained feature extractors. Its result depends on the budget (steps, batch,
learning rate and network size), so compare C2ST numbers only between runs measured
with the same settings.

Labels: 0 = real, 1 = fake; the returned probabilities are P(fake).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

MIN_PER_CLASS = 8  # fewer images per class leave too few held-out images for any estimate


class C2STError(ValueError):
    """Invalid input to the classifier two-sample test."""


class SmallCNN(nn.Module):
    """Binary image classifier: four 3x3 convolutions (three with stride 2), GroupNorm, SiLU,
    global average pooling and a linear layer returning one logit.

    About 65k parameters for 3 input channels at the default width of 32.
    """

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        widths = [width, width, 2 * width, 2 * width]
        strides = [1, 2, 2, 2]
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, stride in zip(widths, strides):
            layers.append(nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1))
            layers.append(nn.GroupNorm(min(8, out_channels), out_channels))
            layers.append(nn.SiLU())
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [B, C, H, W] in [-1, 1] to logits [B] of P(fake)."""
        h = self.features(x).mean(dim=(2, 3))
        return self.head(h).squeeze(1)


def to_unit_range(images: torch.Tensor, name: str) -> torch.Tensor:
    """Convert uint8 [0, 255] or float [-1, 1] images [N, C, H, W] to float32 in [-1, 1] on the CPU."""
    if not isinstance(images, torch.Tensor):
        raise C2STError(f"{name}: expected a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise C2STError(
            f"{name}: expected images of shape [N, 3, H, W] (or [N, 1, H, W]), got {list(images.shape)}"
        )
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise C2STError(f"{name}: expected uint8 [0, 255] or float [-1, 1] images, got dtype {images.dtype}")
    images = images.float()
    if images.numel() and not torch.isfinite(images).all():
        raise C2STError(f"{name}: contains NaN or infinite values")
    # A small tolerance accepts rounding after arithmetic on [-1, 1] images.
    if images.numel() and (images.min() < -1.01 or images.max() > 1.01):
        raise C2STError(
            f"{name}: float images must lie in [-1, 1], got [{images.min():.3f}, {images.max():.3f}]; "
            "pass uint8 [0, 255] images or rescale with x / 127.5 - 1"
        )
    return images.clamp(-1.0, 1.0)


def roc_auc(scores, labels) -> float:
    """Compute the ROC AUC of `scores` for binary `labels` (1 = positive) with the rank formula.

    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), where R_pos is the sum of the
    positives' ranks among all scores. Tied scores get their average rank, so a tie
    between a positive and a negative counts one half (the Mann-Whitney U statistic).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise C2STError(f"roc_auc: {scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise C2STError(f"roc_auc: labels must be 0 or 1, got values {np.unique(labels).tolist()}")
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise C2STError(f"roc_auc: both classes are required, got {n_pos} positives and {n_neg} negatives")
    ranks = scipy.stats.rankdata(scores, method="average")
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    # P(fake) > 0.5 predicts fake, and exactly 0.5 predicts real.
    return float(((probs > 0.5).astype(np.int64) == labels).mean())


def _resize(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if resolution is None or images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)


def _split(n_available: int, n_keep: int, n_test: int, generator: torch.Generator):
    """Pick n_keep of n_available images at random and split them into (train, test) indices."""
    order = torch.randperm(n_available, generator=generator)[:n_keep]
    return order[n_test:], order[:n_test]


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device) -> np.ndarray:
    model.eval()
    probs = []
    for start in range(0, images.shape[0], batch):
        logits = model(images[start : start + batch].to(device))
        probs.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(probs).numpy().astype(np.float64)


def c2st(
    real: torch.Tensor,
    fake: torch.Tensor,
    steps: int = 300,
    batch: int = 64,
    seed: int = 0,
    holdout: float = 0.5,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    resolution: int | None = None,
    width: int = 32,
) -> dict:
    """Train a fresh SmallCNN to separate `real` from `fake` and measure it on held-out images.

    real, fake: [N, C, H, W] uint8 in [0, 255] or float in [-1, 1], same C, H and W.
    Both sets are cut to the same size (a seeded random subset of the larger one), and
    `holdout` of each class is held out, so the test set is balanced. The classifier
    trains for `steps` Adam steps on shuffled minibatches with random horizontal flips.
    `resolution` resizes both sets first (antialiased bilinear); None keeps their size.

    Returns a dict: accuracy and auc on the held-out set, n_train and n_test (images,
    both classes together), steps, train_loss (mean BCE of the last 10 % of steps),
    probs (held-out P(fake), numpy float64) and labels (held-out, 0 = real, 1 = fake)
    for `c2st_bootstrap_ci`.

    On the CPU the result is a function of the inputs and the arguments only: every random
    choice uses a generator seeded from `seed`, and the caller's global RNG state is
    restored afterwards.
    NOTE: on CUDA, cuDNN convolution backward passes may be nondeterministic, so repeated
    GPU runs can differ slightly unless the caller enables torch.use_deterministic_algorithms.
    """
    real = to_unit_range(real, "real")
    fake = to_unit_range(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise C2STError(
            f"real and fake images differ in shape: {list(real.shape[1:])} vs {list(fake.shape[1:])}; "
            "resize them to the same [C, H, W] first"
        )
    if not 0.0 < holdout < 1.0:
        raise C2STError(f"holdout must be a fraction in (0, 1), got {holdout}")
    if steps < 1 or batch < 2:
        raise C2STError(f"steps must be >= 1 and batch >= 2, got steps={steps}, batch={batch}")
    if resolution is not None and resolution < 4:
        raise C2STError(f"resolution must be at least 4 pixels or None, got {resolution}")
    n_per_class = min(real.shape[0], fake.shape[0])
    if n_per_class < MIN_PER_CLASS:
        raise C2STError(
            f"C2ST needs at least {MIN_PER_CLASS} images per class, got {real.shape[0]} real and "
            f"{fake.shape[0]} fake; generate or load more images"
        )
    n_test = max(1, round(holdout * n_per_class))
    n_train = n_per_class - n_test
    if n_train < 1:
        raise C2STError(f"holdout={holdout} leaves no training images out of {n_per_class} per class")

    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        # Parameter initialisation draws from the global RNG, which fork_rng restores on exit.
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)

        real_train, real_test = _split(real.shape[0], n_per_class, n_test, generator)
        fake_train, fake_test = _split(fake.shape[0], n_per_class, n_test, generator)
        train_images = _resize(torch.cat([real[real_train], fake[fake_train]]), resolution)
        test_images = _resize(torch.cat([real[real_test], fake[fake_test]]), resolution)
        train_labels = torch.cat([torch.zeros(n_train), torch.ones(n_train)])
        test_labels = np.concatenate([np.zeros(n_test, np.int64), np.ones(n_test, np.int64)])

        model = SmallCNN(in_channels=real.shape[1], width=width).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        batch = min(batch, train_images.shape[0])
        losses = []
        order = torch.empty(0, dtype=torch.long)
        position = 0
        model.train()
        for _ in range(steps):
            if position + batch > order.numel():
                # Start a new epoch with a new shuffle. Images left over from the last epoch are dropped.
                order = torch.randperm(train_images.shape[0], generator=generator)
                position = 0
            index = order[position : position + batch]
            position += batch
            x = train_images[index]
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x.to(device))
            loss = F.binary_cross_entropy_with_logits(logits.float(), train_labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        probs = _predict(model, test_images, max(batch, 64), device)

    tail = losses[-max(1, math.ceil(0.1 * steps)) :]
    return {
        "accuracy": _accuracy(probs, test_labels),
        "auc": roc_auc(probs, test_labels),
        "n_train": 2 * n_train,
        "n_test": 2 * n_test,
        "steps": steps,
        "train_loss": float(np.mean(tail)),
        "probs": probs,
        "labels": test_labels,
    }


def c2st_bootstrap_ci(probs, labels, rounds: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Compute percentile bootstrap intervals of held-out accuracy and AUC.

    Each round resamples the held-out set with replacement within each class, so every
    resample keeps the class sizes and its AUC is defined. The intervals cover the
    uncertainty from the finite test set only, not from retraining the classifier.
    Returns {"accuracy": (lo, hi), "auc": (lo, hi)}.
    """
    probs = np.asarray(probs, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if probs.shape != labels.shape:
        raise C2STError(f"c2st_bootstrap_ci: {probs.size} probabilities but {labels.size} labels")
    if rounds < 1:
        raise C2STError(f"c2st_bootstrap_ci: rounds must be >= 1, got {rounds}")
    if not 0.0 < level < 1.0:
        raise C2STError(f"c2st_bootstrap_ci: level must be in (0, 1), got {level}")
    negatives = np.flatnonzero(labels == 0)
    positives = np.flatnonzero(labels == 1)
    if negatives.size == 0 or positives.size == 0 or negatives.size + positives.size != labels.size:
        raise C2STError("c2st_bootstrap_ci: labels must be 0 or 1 with both classes present")

    rng = np.random.default_rng(seed)
    accuracies = np.empty(rounds)
    aucs = np.empty(rounds)
    for i in range(rounds):
        index = np.concatenate([
            rng.choice(negatives, size=negatives.size, replace=True),
            rng.choice(positives, size=positives.size, replace=True),
        ])
        accuracies[i] = _accuracy(probs[index], labels[index])
        aucs[i] = roc_auc(probs[index], labels[index])
    tail = 100.0 * (1.0 - level) / 2.0
    return {
        "accuracy": tuple(float(v) for v in np.percentile(accuracies, [tail, 100.0 - tail])),
        "auc": tuple(float(v) for v in np.percentile(aucs, [tail, 100.0 - tail])),
    }


def c2st_from_config(real: torch.Tensor, fake: torch.Tensor, metrics_cfg, seed: int = 0, device="cpu") -> dict:
    """Run `c2st` with the c2st_* settings of a MetricsConfig."""
    return c2st(
        real,
        fake,
        steps=metrics_cfg.c2st_steps,
        batch=metrics_cfg.c2st_batch,
        seed=seed,
        holdout=metrics_cfg.c2st_holdout,
        lr=metrics_cfg.c2st_lr,
        device=device,
        resolution=metrics_cfg.c2st_resolution,
    )
