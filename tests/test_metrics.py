"""Tests of common/metrics.py.

The full Inception network costs about 6 GFLOP per image on a CPU, so only the
module-scoped fixtures run it, on four 32 px face crops from scikit-image. Everything
else uses a tiny stand-in extractor or synthetic feature arrays.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common import metrics
from common.config import Config, MetricsConfig
from common.metrics import (
    Features,
    InceptionWeightsError,
    MetricError,
    MetricWarning,
    bootstrap_ci,
    build_extractor,
    compute_metrics,
    density_coverage,
    extract_from_files,
    extract_from_images,
    fid,
    inception_score,
    kid,
    memorization_report,
    nearest_neighbours,
    paired_bootstrap,
    precision_recall,
    random_inception_state_dict,
    reference_features,
    save_random_inception_weights,
)

torch.set_num_threads(2)

LOGGER = "common.metrics"


# --- helpers -------------------------------------------------------------------------------


class TinyExtractor(nn.Module):
    """Stand-in for Inception: 4 x 4 average pooling as 'pool' features, a linear layer as logits."""

    def __init__(self, name: str = "tiny"):
        super().__init__()
        self.name = name
        self.comparable_to_literature = False
        self.calls = 0
        generator = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(48, 10)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(10, 48, generator=generator))

    def forward(self, images):
        self.calls += 1
        pool = F.adaptive_avg_pool2d(images, 4).flatten(1)  # [B, 3 * 4 * 4]
        return pool, self.fc(pool)


def _write_images(root: Path, count: int, size: int = 32, seed: int = 0) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        path = root / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    return files


def _load_uint8(files: list[str]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _feats(pool, logits=None, name="synthetic") -> Features:
    return Features(pool=np.asarray(pool, dtype=np.float64), logits=logits, extractor=name)


def _gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> Features:
    return _feats(np.random.default_rng(seed).normal(shift, 1.0, (n, dim)))


# --- Inception against pytorch-fid ---------------------------------------------------------


@pytest.fixture(scope="module")
def face_files(tmp_path_factory) -> list[str]:
    from skimage.data import lfw_subset

    root = tmp_path_factory.mktemp("faces")
    faces = lfw_subset()[:4]  # 25 x 25 gray floats in [0, 1]
    files = []
    for i, face in enumerate(faces):
        gray = Image.fromarray((face * 255).round().astype(np.uint8)).resize((32, 32), Image.Resampling.BICUBIC)
        path = root / f"face{i}.png"
        gray.convert("RGB").save(path)
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache contains the inception-random weights under pytorch-fid's file name."""
    home = tmp_path_factory.mktemp("torch_home")
    save_random_inception_weights(home / "hub" / "checkpoints" / metrics.FID_WEIGHTS_NAME, seed=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def random_extractor(torch_home):
    return build_extractor(MetricsConfig(features="inception-random"))


@pytest.fixture(scope="module")
def ours(face_files, random_extractor):
    return extract_from_files(face_files, random_extractor, batch_size=3, progress=False)


def test_pool_matches_pytorch_fid(face_files, torch_home, ours):
    from pytorch_fid.fid_score import get_activations
    from pytorch_fid.inception import InceptionV3

    reference_model = InceptionV3([3])  # loads $TORCH_HOME/hub/checkpoints/pt_inception-...pth
    expected = get_activations(face_files, reference_model, batch_size=4, device="cpu", num_workers=0)

    assert ours.pool.shape == (4, 2048)
    assert np.abs(ours.pool - expected).max() < 1e-5
    # Random weights must still give features that differ between images.
    assert ours.pool.std(axis=0).mean() > 1e-4


def test_logits_match_full_network(face_files, torch_home, ours):
    from pytorch_fid.inception import fid_inception_v3

    network = fid_inception_v3().eval()  # the full network, fc included, same file
    images = _load_uint8(face_files).float() / 255
    resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = network(2 * resized - 1).numpy()

    assert ours.logits.shape == (4, 1008)
    assert np.abs(ours.logits - expected).max() < 1e-4


def test_extractor_identity(ours, random_extractor):
    assert random_extractor.name == "inception-random-seed0"
    assert ours.extractor == "inception-random-seed0"
    assert ours.comparable_to_literature is False


def test_weights_file_marks_custom(torch_home, random_extractor):
    path = torch_home / "hub" / "checkpoints" / metrics.FID_WEIGHTS_NAME

    with pytest.warns(MetricWarning, match="not the pytorch-fid weights"):
        from_file = build_extractor(MetricsConfig(inception_weights=str(path)))

    assert from_file.name.startswith("inception-v3-custom-")
    assert from_file.comparable_to_literature is False
    expected = random_extractor.state_dict()
    for key, value in from_file.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_hub_cache_default_path(torch_home, monkeypatch):
    sha = metrics._sha256(torch_home / "hub" / "checkpoints" / metrics.FID_WEIGHTS_NAME)
    monkeypatch.setattr(metrics, "FID_WEIGHTS_SHA256_PREFIX", sha[:8])

    extractor = build_extractor(Config(offline=True))  # no inception_weights: the hub cache

    assert extractor.name == "inception-v3-fid"
    assert extractor.comparable_to_literature is True


def test_random_init_ignores_global_rng():
    torch.manual_seed(1)
    first = random_inception_state_dict(seed=0)
    after_first = torch.rand(3)
    torch.manual_seed(2)
    second = random_inception_state_dict(seed=0)

    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)  # the global stream did not advance
    assert "fc.weight" in first
    assert first["fc.weight"].shape == (1008, 2048)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_offline_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    expected_path = str(tmp_path / "empty" / "hub" / "checkpoints" / metrics.FID_WEIGHTS_NAME)

    with pytest.raises(InceptionWeightsError) as caught:
        build_extractor(Config(offline=True))

    message = str(caught.value)
    assert expected_path in message
    assert "metrics.inception_weights" in message
    assert "metrics.features=inception-random" in message
    assert "fid_inception_v3()" in message


def test_offline_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(InceptionWeightsError, match="offline"):
        build_extractor(MetricsConfig())


def test_missing_configured_weights(tmp_path):
    missing = tmp_path / "nowhere.pth"

    with pytest.raises(InceptionWeightsError, match=str(missing)):
        build_extractor(MetricsConfig(inception_weights=str(missing)))


def test_wrong_weights_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)

    with pytest.raises(InceptionWeightsError, match="do not fit"):
        build_extractor(MetricsConfig(inception_weights=str(path)))


# --- extraction plumbing (tiny extractor) --------------------------------------------------


def test_images_match_files(tmp_path):
    files = _write_images(tmp_path / "img", 7)
    extractor = TinyExtractor()
    images = _load_uint8(files)

    from_files = extract_from_files(files, extractor, batch_size=3, progress=False)
    from_tensor = extract_from_images(images, extractor, batch_size=2, progress=False)
    from_numpy = extract_from_images(images.permute(0, 2, 3, 1).numpy(), extractor, batch_size=4, progress=False)
    from_batches = extract_from_images(iter(images.split(3)), extractor, progress=False)

    for other in (from_tensor, from_numpy, from_batches):
        assert np.array_equal(other.pool, from_files.pool)
        # The linear layer's float32 sums may differ in the last bits between batch sizes.
        assert np.allclose(other.logits, from_files.logits, atol=1e-5)
    assert from_files.extractor == "tiny"


def test_float_images_rejected():
    with pytest.raises(MetricError, match="uint8"):
        extract_from_images(torch.rand(2, 3, 8, 8), TinyExtractor(), progress=False)


def test_workers_match_main_process(tmp_path):
    files = _write_images(tmp_path / "img", 5)

    serial = extract_from_files(files, TinyExtractor(), batch_size=2, num_workers=0, progress=False)
    parallel = extract_from_files(files, TinyExtractor(), batch_size=2, num_workers=2, progress=False)

    assert np.array_equal(serial.pool, parallel.pool)


def test_mixed_sizes_per_image(tmp_path):
    files = _write_images(tmp_path / "a", 2, size=16) + _write_images(tmp_path / "b", 1, size=24, seed=5)
    extractor = TinyExtractor()

    together = extract_from_files(files, extractor, batch_size=3, progress=False)

    for i, name in enumerate(files):
        alone = extract_from_files([name], extractor, batch_size=1, progress=False)
        assert np.allclose(together.pool[i], alone.pool[0], atol=1e-6)


def test_resolution_uses_data_preprocess(tmp_path):
    from common.data import open_rgb, preprocess

    files = _write_images(tmp_path / "img", 2, size=40)

    features = extract_from_files(files, TinyExtractor(), resolution=16, progress=False)

    image = np.array(preprocess(open_rgb(files[0]), 16, "lanczos"))
    expected, _ = TinyExtractor()(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    assert np.allclose(features.pool[0], expected[0].detach().numpy(), atol=1e-6)


def test_rank_shard_positions(tmp_path, monkeypatch):
    # Without a process group, rank 1 of 2 fills its own rows and leaves rank 0's at zero.
    files = _write_images(tmp_path / "img", 5)
    full = extract_from_files(files, TinyExtractor(), progress=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    shard = extract_from_files(files, TinyExtractor(), batch_size=2, progress=False)

    assert np.array_equal(shard.pool[1::2], full.pool[1::2])
    assert not shard.pool[0::2].any()


def _gloo_worker(rank: int, world: int, init_file: str, files: list[str], out_dir: str) -> None:
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        features = extract_from_files(files, TinyExtractor(), batch_size=2, progress=False)
        images = _load_uint8(files)
        mine = list(range(rank, len(files), world))
        batches = iter(images[mine].split(2))
        generated = extract_from_images(batches, TinyExtractor(), index=mine, total=len(files), progress=False)
        np.savez(Path(out_dir) / f"rank{rank}.npz", pool=features.pool, generated=generated.pool)
        torch_dist.barrier()  # neither rank tears down gloo while the other still uses it
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_gather_two_ranks(tmp_path):
    import torch.multiprocessing as torch_mp

    files = _write_images(tmp_path / "img", 5)
    expected = extract_from_files(files, TinyExtractor(), progress=False).pool

    torch_mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), files, str(tmp_path)), nprocs=2)

    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as data:
            assert np.array_equal(data["pool"], expected), rank
            assert np.array_equal(data["generated"], expected), rank


def test_batches_need_index_with_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    batches = iter([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)])

    with pytest.raises(MetricError, match="index"):
        extract_from_images(batches, TinyExtractor(), progress=False)


# --- reference cache -----------------------------------------------------------------------


def test_cache_reused(tmp_path, caplog):
    files = _write_images(tmp_path / "img", 4)
    cfg = MetricsConfig(cache_dir=str(tmp_path / "cache"), batch_size=2)
    extractor = TinyExtractor()
    caplog.set_level(logging.INFO, logger=LOGGER)

    first = reference_features(files, extractor, cfg, progress=False)
    calls = extractor.calls
    second = reference_features(list(reversed(files)), extractor, cfg, progress=False)

    assert calls == 2
    assert extractor.calls == calls  # the second call read the cache
    assert "computing reference statistics" in caplog.text
    assert "using cached reference statistics" in caplog.text
    assert np.array_equal(first.pool, second.pool)
    assert np.allclose(second.stats()[0], first.pool.astype(np.float64).mean(axis=0))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_rewrite_invalidates(tmp_path):
    files = _write_images(tmp_path / "img", 4)
    cfg = MetricsConfig(cache_dir=str(tmp_path / "cache"))
    extractor = TinyExtractor()
    before = reference_features(files, extractor, cfg, progress=False)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(files[2])

    after = reference_features(files, extractor, cfg, progress=False)

    assert extractor.calls == 2
    assert not np.array_equal(before.pool[2], after.pool[2])
    assert np.array_equal(before.pool[1], after.pool[1])


def test_cache_touch_invalidates(tmp_path):
    files = _write_images(tmp_path / "img", 3)
    cfg = MetricsConfig(cache_dir=str(tmp_path / "cache"))
    extractor = TinyExtractor()
    reference_features(files, extractor, cfg, progress=False)
    stat = os.stat(files[0])
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    reference_features(files, extractor, cfg, progress=False)

    assert extractor.calls == 2


def test_cache_per_extractor(tmp_path):
    files = _write_images(tmp_path / "img", 3)
    cfg = MetricsConfig(cache_dir=str(tmp_path / "cache"))
    reference_features(files, TinyExtractor("a"), cfg, progress=False)
    other = TinyExtractor("b")

    features = reference_features(files, other, cfg, progress=False)

    assert other.calls == 1
    assert features.extractor == "b"


def test_cache_corrupt_recomputed(tmp_path, caplog):
    files = _write_images(tmp_path / "img", 3)
    cfg = MetricsConfig(cache_dir=str(tmp_path / "cache"))
    extractor = TinyExtractor()
    reference_features(files, extractor, cfg, progress=False)
    (cached,) = (tmp_path / "cache").glob("*.npz")
    cached.write_bytes(b"not a zip file")

    features = reference_features(files, extractor, cfg, progress=False)

    assert extractor.calls == 2
    assert "ignoring unreadable reference cache" in caplog.text
    assert features.pool.shape == (3, 48)


def test_cache_real_max(tmp_path):
    files = _write_images(tmp_path / "img", 5)
    cfg = MetricsConfig(cache_dir=str(tmp_path / "cache"), real_max=3)

    features = reference_features(files, TinyExtractor(), cfg, progress=False)

    full = extract_from_files(sorted(files)[:3], TinyExtractor(), progress=False)
    assert np.array_equal(features.pool, full.pool)


def test_bad_image_names_file(tmp_path):
    files = _write_images(tmp_path / "img", 2)
    Path(files[1]).write_bytes(b"\x89PNG broken")

    with pytest.raises(ValueError, match="001.png"):
        extract_from_files(files, TinyExtractor(), progress=False)


# --- FID -----------------------------------------------------------------------------------


def test_fid_self_near_zero():
    real = _gaussian(400, 8, seed=0)

    assert abs(fid(real, real)["fid"]) < 1e-6


def test_fid_equals_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    real, fake = _gaussian(300, 6, seed=1), _gaussian(200, 6, seed=2, shift=0.5)
    mu_r, sigma_r = real.pool.mean(axis=0), np.cov(real.pool, rowvar=False)
    mu_f, sigma_f = fake.pool.mean(axis=0), np.cov(fake.pool, rowvar=False)

    value = fid(real, fake)["fid"]

    assert value == pytest.approx(calculate_frechet_distance(mu_f, sigma_f, mu_r, sigma_r), rel=1e-12)
    assert value > 6 * 0.5**2 * 0.8  # the mean shift alone contributes 1.5


def test_fid_few_samples_warns():
    real, fake = _gaussian(10, 16, seed=0), _gaussian(12, 16, seed=1)

    with pytest.warns(MetricWarning, match="10 real and 12 fake samples of 16-d"):
        fid(real, fake)


def test_fid_imaginary_error(monkeypatch):
    import pytorch_fid.fid_score

    def imaginary(*args, **kwargs):
        raise ValueError("Imaginary component 0.3")

    monkeypatch.setattr(pytorch_fid.fid_score, "calculate_frechet_distance", imaginary)
    real, fake = _gaussian(5, 16, seed=0), _gaussian(5, 16, seed=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        with pytest.raises(MetricError, match="at least 17 samples"):
            fid(real, fake)


# --- KID -----------------------------------------------------------------------------------


def _kid_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    m, dim = len(x), x.shape[1]

    def kernel(a, b):
        return (sum(a[i] * b[i] for i in range(dim)) / dim + 1) ** 3

    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_hand_computed():
    x = np.array([[0.0, 1.0], [1.0, 0.5], [2.0, -1.0], [0.5, 0.5]])
    y = np.array([[1.0, 1.0], [3.0, 0.0], [-1.0, 2.0], [0.0, 0.0]])
    cfg = MetricsConfig(kid_subset_size=4, kid_subsets=3)

    result = kid(_feats(x), _feats(y), cfg)

    # Subsets of the full size are permutations, which leave the unbiased estimate unchanged.
    assert result["kid"] == pytest.approx(_kid_by_loops(x, y), rel=1e-12)
    assert result["kid_std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_subset_mean():
    real, fake = _gaussian(6, 3, seed=0), _gaussian(6, 3, seed=1, shift=1.0)
    cfg = MetricsConfig(kid_subset_size=3, kid_subsets=200)

    result = kid(real, fake, cfg)

    # The mean over random 3-subsets estimates the mean over all pairs of 3-subsets.
    combos = list(itertools.combinations(range(6), 3))
    exact = np.mean([_kid_by_loops(real.pool[list(a)], fake.pool[list(b)]) for a in combos for b in combos])
    assert result["kid"] == pytest.approx(exact, rel=0.15)
    assert result["kid_std"] > 0


def test_kid_round_skips_copies():
    x = np.random.default_rng(0).normal(size=(5, 3))
    y = np.random.default_rng(1).normal(size=(4, 3))
    rows = np.array([0, 0, 2, 3, 3])  # a resample with two duplicated points
    cfg = MetricsConfig(kid_subset_size=100)

    round_value = metrics.metric_function("kid", cfg)(_feats(x).take(rows), _feats(y))["kid"]

    # Pairs of copies of one point are left out like the pairs of a point with itself.
    dim, xr = 3, x[rows]
    k_xx = (xr @ xr.T / dim + 1) ** 3
    distinct = rows[:, None] != rows[None, :]
    k_yy = (y @ y.T / dim + 1) ** 3
    expected = (k_xx[distinct].mean() + (k_yy.sum() - np.trace(k_yy)) / (4 * 3)
                - 2 * ((xr @ y.T / dim + 1) ** 3).mean())
    assert round_value == pytest.approx(expected, rel=1e-12)


def test_kid_bootstrap_contains_estimate():
    real, fake = _gaussian(200, 4, seed=0), _gaussian(150, 4, seed=1, shift=0.3)
    cfg = MetricsConfig(kid_subset_size=1000)

    point = kid(real, fake, cfg)["kid"]
    low, high = bootstrap_ci(real, fake, metrics.metric_function("kid", cfg), rounds=30, seed=0)["kid"]

    assert low <= point <= high


def test_kid_few_samples_warns():
    x, y = _gaussian(5, 2, seed=0), _gaussian(7, 2, seed=1)
    cfg = MetricsConfig(kid_subset_size=1000, kid_subsets=2)

    with pytest.warns(MetricWarning, match="5 real and 7 fake samples.*subsets of 5"):
        result = kid(x, y, cfg)

    assert math.isfinite(result["kid"])


def test_kid_one_sample_error():
    with pytest.warns(MetricWarning):
        with pytest.raises(MetricError, match="at least 2 samples"):
            kid(_gaussian(1, 2, seed=0), _gaussian(4, 2, seed=1), MetricsConfig(kid_subsets=2))


# --- Inception Score -----------------------------------------------------------------------


def _is_by_loops(logits: list[list[float]], splits: int) -> tuple[float, float]:
    size = len(logits) // splits
    scores = []
    for s in range(splits):
        part = logits[s * size : (s + 1) * size]
        probs = []
        for row in part:
            total = sum(math.exp(v) for v in row)
            probs.append([math.exp(v) / total for v in row])
        classes = len(probs[0])
        marginal = [sum(p[c] for p in probs) / len(probs) for c in range(classes)]
        kl = [sum(p[c] * math.log(p[c] / marginal[c]) for c in range(classes)) for p in probs]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean = sum(scores) / splits
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)
    return mean, std


def test_is_hand_computed():
    logits = [[2.0, 0.0, -1.0], [0.0, 3.0, 0.5], [1.0, 1.0, 1.0], [-2.0, 0.0, 4.0], [0.3, -0.2, 0.1], [5.0, 0.0, 0.0]]
    fake = _feats(np.zeros((6, 2)), logits=np.array(logits))

    result = inception_score(fake, fake, MetricsConfig(is_splits=2))

    mean, std = _is_by_loops(logits, 2)
    assert result["is"] == pytest.approx(mean, rel=1e-12)
    assert result["is_std"] == pytest.approx(std, rel=1e-9)


def test_is_confident_uniform_classes():
    # Sharp predictions spread evenly over 5 classes give an IS of about 5.
    logits = 40.0 * np.eye(5)[np.arange(50) % 5]
    fake = _feats(np.zeros((50, 2)), logits=logits)

    result = inception_score(fake, fake, MetricsConfig(is_splits=2))

    assert result["is"] == pytest.approx(5.0, rel=1e-6)


def test_is_too_few_samples():
    fake = _feats(np.zeros((3, 2)), logits=np.zeros((3, 4)))

    with pytest.raises(MetricError, match="is_splits=10"):
        inception_score(fake, fake, MetricsConfig())


# --- precision, recall, density, coverage --------------------------------------------------


def _prdc_by_loops(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    def radii(points):
        result = []
        for p in points:
            d = sorted(np.linalg.norm(points - p, axis=1))
            result.append(d[k])  # d[0] is the point itself
        return result

    rx, ry = radii(x), radii(y)
    precision = np.mean([any(np.linalg.norm(f - x[i]) <= rx[i] for i in range(len(x))) for f in y])
    recall = np.mean([any(np.linalg.norm(r - y[j]) <= ry[j] for j in range(len(y))) for r in x])
    density = sum(np.linalg.norm(f - x[i]) <= rx[i] for f in y for i in range(len(x))) / (k * len(y))
    coverage = np.mean([min(np.linalg.norm(y - x[i], axis=1)) <= rx[i] for i in range(len(x))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_prdc_match_loops(monkeypatch):
    real, fake = _gaussian(40, 3, seed=3), _gaussian(30, 3, seed=4, shift=0.7)
    cfg = MetricsConfig(pr_k=3, dc_k=3)
    expected = _prdc_by_loops(real.pool, fake.pool, 3)
    # A tiny block budget forces many row chunks.
    original = metrics._row_chunks
    monkeypatch.setattr(metrics, "_row_chunks", lambda rows, columns: original(rows, columns, budget_bytes=8 * 7 * columns))

    result = {**precision_recall(real, fake, cfg), **density_coverage(real, fake, cfg)}

    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < result["precision"] < 1


def test_identical_sets_full_scores():
    points = _gaussian(200, 4, seed=0)
    cfg = MetricsConfig(pr_k=3, dc_k=5)

    pr = precision_recall(points, points, cfg)
    dc = density_coverage(points, points, cfg)

    assert pr["precision"] == 1.0
    assert pr["recall"] == 1.0
    assert dc["coverage"] == 1.0
    # Each real ball contains its centre and its k neighbours: k + 1 hits per ball, except where
    # cdist's rounding puts the k-th neighbour (an exact tie) just outside.
    assert dc["density"] == pytest.approx(6 / 5, abs=0.03)


def test_separated_clouds_zero():
    real, fake = _gaussian(150, 4, seed=0), _gaussian(150, 4, seed=1, shift=20.0)

    pr = precision_recall(real, fake, MetricsConfig())
    dc = density_coverage(real, fake, MetricsConfig())

    assert pr["precision"] < 0.01
    assert pr["recall"] < 0.01
    assert dc["density"] < 0.01
    assert dc["coverage"] < 0.01


def test_density_same_distribution():
    real, fake = _gaussian(1500, 3, seed=0), _gaussian(1500, 3, seed=1)

    dc = density_coverage(real, fake, MetricsConfig(dc_k=5))

    assert dc["density"] == pytest.approx(1.0, abs=0.1)
    assert dc["coverage"] > 0.9


def test_knn_too_few_samples():
    real, fake = _gaussian(3, 2, seed=0), _gaussian(10, 2, seed=1)

    with pytest.raises(MetricError, match="k=3.*at least 4.*metrics.pr_k"):
        precision_recall(real, fake, MetricsConfig(pr_k=3))
    with pytest.raises(MetricError, match="metrics.dc_k"):
        density_coverage(real, fake, MetricsConfig(dc_k=5))


# --- registry and compute_metrics ----------------------------------------------------------


def _with_logits(features: Features, seed: int) -> Features:
    features.logits = np.random.default_rng(seed).normal(size=(len(features), 7))
    return features


def test_compute_metrics_all():
    real = _with_logits(_gaussian(60, 4, seed=0), seed=0)
    fake = _with_logits(_gaussian(60, 4, seed=1, shift=0.3), seed=1)
    cfg = MetricsConfig(kid_subset_size=20, kid_subsets=5, is_splits=2)

    result = compute_metrics(real, fake, cfg)

    for key in ("fid", "kid", "kid_std", "is", "is_std", "precision", "recall", "density", "coverage"):
        assert isinstance(result[key], float), key
    assert result["extractor"] == "synthetic"
    assert result["comparable_to_literature"] is False
    assert result["num_real"] == 60


def test_compute_metrics_ci():
    real, fake = _gaussian(80, 3, seed=0), _gaussian(80, 3, seed=1, shift=0.5)
    cfg = MetricsConfig(bootstrap=20, bootstrap_metrics=["fid"])

    result = compute_metrics(real, fake, cfg, names=["fid"], ci=True)

    low, high = result["fid_ci95"]
    assert low <= result["fid"] <= high
    assert set(result) >= {"fid", "fid_ci95"}


def test_compute_metrics_unknown_name():
    real = _gaussian(10, 2, seed=0)

    with pytest.raises(MetricError, match="'fdi'"):
        compute_metrics(real, real, names=["fdi"])


def test_compute_metrics_mixed_extractors():
    real, fake = _gaussian(10, 2, seed=0), _gaussian(10, 2, seed=1)
    fake.extractor = "other"

    with pytest.raises(MetricError, match="same network"):
        compute_metrics(real, fake, names=["fid"])


# --- bootstrap -----------------------------------------------------------------------------


def _fid_value(real, fake):
    return fid(real, fake)["fid"]


def test_bootstrap_contains_estimate():
    real, fake = _gaussian(100, 3, seed=0), _gaussian(100, 3, seed=1, shift=0.4)

    low, high = bootstrap_ci(real, fake, _fid_value, rounds=100, seed=0)

    assert low < _fid_value(real, fake) < high


def test_bootstrap_shrinks_with_samples():
    small = bootstrap_ci(_gaussian(40, 3, 0), _gaussian(40, 3, 1, 0.4), _fid_value, rounds=60, seed=0)
    large = bootstrap_ci(_gaussian(640, 3, 0), _gaussian(640, 3, 1, 0.4), _fid_value, rounds=60, seed=0)

    assert large[1] - large[0] < 0.5 * (small[1] - small[0])


def test_bootstrap_deterministic():
    real, fake = _gaussian(50, 3, seed=0), _gaussian(50, 3, seed=1)

    first = bootstrap_ci(real, fake, _fid_value, rounds=10, seed=7)
    second = bootstrap_ci(real, fake, _fid_value, rounds=10, seed=7)

    assert first == second


def test_bootstrap_dict_metric():
    real, fake = _gaussian(50, 3, seed=0), _gaussian(50, 3, seed=1)

    intervals = bootstrap_ci(real, fake, lambda r, f: precision_recall(r, f, MetricsConfig()), rounds=10)

    assert set(intervals) == {"precision", "recall"}
    assert intervals["recall"][0] <= intervals["recall"][1]


def test_knn_resample_keeps_full_set_balls():
    real, fake = _gaussian(40, 3, seed=0), _gaussian(30, 3, seed=1, shift=0.3)
    real_rows = np.random.default_rng(0).integers(0, 40, 40)  # resamples with repeats
    fake_rows = np.random.default_rng(1).integers(0, 30, 30)

    pr = precision_recall(real.take(real_rows), fake.take(fake_rows), MetricsConfig(pr_k=3))
    dc = density_coverage(real.take(real_rows), fake.take(fake_rows), MetricsConfig(dc_k=5))

    # Brute force: balls of the full sets, terms averaged over the drawn rows.
    d_fake_real = np.linalg.norm(fake.pool[:, None] - real.pool[None], axis=2)
    real_balls3, real_balls5, fake_balls3 = _radii(real.pool, 3), _radii(real.pool, 5), _radii(fake.pool, 3)
    precision = (d_fake_real <= real_balls3[None]).any(axis=1)[fake_rows].mean()
    recall = (d_fake_real.T <= fake_balls3[None]).any(axis=1)[real_rows].mean()
    density = (d_fake_real <= real_balls5[None]).sum(axis=1)[fake_rows].mean() / 5
    coverage = (d_fake_real.min(axis=0) <= real_balls5)[real_rows].mean()
    assert pr["precision"] == pytest.approx(precision, abs=1e-12)
    assert pr["recall"] == pytest.approx(recall, abs=1e-12)
    assert dc["density"] == pytest.approx(density, abs=1e-12)
    assert dc["coverage"] == pytest.approx(coverage, abs=1e-12)


def _radii(points: np.ndarray, k: int) -> np.ndarray:
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    return np.sort(distances, axis=1)[:, k]


def test_knn_bootstrap_contains_estimate():
    # Balls rebuilt on each resample would count duplicates as neighbours, shrink and push
    # every round of precision, recall and coverage below the point estimate.
    real, fake = _gaussian(300, 4, seed=0), _gaussian(300, 4, seed=1, shift=0.2)
    cfg = MetricsConfig()

    point = {**precision_recall(real, fake, cfg), **density_coverage(real, fake, cfg)}
    intervals = {
        **bootstrap_ci(real, fake, lambda r, f: precision_recall(r, f, cfg), rounds=30, seed=0),
        **bootstrap_ci(real, fake, lambda r, f: density_coverage(r, f, cfg), rounds=30, seed=0),
    }

    for key, (low, high) in intervals.items():
        assert low <= point[key] <= high, (key, low, point[key], high)


def test_paired_same_sets_zero():
    real, fake = _gaussian(60, 3, seed=0), _gaussian(60, 3, seed=1)

    result = paired_bootstrap(real, fake, fake, _fid_value, rounds=20)

    assert result == {"delta": 0.0, "low": 0.0, "high": 0.0}


def test_paired_detects_shift():
    real = _gaussian(200, 3, seed=0)
    close = _gaussian(200, 3, seed=1, shift=0.1)
    far = _feats(close.pool + 0.6)  # the same samples moved away: shared noise

    result = paired_bootstrap(real, close, far, _fid_value, rounds=50, seed=0)

    assert result["delta"] < 0
    assert result["low"] <= result["delta"] <= result["high"]
    assert result["high"] < 0


def test_paired_size_mismatch():
    real = _gaussian(20, 3, seed=0)

    with pytest.raises(MetricError, match="same seeds"):
        paired_bootstrap(real, _gaussian(20, 3, 1), _gaussian(19, 3, 2), _fid_value, rounds=5)


# --- memorisation --------------------------------------------------------------------------


def test_nearest_neighbours_brute_force():
    query, reference = _gaussian(30, 5, seed=0).pool, _gaussian(25, 5, seed=1).pool

    dist, idx = nearest_neighbours(query, reference)
    self_dist, self_idx = nearest_neighbours(reference, reference, exclude_self=True)

    full = np.linalg.norm(query[:, None] - reference[None], axis=2)
    assert np.array_equal(idx, full.argmin(axis=1))
    assert np.allclose(dist, full.min(axis=1))
    within = np.linalg.norm(reference[:, None] - reference[None], axis=2)
    np.fill_diagonal(within, np.inf)
    assert np.array_equal(self_idx, within.argmin(axis=1))
    assert np.allclose(self_dist, within.min(axis=1))


def test_memorization_finds_copies():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 6))
    copied = np.arange(0, 300, 15)  # 20 training points
    fresh = rng.normal(size=(80, 6))
    fake = np.concatenate([train[copied] + 1e-3 * rng.normal(size=(20, 6)), fresh])

    report = memorization_report(fake, train, quantile=0.05, num_pairs=20)

    assert report["fraction_below"] >= 0.2
    assert report["fraction_below"] < 0.2 + 0.8 * 0.2
    closest = report["closest_pairs"]
    assert sorted(p["fake"] for p in closest) == list(range(20))
    assert all(p["train"] == copied[p["fake"]] for p in closest)
    assert closest[0]["distance"] <= closest[-1]["distance"] < report["threshold"]


def test_memorization_fresh_samples():
    rng = np.random.default_rng(1)
    train, fake = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))

    report = memorization_report(_feats(fake), _feats(train), quantile=0.05)

    assert report["expected_fraction"] == 0.05
    assert report["fraction_below"] < 0.15
    assert report["threshold"] < report["train_nn_median"]


def test_memorization_bad_quantile():
    points = np.zeros((4, 2))

    with pytest.raises(MetricError, match="quantile"):
        memorization_report(points, points, quantile=5)


def test_fast_frechet_equals_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    from common.metrics import Features, frechet_distance_fast

    rng = np.random.default_rng(0)
    real = Features(pool=rng.normal(size=(300, 16)).astype(np.float32), logits=None)
    fake = Features(pool=(rng.normal(size=(200, 16)) * 1.3 + 0.2).astype(np.float32), logits=None)
    expected = calculate_frechet_distance(*fake.stats(), *real.stats())
    assert frechet_distance_fast(real, fake) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_fast(real, real) == pytest.approx(0.0, abs=1e-8)
