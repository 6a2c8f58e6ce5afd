"""Sample-quality metrics on Inception features: FID, KID, IS, precision/recall,
density/coverage, bootstrap confidence intervals and a memorisation check.

One feature pass per image set gives every metric. The FID Inception network of
pytorch-fid 0.3.0 returns the 2048-d pool3 features, used by FID, KID,
precision/recall, density/coverage and nearest neighbours. Its own 1008-way fc layer
turns them into the logits of the Inception Score. Images go through pytorch-fid's
preprocessing: PIL RGB, `ToTensor` to [0, 1], then `InceptionV3(resize_input=True,
normalize_input=True)`, which resizes bilinearly to 299 x 299 and maps to [-1, 1].

Every result records the extractor name and whether its numbers are comparable to
published ones: only the original pytorch-fid weights are. The `inception-random`
extractor has the same architecture with a fixed-seed random initialisation, so the
whole pipeline runs offline, but its numbers only compare runs with each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn as nn

from common import dist

logger = logging.getLogger(__name__)

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash prefix torch.hub puts in the file name
POOL_DIM = 2048
NUM_LOGITS = 1008  # classes of the 2015-12-05 TensorFlow Inception graph
# Preprocessing of pytorch-fid 0.3.0, part of the reference cache key.
PREPROCESS_TAG = "pil-rgb/to-tensor-0-1/bilinear-299/scale-minus1-1"
_CACHE_FORMAT = 1


class MetricError(ValueError):
    """A metric that cannot be computed from the given inputs. The message names the cause and the fix."""


class InceptionWeightsError(MetricError):
    """The Inception weights file is missing or cannot be read."""


class MetricWarning(UserWarning):
    """A metric computed from too few samples to be trusted."""


def _metrics_cfg(cfg: Any):
    """Accept a full `Config`, a `MetricsConfig` or None (the defaults)."""
    from common.config import MetricsConfig

    if cfg is None:
        return MetricsConfig()
    return getattr(cfg, "metrics", cfg)


# --- features ------------------------------------------------------------------------------


@dataclasses.dataclass
class Features:
    """Features of one image set, rows in the order of the input files or images."""

    pool: np.ndarray  # [N, 2048] float32 pool3 activations
    logits: np.ndarray | None  # [N, 1008] float32 fc outputs before softmax
    extractor: str = "unknown"
    comparable_to_literature: bool = False
    # A bootstrap resample made by take(): `parent` is the full set, `origin` [N] the parent
    # row each row copies. Both None for a full set.
    origin: np.ndarray | None = dataclasses.field(default=None, repr=False)
    parent: Features | None = dataclasses.field(default=None, repr=False)
    _knn: dict = dataclasses.field(default_factory=dict, repr=False)  # per-point k-NN terms, see _knn_terms
    _stats: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.pool)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (mu, sigma) of the pool features in float64, as pytorch-fid computes them."""
        if self._stats is None:
            pool = self.pool.astype(np.float64)
            self._stats = (np.mean(pool, axis=0), np.cov(pool, rowvar=False))
        return self._stats

    def take(self, index: np.ndarray) -> Features:
        """Return the rows `index` (repeats allowed, as in a bootstrap resample).

        The result remembers the full set and the row of it that each of its rows copies,
        so that the k-NN metrics keep the manifolds of the full sets (see `_knn_terms`).
        """
        index = np.asarray(index)
        return Features(
            pool=self.pool[index],
            logits=None if self.logits is None else self.logits[index],
            extractor=self.extractor,
            comparable_to_literature=self.comparable_to_literature,
            origin=index if self.origin is None else self.origin[index],
            parent=self if self.parent is None else self.parent,
        )

    def full(self) -> tuple[Features, np.ndarray]:
        """Return (the full set, the rows of it that this set holds)."""
        if self.parent is None:
            return self, np.arange(len(self))
        return self.parent, self.origin


# --- Inception network ---------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """pytorch-fid's InceptionV3 plus the fc layer that its wrapper drops.

    forward: images [B, 3, H, W] float in [0, 1] -> (pool [B, 2048], logits [B, 1008]).
    """

    def __init__(self, fid_net: nn.Module, fc: nn.Linear, name: str, comparable_to_literature: bool):
        super().__init__()
        self.fid_net = fid_net
        self.fc = fc
        self.name = name
        self.comparable_to_literature = comparable_to_literature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.fid_net(images)[0].flatten(1)
        # torchvision's Inception3 applies dropout (identity in eval) between the pool and fc.
        return pool, self.fc(pool)


def _init_random(net: nn.Module) -> None:
    """Apply He init to convolutions and a unit-gain init to the fc layer.

    PyTorch's default conv init shrinks activations layer after layer: on 32 px images the
    mean |pool3| came out near 2e-8, against about 0.2 with He init.
    """
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.zeros_(module.bias)


def _build_fid_inception(state_dict: dict | None, seed: int) -> tuple[nn.Module, nn.Module]:
    """Build pytorch-fid's InceptionV3 (pool3 block); return it and the full FID network.

    `fid_inception_v3()` builds a torchvision Inception3 through `_inception_v3`, swaps in
    the FID blocks and loads weights through `load_state_dict_from_url`. Both names are
    patched for the duration of the build: the first records the full network (its fc
    layer is the one the wrapper drops), the second returns `state_dict` instead of
    downloading. With `state_dict=None` the network is initialised from `seed` instead,
    inside `fork_rng` so the global RNG state neither changes nor matters.
    NOTE: the patches are process-wide, so do not build two extractors from two threads at once.
    """
    import pytorch_fid.inception as fid_inception

    captured: dict[str, nn.Module] = {}
    build_torchvision = fid_inception._inception_v3

    def capture(*args, **kwargs):
        captured["net"] = build_torchvision(*args, **kwargs)
        return captured["net"]

    def provide_state_dict(url, *args, **kwargs):
        if state_dict is not None:
            return state_dict
        _init_random(captured["net"])
        return captured["net"].state_dict()

    with (
        mock.patch.object(fid_inception, "_inception_v3", capture),
        mock.patch.object(fid_inception, "load_state_dict_from_url", provide_state_dict),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(seed)
        try:
            fid_net = fid_inception.InceptionV3(
                output_blocks=[fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[POOL_DIM]],
                resize_input=True,
                normalize_input=True,
            )
        except RuntimeError as error:  # load_state_dict: missing or unexpected keys, wrong shapes
            raise InceptionWeightsError(
                f"the Inception weights do not fit pytorch-fid's FID Inception network: {error}"
            ) from None
    return fid_net, captured["net"]


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Return the state dict of `fid_inception_v3()` (fc included) with the fixed-seed random init."""
    _, full_net = _build_fid_inception(None, seed)
    return full_net.state_dict()


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write the `inception-random` weights (seed `seed`) where pytorch-fid can load them.

    Put the file at `$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth` and
    pytorch-fid loads exactly the weights of `metrics.features=inception-random`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(random_inception_state_dict(seed), tmp)
    os.replace(tmp, path)
    return path


def default_weights_path() -> Path:
    """Return where pytorch-fid (through torch.hub) looks for the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline_requested(cfg: Any, offline: bool | None) -> bool:
    if offline:
        return True
    if getattr(cfg, "offline", False) or getattr(_metrics_cfg(cfg), "offline", False):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _missing_weights_message(path: Path, reason: str) -> str:
    return (
        f"FID Inception weights {reason}: {path}. On a machine with internet access run "
        f"'python -c \"from pytorch_fid.inception import fid_inception_v3; fid_inception_v3()\"', "
        f"then copy ~/.cache/torch/hub/checkpoints/{FID_WEIGHTS_NAME} to {path} or set "
        f"metrics.inception_weights=PATH. To run without them, set "
        f"metrics.features=inception-random (numbers then compare runs with each other only)."
    )


def _load_weights(cfg: Any, offline: bool | None) -> tuple[dict, Path]:
    mcfg = _metrics_cfg(cfg)
    path = Path(mcfg.inception_weights).expanduser() if mcfg.inception_weights else default_weights_path()
    if not path.is_file():
        if mcfg.inception_weights:
            raise InceptionWeightsError(_missing_weights_message(path, "not found (metrics.inception_weights)"))
        if _offline_requested(cfg, offline):
            raise InceptionWeightsError(_missing_weights_message(path, "not found and downloads are disabled (offline)"))
        from pytorch_fid.inception import FID_WEIGHTS_URL

        logger.info("downloading the FID Inception weights from %s to %s", FID_WEIGHTS_URL, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), progress=dist.is_main())
        except OSError as error:  # URLError and HTTPError are OSErrors
            raise InceptionWeightsError(_missing_weights_message(path, f"download failed ({error})")) from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise InceptionWeightsError(_missing_weights_message(path, f"unreadable ({error})")) from None
    if not isinstance(state_dict, dict):
        raise InceptionWeightsError(_missing_weights_message(path, "do not contain a state dict"))
    return state_dict, path


def build_extractor(cfg: Any = None, device: str | torch.device = "cpu", offline: bool | None = None) -> InceptionFeatures:
    """Build the feature extractor chosen by `metrics.features`, in eval mode on `device`.

    `inception` loads the pytorch-fid weights from `metrics.inception_weights`, else from
    the torch.hub cache; when the file is missing it is downloaded unless offline
    (`offline=True`, config `offline` or `metrics.offline`, or HF_HUB_OFFLINE=1), which
    raises InceptionWeightsError naming the file and how to get it. A weights file whose
    SHA-256 does not start with 6726825d gives a `inception-v3-custom-<sha>` extractor
    that is not comparable to the literature.
    """
    mcfg = _metrics_cfg(cfg)
    if mcfg.features == "inception-random":
        seed = 0
        fid_net, full_net = _build_fid_inception(None, seed)
        name, comparable = f"inception-random-seed{seed}", False
    elif mcfg.features == "inception":
        state_dict, path = _load_weights(cfg, offline)
        fid_net, full_net = _build_fid_inception(state_dict, seed=0)
        sha = _sha256(path)
        if sha.startswith(FID_WEIGHTS_SHA256_PREFIX):
            name, comparable = "inception-v3-fid", True
        else:
            name, comparable = f"inception-v3-custom-{sha[:8]}", False
            warnings.warn(
                f"{path} is not the pytorch-fid weights file (SHA-256 {sha[:8]}..., expected "
                f"{FID_WEIGHTS_SHA256_PREFIX}...); results are marked not comparable to the literature",
                MetricWarning,
                stacklevel=2,
            )
    else:
        raise MetricError(
            f"metrics.features: invalid value {mcfg.features!r}; expected inception or inception-random"
        )
    model = InceptionFeatures(fid_net, full_net.fc, name, comparable)
    model.requires_grad_(False)
    return model.eval().to(device)


# --- feature extraction --------------------------------------------------------------------


class _ImageFiles(torch.utils.data.Dataset):
    """Images as float tensors [3, H, W] in [0, 1], like pytorch-fid's ImagePathDataset."""

    def __init__(self, files: Sequence[str | Path], resolution: int | None, resize_filter: str):
        self.files = list(files)
        self.resolution = resolution
        self.resize_filter = resize_filter

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from torchvision.transforms.functional import to_tensor

        from common.data import open_rgb, preprocess

        image = open_rgb(self.files[i])
        if self.resolution is not None:
            image = preprocess(image, self.resolution, self.resize_filter)
        return to_tensor(image)


def _collate(batch: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Stack equal-size images; return a list when sizes differ (each is resized to 299 alone)."""
    if all(t.shape == batch[0].shape for t in batch):
        return torch.stack(batch)
    return batch


def _run_batch(extractor: nn.Module, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, list):
        outputs = [_run_batch(extractor, image[None], device) for image in batch]
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
    with torch.inference_mode():
        pool, logits = extractor(batch.to(device, non_blocking=True))
    return pool.float(), logits.float()


def _assemble(
    pools: list[torch.Tensor],
    logits: list[torch.Tensor],
    index: torch.Tensor,
    total: int,
    extractor: nn.Module,
    device,
    gather: bool = True,
) -> Features:
    pool = torch.cat(pools) if pools else torch.zeros(0, POOL_DIM, device=device)
    logit = torch.cat(logits) if logits else torch.zeros(0, NUM_LOGITS, device=device)
    if gather:
        # Every row is held by exactly one rank, so the zero-filled sum restores it exactly.
        pool = dist.gather_rows(pool, index.to(pool.device), total)
        logit = dist.gather_rows(logit, index.to(logit.device), total)
    return Features(
        pool=pool.cpu().numpy(),
        logits=logit.cpu().numpy(),
        extractor=getattr(extractor, "name", type(extractor).__name__),
        comparable_to_literature=bool(getattr(extractor, "comparable_to_literature", False)),
    )


def extract_from_files(
    files: Sequence[str | Path],
    extractor: nn.Module,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    resolution: int | None = None,
    resize_filter: str = "lanczos",
    progress: bool = True,
) -> Features:
    """Extract features of image files, sharded over ranks and gathered in file order.

    Rank r reads files r, r + world, ...; every rank calls this and every rank returns
    all rows. Files are decoded by `common.data.open_rgb` in `num_workers` DataLoader
    processes. With `resolution`, each image first goes through `common.data.preprocess`
    (short-side resize with `resize_filter`, centre crop); without it the file's own size
    is used, as pytorch-fid does.
    """
    from tqdm import tqdm

    files = [str(f) for f in files]
    rank, world = dist.get_rank(), dist.get_world_size()
    index = torch.arange(rank, len(files), world)
    dataset = _ImageFiles([files[i] for i in index.tolist()], resolution, resize_filter)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
    )
    extractor.eval()
    pools, logits = [], []
    bar = tqdm(loader, desc="inception features", unit="batch", disable=not (progress and dist.is_main()))
    for batch in bar:
        pool, logit = _run_batch(extractor, batch, device)
        pools.append(pool)
        logits.append(logit)
    return _assemble(pools, logits, index, len(files), extractor, device)


def _uint8_to_unit(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[B, 3, H, W] (or numpy [B, H, W, 3]) uint8 in [0, 255] -> float [B, 3, H, W] in [0, 1]."""
    if isinstance(batch, np.ndarray):
        if batch.ndim == 4 and batch.shape[-1] == 3:
            batch = batch.transpose(0, 3, 1, 2)
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if batch.dtype != torch.uint8:
        raise MetricError(
            f"images must be uint8 in [0, 255], got dtype {batch.dtype}; convert samples in [-1, 1] "
            f"with common.data.tensor_to_uint8"
        )
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise MetricError(f"images must have shape [N, 3, H, W], got {tuple(batch.shape)}")
    # Division by 255 is what ToTensor does to a decoded 8-bit image.
    return batch.float().div(255)


def extract_from_images(
    images: torch.Tensor | np.ndarray | Iterable[torch.Tensor],
    extractor: nn.Module,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    index: Sequence[int] | torch.Tensor | None = None,
    total: int | None = None,
    progress: bool = True,
) -> Features:
    """Extract features of uint8 images [N, 3, H, W] in [0, 255].

    A tensor or array is the whole set, present on every rank: rank r processes rows
    r, r + world, ... and every rank returns all N rows in order. An iterable of batches
    contains this rank's own images (for example samples generated on the fly): pass
    `index`, their global positions, and `total` to gather all ranks' rows in order;
    without `index` this rank's rows are returned as they are (one process only).
    """
    from tqdm import tqdm

    extractor.eval()
    show = progress and dist.is_main()
    pools, logits = [], []
    if isinstance(images, (torch.Tensor, np.ndarray)):
        count = len(images)
        local = torch.arange(dist.get_rank(), count, dist.get_world_size())
        starts = range(0, len(local), batch_size)
        for start in tqdm(starts, desc="inception features", unit="batch", disable=not show):
            rows = local[start : start + batch_size].numpy()
            pool, logit = _run_batch(extractor, _uint8_to_unit(images[rows]), device)
            pools.append(pool)
            logits.append(logit)
        return _assemble(pools, logits, local, count, extractor, device)

    for batch in tqdm(images, desc="inception features", unit="batch", disable=not show):
        pool, logit = _run_batch(extractor, _uint8_to_unit(batch), device)
        pools.append(pool)
        logits.append(logit)
    rows = sum(len(p) for p in pools)
    if index is None:
        if dist.get_world_size() > 1:
            raise MetricError(
                "extract_from_images: with several ranks an iterable of batches needs `index` "
                "(global positions of this rank's images) and `total`"
            )
        return _assemble(pools, logits, torch.arange(rows), rows, extractor, device, gather=False)
    index = torch.as_tensor(index, dtype=torch.long)
    if len(index) != rows or total is None:
        raise MetricError(
            f"extract_from_images: got {rows} images but {len(index)} indices (total={total}); "
            f"pass one global index per image and the total number of images"
        )
    return _assemble(pools, logits, index, total, extractor, device)


# --- reference statistics cache ------------------------------------------------------------


def _cache_key(files: Sequence[str], extractor_name: str, resolution: int | None, resize_filter: str) -> str:
    entries = []
    for name in files:
        stat = os.stat(name)
        entries.append([str(Path(name).resolve()), stat.st_size, stat.st_mtime_ns])
    description = {
        "format": _CACHE_FORMAT,
        "extractor": extractor_name,
        "preprocess": PREPROCESS_TAG,
        "resolution": resolution,
        "resize_filter": resize_filter if resolution is not None else None,
        "files": entries,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _load_cache(path: Path, key: str) -> Features | None:
    """Return the cached features, or None when the file is absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            features = Features(
                pool=data["pool"],
                logits=data["logits"],
                extractor=str(data["extractor"]),
                comparable_to_literature=bool(data["comparable_to_literature"]),
            )
            features._stats = (data["mu"], data["sigma"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        logger.warning("ignoring unreadable reference cache %s: %s", path, error)
        return None
    return features


def _write_cache(path: Path, key: str, features: Features) -> None:
    """Write the .npz through a temporary file and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = features.stats()
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez(
                handle,
                key=np.array(key),
                extractor=np.array(features.extractor),
                comparable_to_literature=np.array(features.comparable_to_literature),
                mu=mu,
                sigma=sigma,
                pool=features.pool,
                logits=features.logits,
            )
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def reference_features(
    files: Sequence[str | Path],
    extractor: nn.Module,
    cfg: Any = None,
    device: str | torch.device = "cpu",
    resolution: int | None = None,
    resize_filter: str = "lanczos",
    progress: bool = True,
) -> Features:
    """Return the features (with mu and sigma) of a reference image set, cached on disk.

    Files are sorted and cut to `metrics.real_max`. The cache file in `metrics.cache_dir`
    is keyed by a hash of each file's path, size and mtime, the preprocessing and the
    extractor name, so a changed file or extractor triggers a new extraction. Every rank
    calls this; rank 0 decides whether the cache is valid and writes it.
    """
    mcfg = _metrics_cfg(cfg)
    files = sorted(str(f) for f in files)
    if mcfg.real_max is not None:
        files = files[: mcfg.real_max]
    if not files:
        raise MetricError("reference_features: the reference image list is empty; check data.root")
    name = getattr(extractor, "name", type(extractor).__name__)
    key = _cache_key(files, name, resolution, resize_filter)
    path = Path(mcfg.cache_dir) / f"ref-{name}-{len(files)}-{key[:16]}.npz"

    features = _load_cache(path, key) if dist.is_main() else None
    hit = dist.broadcast_object(features is not None)
    if hit:
        if features is None:
            # NOTE: assumes cache_dir is on a file system that every rank can read.
            features = _load_cache(path, key)
            if features is None:
                raise MetricError(f"rank {dist.get_rank()} cannot read the reference cache {path}")
        if dist.is_main():
            logger.info("using cached reference statistics %s", path)
        return features

    if dist.is_main():
        logger.info("computing reference statistics of %d files into %s", len(files), path)
    features = extract_from_files(
        files, extractor, mcfg.batch_size, mcfg.num_workers, device, resolution, resize_filter, progress
    )
    if dist.is_main():
        _write_cache(path, key, features)
    dist.barrier()
    return features


# --- metrics -------------------------------------------------------------------------------


def _check_same_dim(real: Features, fake: Features, metric: str) -> None:
    if real.pool.shape[1] != fake.pool.shape[1]:
        raise MetricError(
            f"{metric}: real and fake features differ in width ({real.pool.shape[1]} vs {fake.pool.shape[1]}); "
            f"extract both sets with the same extractor"
        )


def fid(real: Features, fake: Features, cfg: Any = None) -> dict[str, float]:
    """Frechet Inception Distance through pytorch-fid's calculate_frechet_distance."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    _check_same_dim(real, fake, "fid")
    dim = real.pool.shape[1]
    smallest = min(len(real), len(fake))
    if smallest < 2:
        raise MetricError(f"fid: needs at least 2 samples per set, got {len(real)} real and {len(fake)} fake")
    if smallest <= dim:
        warnings.warn(
            f"fid: {len(real)} real and {len(fake)} fake samples of {dim}-d features; a covariance of N "
            f"samples has rank at most N - 1 < {dim}, so the estimate is biased upwards. Use at least "
            f"{dim + 1} per set (published FIDs use 10k-50k)",
            MetricWarning,
            stacklevel=2,
        )
    mu_real, sigma_real = real.stats()
    mu_fake, sigma_fake = fake.stats()
    try:
        with warnings.catch_warnings():
            # pytorch-fid 0.3.0 passes sqrtm(disp=False), deprecated in scipy 1.17 and removed in 1.18.
            warnings.filterwarnings("ignore", message="The `disp` argument", category=DeprecationWarning)
            value = calculate_frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
    except ValueError as error:  # "Imaginary component ..." from a rank-deficient product
        raise MetricError(
            f"fid failed on {len(real)} real and {len(fake)} fake samples ({error}); the covariances are "
            f"rank-deficient, use at least {dim + 1} samples per set"
        ) from None
    if not np.isfinite(value):
        raise MetricError(
            f"fid is {value} on {len(real)} real and {len(fake)} fake samples; use at least {dim + 1} samples per set"
        )
    return {"fid": float(value)}


def _centred_factor(pool: np.ndarray) -> torch.Tensor:
    """R with R^T R = the sample covariance of `pool` [N, d]: the QR factor of the centred rows / sqrt(N - 1)."""
    x = torch.from_numpy(pool).double()
    x = (x - x.mean(dim=0)) / math.sqrt(len(x) - 1)
    return torch.linalg.qr(x, mode="r").R  # [min(N, d), d]


def frechet_distance_fast(real: Features, fake: Features) -> float:
    """The Frechet distance of pytorch-fid, through a factorisation instead of sqrtm.

    With covariances S1 = A^T A and S2 = B^T B, the non-zero eigenvalues of S1 S2 are
    the squared singular values of M = R1 R2^T (R the QR factors of the centred
    features), so tr sqrtm(S1 S2) = sum sqrt(eigvalsh(M M^T)). In float64 this agrees
    with pytorch-fid to about 1e-9 relative, costs a few times less than scipy's sqrtm
    of a d x d product and needs no regularising offset. Used for bootstrap rounds; the
    reported point estimate stays pytorch-fid's `calculate_frechet_distance`.
    """
    mu_real = torch.from_numpy(real.pool).double().mean(dim=0)
    mu_fake = torch.from_numpy(fake.pool).double().mean(dim=0)
    r_real, r_fake = _centred_factor(real.pool), _centred_factor(fake.pool)
    m = r_real @ r_fake.T
    trace_sqrt = torch.linalg.eigvalsh(m @ m.T).clamp(min=0).sqrt().sum()
    distance = (mu_real - mu_fake).square().sum() + r_real.square().sum() + r_fake.square().sum() - 2 * trace_sqrt
    return float(distance)


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray, x_origin: np.ndarray | None = None,
                     y_origin: np.ndarray | None = None) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018); x and y may differ in size.

    The within-set means skip each pair of a point with itself, and with `*_origin` (the
    original rows of a bootstrap resample) also each pair of two copies of one point.
    """
    dim = x.shape[1]

    def within(a: np.ndarray, origin: np.ndarray | None) -> float:
        kernel = (a @ a.T / dim + 1) ** 3
        same = np.eye(len(a), dtype=bool) if origin is None else origin[:, None] == origin[None, :]
        return float(kernel[~same].mean())

    k_xy = (x @ y.T / dim + 1) ** 3
    return within(x, x_origin) + within(y, y_origin) - 2 * float(k_xy.mean())


def _kid_round(real: Features, fake: Features, mcfg: Any) -> dict[str, float]:
    """KID for one bootstrap round: one MMD^2 over the whole resamples instead of many subsets.

    Each round already redraws the images, so averaging subsets inside it would only
    multiply the cost (by metrics.kid_subsets). Sets above 4 x metrics.kid_subset_size
    rows are cut to a random subset of that size to bound the kernel matrices.
    """
    cap = 4 * mcfg.kid_subset_size
    rng = np.random.default_rng(mcfg.seed)
    rows = []
    for features in (real, fake):
        index = np.arange(len(features))
        if len(index) > cap:
            index = np.sort(rng.choice(len(index), cap, replace=False))
        origin = None if features.origin is None else features.origin[index]
        rows.append((features.pool[index].astype(np.float64), origin))
    (x, x_origin), (y, y_origin) = rows
    return {"kid": _polynomial_mmd2(x, y, x_origin, y_origin)}


def kid(real: Features, fake: Features, cfg: Any = None) -> dict[str, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets."""
    mcfg = _metrics_cfg(cfg)
    _check_same_dim(real, fake, "kid")
    size = mcfg.kid_subset_size
    smallest = min(len(real), len(fake))
    if smallest < size:
        warnings.warn(
            f"kid: {len(real)} real and {len(fake)} fake samples, fewer than metrics.kid_subset_size={size}; "
            f"using subsets of {smallest}",
            MetricWarning,
            stacklevel=2,
        )
        size = smallest
    if size < 2:
        raise MetricError(
            f"kid: needs at least 2 samples per set, got {len(real)} real and {len(fake)} fake"
        )
    rng = np.random.default_rng(mcfg.seed)
    real_pool = real.pool.astype(np.float64)
    fake_pool = fake.pool.astype(np.float64)
    values = []
    for _ in range(mcfg.kid_subsets):
        x = real_pool[rng.choice(len(real), size, replace=False)]
        y = fake_pool[rng.choice(len(fake), size, replace=False)]
        values.append(_polynomial_mmd2(x, y))
    return {"kid": float(np.mean(values)), "kid_std": float(np.std(values))}


def inception_score(real: Features, fake: Features, cfg: Any = None) -> dict[str, float]:
    """Inception Score of the fake set: exp(E_x KL(p(y|x) || p(y))) per split, mean and std."""
    mcfg = _metrics_cfg(cfg)
    if fake.logits is None:
        raise MetricError("is: the fake features have no logits; extract them with an Inception extractor")
    splits = mcfg.is_splits
    if len(fake) < splits:
        raise MetricError(f"is: {len(fake)} samples cannot fill metrics.is_splits={splits} splits; lower is_splits")
    logits = fake.logits.astype(np.float64)
    log_p = logits - _logsumexp(logits)
    scores = []
    # Consecutive splits, as the original Inception Score code takes them.
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return {"is": float(np.mean(scores)), "is_std": float(np.std(scores))}


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))


def _distance_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _row_chunks(rows: int, columns: int, budget_bytes: int = 1 << 28):
    """Yield row slices so that one float64 distance block [chunk, columns] fits the budget."""
    chunk = max(1, min(rows, budget_bytes // (8 * max(columns, 1))))
    for start in range(0, rows, chunk):
        yield slice(start, min(rows, start + chunk))


# torch.cdist uses the matrix-product form ||a||^2 + ||b||^2 - 2 a.b for large inputs,
# which is fast but not bitwise symmetric, so an exact tie on a ball's boundary (duplicate
# samples, a set compared with itself) can fall either way; self distances come out near
# 1e-8 rather than 0.


def _as_tensor(pool: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pool, dtype=np.float64)).to(_distance_device())


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    radii = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for rows in _row_chunks(len(points), len(points)):
        block = torch.cdist(points[rows], points)
        # The k + 1 smallest distances include the point itself at distance 0.
        radii[rows] = block.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _knn_terms(real: Features, fake: Features, kind: str, k: int) -> dict[str, np.ndarray]:
    """Per-point terms of the k-NN metrics on two full sets; each metric is the mean of one.

    pr: "precision" [N_fake] (fake j lies in some real ball), "recall" [N_real] (real i lies
    in some fake ball). dc: "density" [N_fake] (number of real balls that contain fake j, / k),
    "coverage" [N_real] (real ball i contains some fake). Cached on `real` for the rounds of a
    bootstrap, which then only resample these terms: the manifolds stay those of the full
    sets. Rebuilding the balls on a resample would count each duplicate as its own
    neighbour at distance 0, shrink every ball and bias all four metrics downwards.
    """
    key = (kind, k, id(fake))
    cached = real._knn.get(key)
    if cached is not None and cached[0] is fake:
        return cached[1]
    x, y = _as_tensor(real.pool), _as_tensor(fake.pool)
    radii_x = _knn_radii(x, k)
    if kind == "pr":
        radii_y = _knn_radii(y, k)
        inside = torch.cat([(torch.cdist(y[r], x) <= radii_x[None]).any(dim=1) for r in _row_chunks(len(y), len(x))])
        covered = torch.cat([(torch.cdist(x[r], y) <= radii_y[None]).any(dim=1) for r in _row_chunks(len(x), len(y))])
        terms = {"precision": inside, "recall": covered}
    else:
        hits = torch.cat([(torch.cdist(y[r], x) <= radii_x[None]).sum(dim=1) for r in _row_chunks(len(y), len(x))])
        nearest_fake = torch.cat([torch.cdist(x[r], y).min(dim=1).values for r in _row_chunks(len(x), len(y))])
        terms = {"density": hits.double() / k, "coverage": nearest_fake <= radii_x}
    terms = {name: value.double().cpu().numpy() for name, value in terms.items()}
    real._knn[key] = (fake, terms)
    return terms


def _check_knn(real: Features, fake: Features, k: int, metric: str, key: str) -> None:
    _check_same_dim(real, fake, metric)
    if min(len(real), len(fake)) < k + 1:
        raise MetricError(
            f"{metric}: k={k} nearest neighbours need at least {k + 1} samples per set, got {len(real)} real "
            f"and {len(fake)} fake; add samples or lower {key}"
        )


def precision_recall(real: Features, fake: Features, cfg: Any = None) -> dict[str, float]:
    """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019).

    precision: fraction of fakes within the k-NN ball of some real sample;
    recall: fraction of reals within the k-NN ball of some fake sample (balls closed).
    On a bootstrap resample the balls are those of the full sets (see `_knn_terms`).
    """
    k = _metrics_cfg(cfg).pr_k
    _check_knn(real, fake, k, "precision/recall", "metrics.pr_k")
    (real_set, real_rows), (fake_set, fake_rows) = real.full(), fake.full()
    terms = _knn_terms(real_set, fake_set, "pr", k)
    return {"precision": float(terms["precision"][fake_rows].mean()), "recall": float(terms["recall"][real_rows].mean())}


def density_coverage(real: Features, fake: Features, cfg: Any = None) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) with real k-NN balls, k = metrics.dc_k.

    density: the mean number of real balls that contain a fake, divided by k. It is about 1
    when both sets come from one distribution. coverage: the fraction of real balls that
    contain at least one fake. On a bootstrap resample the balls are those of the full
    sets (see `_knn_terms`).
    """
    k = _metrics_cfg(cfg).dc_k
    _check_knn(real, fake, k, "density/coverage", "metrics.dc_k")
    (real_set, real_rows), (fake_set, fake_rows) = real.full(), fake.full()
    terms = _knn_terms(real_set, fake_set, "dc", k)
    return {"density": float(terms["density"][fake_rows].mean()), "coverage": float(terms["coverage"][real_rows].mean())}


MetricFn = Callable[[Features, Features, Any], dict[str, float]]

# Registry: metric name -> function(real, fake, cfg) returning plain floats.
METRICS: dict[str, MetricFn] = {
    "fid": fid,
    "kid": kid,
    "is": inception_score,
    "pr": precision_recall,
    "dc": density_coverage,
}


def _check_names(names: Iterable[str], key: str) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"{key}: unknown metric {unknown[0]!r}; expected some of {', '.join(METRICS)}")
    return names


def compute_metrics(
    real: Features, fake: Features, cfg: Any = None, names: Iterable[str] | None = None, ci: bool = False
) -> dict[str, Any]:
    """Run the metrics `names` (default: all of METRICS) and record the extractor.

    With `ci=True`, each metric in `metrics.bootstrap_metrics` also gets `<key>_ci95`,
    a [low, high] bootstrap interval over `metrics.bootstrap` rounds.
    """
    mcfg = _metrics_cfg(cfg)
    names = _check_names(METRICS if names is None else names, "compute_metrics names")
    if real.extractor != fake.extractor:
        raise MetricError(
            f"real features come from {real.extractor!r} and fake features from {fake.extractor!r}; "
            f"extract both with the same network"
        )
    result: dict[str, Any] = {
        "extractor": fake.extractor,
        "comparable_to_literature": bool(fake.comparable_to_literature and real.comparable_to_literature),
        "num_real": len(real),
        "num_fake": len(fake),
    }
    bootstrapped = set(_check_names(mcfg.bootstrap_metrics, "metrics.bootstrap_metrics")) if ci else set()
    for name in names:
        values = METRICS[name](real, fake, mcfg)
        result.update(values)
        if name in bootstrapped and mcfg.bootstrap > 0:
            intervals = bootstrap_ci(real, fake, metric_function(name, mcfg), mcfg.bootstrap, mcfg.seed)
            for key, (low, high) in intervals.items():
                if not key.endswith("_std"):
                    result[f"{key}_ci95"] = [low, high]
    return result


def metric_function(name: str, mcfg: Any) -> Callable[[Features, Features], dict[str, float]]:
    """The metric as a function of two feature sets, for bootstrap rounds (FID by its fast form, KID by `_kid_round`)."""

    def metric(real: Features, fake: Features) -> dict[str, float]:
        if name == "fid":
            return {"fid": frechet_distance_fast(real, fake)}
        if name == "kid":
            return _kid_round(real, fake, mcfg)
        return METRICS[name](real, fake, mcfg)

    return metric


# --- bootstrap -----------------------------------------------------------------------------


def _percentile_interval(samples: list[float], level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _per_key(values: list[float | dict[str, float]]) -> dict[str, list[float]] | list[float]:
    if isinstance(values[0], dict):
        return {key: [v[key] for v in values] for key in values[0]}
    return [float(v) for v in values]


def bootstrap_ci(
    real: Features,
    fake: Features,
    metric_fn: Callable[[Features, Features], float | dict[str, float]],
    rounds: int = 100,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of `metric_fn(real, fake)`, resampling both sets with replacement.

    Returns (low, high), or {key: (low, high)} when `metric_fn` returns a dict. Each round
    costs one full metric evaluation; FID through `metric_function` uses the QR and
    eigvalsh form of `frechet_distance_fast`, not sqrtm.
    The k-NN metrics (pr, dc) keep the balls of the full sets and resample only the points
    they score (see `_knn_terms`), so their intervals leave out the sampling noise of the
    manifold estimate itself.
    """
    if rounds < 2:
        raise MetricError(f"bootstrap_ci: needs at least 2 rounds, got {rounds}")
    rng = np.random.default_rng(seed)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)  # the point estimate already warned
        for _ in range(rounds):
            real_rows = rng.integers(0, len(real), len(real))
            fake_rows = rng.integers(0, len(fake), len(fake))
            values.append(metric_fn(real.take(real_rows), fake.take(fake_rows)))
    samples = _per_key(values)
    if isinstance(samples, dict):
        return {key: _percentile_interval(v, level) for key, v in samples.items()}
    return _percentile_interval(samples, level)


def paired_bootstrap(
    real: Features,
    fake_a: Features,
    fake_b: Features,
    metric_fn: Callable[[Features, Features], float | dict[str, float]],
    rounds: int = 100,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float] | dict[str, dict[str, float]]:
    """Bootstrap interval of metric(a) - metric(b) for two fake sets generated from the same seeds.

    Row i of `fake_a` and of `fake_b` must come from the same initial noise. Each round
    resamples the same rows of both, plus one resample of `real` shared by both, so the
    noise common to the two sets cancels in the difference. Returns {"delta", "low", "high"}, or that
    per key when `metric_fn` returns a dict.
    """
    if len(fake_a) != len(fake_b):
        raise MetricError(
            f"paired_bootstrap: the fake sets differ in size ({len(fake_a)} vs {len(fake_b)}); "
            f"generate both from the same seeds"
        )
    if rounds < 2:
        raise MetricError(f"paired_bootstrap: needs at least 2 rounds, got {rounds}")

    def difference(real_set: Features, a: Features, b: Features):
        value_a, value_b = metric_fn(real_set, a), metric_fn(real_set, b)
        if isinstance(value_a, dict):
            return {key: value_a[key] - value_b[key] for key in value_a}
        return float(value_a) - float(value_b)

    point = difference(real, fake_a, fake_b)
    rng = np.random.default_rng(seed)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        for _ in range(rounds):
            real_rows = rng.integers(0, len(real), len(real))
            fake_rows = rng.integers(0, len(fake_a), len(fake_a))
            values.append(difference(real.take(real_rows), fake_a.take(fake_rows), fake_b.take(fake_rows)))
    samples = _per_key(values)
    if isinstance(samples, dict):
        result = {}
        for key, v in samples.items():
            low, high = _percentile_interval(v, level)
            result[key] = {"delta": point[key], "low": low, "high": high}
        return result
    low, high = _percentile_interval(samples, level)
    return {"delta": point, "low": low, "high": high}


# --- memorisation --------------------------------------------------------------------------


def _pool_of(x: Features | np.ndarray) -> np.ndarray:
    return x.pool if isinstance(x, Features) else np.asarray(x)


def nearest_neighbours(
    query: Features | np.ndarray, reference: Features | np.ndarray, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Return (distance [M], index [M]) of each query row's nearest reference row (Euclidean).

    With `exclude_self`, query and reference are the same set and row i skips itself
    (leave-one-out nearest neighbour).
    """
    q, r = _as_tensor(_pool_of(query)), _as_tensor(_pool_of(reference))
    if len(r) < (2 if exclude_self else 1):
        raise MetricError(f"nearest_neighbours: the reference set has {len(r)} rows, too few")
    if exclude_self and len(q) != len(r):
        raise MetricError("nearest_neighbours: exclude_self needs query and reference to be the same set")
    distances = torch.empty(len(q), dtype=q.dtype, device=q.device)
    indices = torch.empty(len(q), dtype=torch.long, device=q.device)
    for rows in _row_chunks(len(q), len(r)):
        block = torch.cdist(q[rows], r)
        if exclude_self:
            own = torch.arange(rows.start, rows.stop, device=q.device)
            block[own - rows.start, own] = math.inf
        distances[rows], indices[rows] = block.min(dim=1)
    return distances.cpu().numpy(), indices.cpu().numpy()


def memorization_report(
    fake: Features | np.ndarray, train: Features | np.ndarray, quantile: float = 0.05, num_pairs: int = 16
) -> dict[str, Any]:
    """Measure how many fakes lie unusually close to a training image.

    The threshold is the `quantile` of the leave-one-out nearest-neighbour distances within
    the training set. Fakes as far from the training set as new real images would be put
    about `quantile` of their number below it. A generator that copies training images
    puts many more below it. Returns the threshold, `fraction_below`, the
    `expected_fraction` (= quantile), median distances, and the `num_pairs` closest
    (fake, train) pairs sorted by distance, for a side-by-side grid.
    NOTE: a fake is compared with all N training images while the threshold uses N - 1,
    which makes fakes look very slightly closer on small training sets.
    """
    if not 0 < quantile < 1:
        raise MetricError(f"memorization_report: quantile must be in (0, 1), got {quantile}")
    fake_dist, fake_idx = nearest_neighbours(fake, train)
    train_dist, _ = nearest_neighbours(train, train, exclude_self=True)
    threshold = float(np.quantile(train_dist, quantile))
    order = np.argsort(fake_dist, kind="stable")[:num_pairs]
    return {
        "threshold": threshold,
        "quantile": quantile,
        "fraction_below": float(np.mean(fake_dist < threshold)),
        "expected_fraction": quantile,
        "fake_nn_median": float(np.median(fake_dist)),
        "train_nn_median": float(np.median(train_dist)),
        "closest_pairs": [
            {"fake": int(i), "train": int(fake_idx[i]), "distance": float(fake_dist[i])} for i in order
        ],
    }
