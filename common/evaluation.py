"""Evaluation glue shared by 01_baseline.py, 03_adv_finetune.py and 04_eval.py.

Real images come from the config's data source at `data.resolution` (the model's
resolution), so real and generated images reach the feature network at the same
size. Results use the row layout of `common.report`:
`{"metrics": {"fid": {"value": v, "ci": [low, high]}, ...}}`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from . import data, metrics
from .config import Config

logger = logging.getLogger(__name__)

# Keys of compute_metrics' flat output that become table columns, with their names there.
TABLE_KEYS = {
    "fid": "fid",
    "kid": "kid",
    "is": "is",
    "precision": "precision",
    "recall": "recall",
    "density": "density",
    "coverage": "coverage",
}


def real_files(cfg: Config) -> list[str] | None:
    """Files of the reference set, or None for an embedded source."""
    if cfg.data.source != "folder":
        return None
    if cfg.data.root is None:
        raise data.ImageDataError("data.root is not set; pass data.root=PATH/TO/REAL/IMAGES")
    files = data.list_image_files(cfg.data.root)
    if cfg.data.max_images is not None:
        files = files[: cfg.data.max_images]
    return files


def real_images_uint8(cfg: Config, limit: int | None = None) -> torch.Tensor:
    """Real images as uint8 [N, 3, R, R], preprocessed like the training data (no flip)."""
    dataset = data.build_dataset(cfg.data, train=False)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.from_numpy(np.stack([dataset.uint8_image(i) for i in range(count)])).permute(0, 3, 1, 2)


def real_features(cfg: Config, extractor, device: torch.device) -> metrics.Features:
    """Reference features: cached by file list for folders, computed in memory for embedded sets."""
    files = real_files(cfg)
    if files is None:
        images = real_images_uint8(cfg, limit=cfg.metrics.real_max)
        return metrics.extract_from_images(images, extractor, cfg.metrics.batch_size, device)
    return metrics.reference_features(files, extractor, cfg, device, resolution=cfg.data.resolution,
                                      resize_filter=cfg.data.resize_filter)


def files_uint8(files: list[str | Path]) -> torch.Tensor:
    """Sample files as uint8 [N, 3, H, W]; every file must have the same size."""
    arrays = [np.asarray(data.open_rgb(str(f))) for f in files]
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise data.ImageDataError(f"images of mixed sizes {sizes[:3]} in {Path(files[0]).parent}; "
                                  "evaluate one resolution at a time")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def to_table_metrics(flat: dict) -> dict:
    """compute_metrics' flat dict -> {"fid": {"value": v, "ci": [lo, hi] or None}, ...}."""
    out = {}
    for key, name in TABLE_KEYS.items():
        if key in flat:
            out[name] = {"value": float(flat[key]), "ci": flat.get(f"{key}_ci95")}
    return out


def evaluate(cfg: Config, real: metrics.Features, fake: metrics.Features, names=None, ci: bool = False) -> dict:
    """Metrics of one fake set against the reference, in the table layout plus the raw values."""
    flat = metrics.compute_metrics(real, fake, cfg, names=names, ci=ci)
    return {
        "extractor": flat["extractor"],
        "comparable_to_literature": flat["comparable_to_literature"],
        "num_real": flat["num_real"],
        "num_fake": flat["num_fake"],
        "metrics": to_table_metrics(flat),
        "raw": {k: v for k, v in flat.items() if not isinstance(v, (list, dict))},
    }
