"""Image data: listing, decoding to 8-bit RGB, preprocessing, datasets and loaders.

Sources (`data.source`):

- `folder`: `data.root` is an image folder (searched recursively) or a `.zip` of
  images. Files ending in .png, .jpg, .jpeg, .webp or .bmp (any letter case) are
  used, in the order of their sorted relative paths. Other files are ignored, and so
  are hidden entries: names starting with "." and macOS `__MACOSX/` folders in zips.
- `lfw_subset`: the first 100 images of `skimage.data.lfw_subset()`, which are the
  face crops (25x25 gray), so they are upscaled to `data.resolution`.

Zip members are addressed as `ARCHIVE.zip::MEMBER`, for example
`faces.zip::train/0001.png`; `open_rgb` accepts that form as well as plain paths.

Every image becomes 8-bit RGB (`to_rgb`), is resized so its short side equals the
resolution and is centre-cropped to a square (`preprocess`). Dataset items are float
tensors [3, R, R] in [-1, 1].

`build_dataset` decodes every file once before training (the verification pass), so
a corrupt file fails or is skipped at start-up, never in the middle of an epoch.
When the preprocessed uint8 images of the whole dataset fit in `data.cache_mb` MiB,
that pass keeps them in memory and the loader never decodes again. Otherwise
images are decoded again on each access.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import dist
from .config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ZIP_SEPARATOR = "::"
RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
LFW_FACES = 100  # skimage.data.lfw_subset(): images 0-99 are faces, 100-199 are not
NAMES_SHOWN = 5  # file names quoted in an error or a log line about many files

# Exceptions that Pillow and its codecs raise for corrupt, truncated or unsupported
# data. IndexError and KeyError come from malformed headers and EXIF blocks.
_DECODE_ERRORS = (
    OSError,
    IndexError,
    KeyError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class ImageDataError(ValueError):
    """An image file, folder or data setting that cannot be used. The message names it."""


# --- listing ------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(relative: str) -> bool:
    parts = relative.split("/")
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _is_zip_path(path: Path) -> bool:
    return path.suffix.lower() == ".zip"


def list_image_files(root: str | Path) -> list[str]:
    """List the image files of a folder (recursively) or of a `.zip`, sorted by relative path.

    Folder entries are returned as paths (`root/sub/a.png`), zip members as
    `root.zip::sub/a.png`. Raise ImageDataError when `root` is missing, is neither
    a folder nor a zip, or contains no image.
    """
    root = Path(root)
    if not root.exists():
        raise ImageDataError(f"image folder or zip not found: {root}")

    if root.is_dir():
        relatives = []
        visited = set()  # (device, inode) of every folder walked: a symlink loop is entered once
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            stat = os.stat(dirpath)
            if (stat.st_dev, stat.st_ino) in visited:
                dirnames[:] = []
                continue
            visited.add((stat.st_dev, stat.st_ino))
            # Pruning hidden folders here keeps os.walk out of .git, .cache and similar trees.
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            base = Path(dirpath).relative_to(root)
            for name in filenames:
                relative = (base / name).as_posix()
                if _is_image_name(name) and not _is_hidden(relative):
                    relatives.append(relative)
        relatives.sort()
        files = [str(root / relative) for relative in relatives]
    elif _is_zip_path(root):
        try:
            with zipfile.ZipFile(root) as archive:
                members = [info.filename for info in archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError) as error:
            raise ImageDataError(f"failed to read zip archive {root}: {error}") from None
        members = sorted(m for m in members if _is_image_name(m) and not _is_hidden(m))
        files = [f"{root}{ZIP_SEPARATOR}{member}" for member in members]
    else:
        raise ImageDataError(f"{root} is neither a folder nor a .zip archive of images")

    if not files:
        raise ImageDataError(
            f"no images found in {root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return files


# --- decoding -----------------------------------------------------------------------------


def _split_zip_path(path: str) -> tuple[str, str] | None:
    """Return (archive, member) for `archive.zip::member`, or None for a plain path."""
    if ZIP_SEPARATOR not in path:
        return None
    archive, member = path.split(ZIP_SEPARATOR, 1)
    if not archive.lower().endswith(".zip"):
        return None
    return archive, member


# Open archives of this process, keyed by (process id, path): a forked DataLoader
# worker must not share the parent's file offset, so it opens its own handle.
_open_archives: dict[tuple[int, str], zipfile.ZipFile] = {}


def _archive(path: str) -> zipfile.ZipFile:
    key = (os.getpid(), path)
    archive = _open_archives.get(key)
    if archive is None:
        archive = zipfile.ZipFile(path)
        _open_archives[key] = archive
    return archive


def _read_bytes(path: str) -> bytes:
    zip_parts = _split_zip_path(path)
    try:
        if zip_parts is None:
            return Path(path).read_bytes()
        archive, member = zip_parts
        return _archive(archive).read(member)
    except FileNotFoundError:
        raise ImageDataError(f"image file not found: {path}") from None
    except KeyError:
        raise ImageDataError(f"image file not found: {path} (no such member in the zip)") from None
    except (OSError, zipfile.BadZipFile, RuntimeError, zlib.error) as error:
        # RuntimeError: an encrypted zip member without a password.
        raise ImageDataError(f"failed to read image file {path}: {error}") from None


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    # Modes I;16* hold 0..65535. Older Pillow releases open 16-bit gray PNGs in mode I
    # (32-bit signed), so mode I is read as 16-bit too, clipped to 0..65535.
    # Dividing by 257 maps 65535 to 255 exactly (65535 = 255 * 257). Pillow 13's
    # convert("L") would instead clip every value above 255 to white.
    values = np.asarray(img).astype(np.float64)
    gray = np.clip(np.rint(np.clip(values, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB.

    Transparency (modes RGBA, LA, PA, La, RGBa and palettes with a transparent index)
    is composited on a white background, as image viewers show it. Dropping alpha
    instead would expose the colour under fully transparent pixels, which is often
    undefined. 16-bit gray is scaled from 0..65535 to 0..255, not clipped. CMYK uses
    Pillow's conversion, without ICC profiles.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(img)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        return _composite_on_white(img)
    return img.convert("RGB")


def open_rgb(path: str) -> Image.Image:
    """Decode one image file fully and return it as 8-bit RGB.

    `path` is a plain path or `ARCHIVE.zip::MEMBER`. The EXIF orientation, when
    present, is applied. Raise ImageDataError naming the file when it is missing,
    empty, corrupt, truncated or of an unsupported mode.
    """
    path = str(path)
    data = _read_bytes(path)
    if not data:
        raise ImageDataError(f"empty image file (0 bytes): {path}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except _DECODE_ERRORS as error:
        if isinstance(error, UnidentifiedImageError):
            raise ImageDataError(f"failed to decode image {path}: not a recognised image format") from None
        raise ImageDataError(f"failed to decode image {path}: {type(error).__name__}: {error}") from None


# --- preprocessing ------------------------------------------------------------------------


def _resize_filter(name: str) -> Image.Resampling:
    try:
        return RESIZE_FILTERS[name]
    except KeyError:
        raise ImageDataError(
            f"data.resize_filter: invalid value {name!r}; expected one of {', '.join(RESIZE_FILTERS)}"
        ) from None


def preprocess(img: Image.Image, resolution: int, resize_filter: str = "lanczos") -> Image.Image:
    """Resize so the short side is `resolution` pixels, then centre-crop to a square.

    Small images are upscaled. When the long side is odd after resizing, the crop
    keeps one more pixel on the right or bottom side.
    """
    if resolution < 1:
        raise ImageDataError(f"data.resolution: must be at least 1, got {resolution}")
    resample = _resize_filter(resize_filter)
    width, height = img.size
    scale = resolution / min(width, height)
    new_width = max(resolution, round(width * scale))
    new_height = max(resolution, round(height * scale))
    if (new_width, new_height) != (width, height):
        img = img.resize((new_width, new_height), resample=resample)
    left = (new_width - resolution) // 2
    top = (new_height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


# --- verification pass --------------------------------------------------------------------


@dataclass
class DataReport:
    """Outcome of the verification pass: files dropped or changed, with reasons."""

    total: int = 0  # files listed, after data.max_images
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), corrupt or unreadable
    small_upscaled: list[str] = field(default_factory=list)
    small_skipped: list[str] = field(default_factory=list)
    cached: bool = False  # preprocessed uint8 images kept in memory


class _ScanDataset(Dataset):
    """Decodes file i for the verification pass; run through a DataLoader for parallelism."""

    def __init__(self, files: list[str], indices: list[int], resolution: int, resize_filter: str, keep_pixels: bool):
        self.files = files
        self.indices = indices
        self.resolution = resolution
        self.resize_filter = resize_filter
        self.keep_pixels = keep_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            img = open_rgb(self.files[index])
        except ImageDataError as error:
            return index, str(error), None, None
        pixels = None
        if self.keep_pixels:
            pixels = np.asarray(preprocess(img, self.resolution, self.resize_filter), dtype=np.uint8)
        return index, None, img.size, pixels


def _identity(item):
    return item


def _quote_files(items: list[str]) -> str:
    quoted = ", ".join(items[:NAMES_SHOWN])
    more = len(items) - NAMES_SHOWN
    return quoted + (f" and {more} more" if more > 0 else "")


def _all_gather(obj) -> list:
    if not torch_dist.is_initialized():
        return [obj]
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def _scan(files: list[str], cfg: DataConfig, cache: bool) -> tuple[list[int], np.ndarray | None, DataReport]:
    """Decode every file once and apply the bad-image and small-image policies.

    Returns the indices of the kept files, their preprocessed pixels when `cache`
    (uint8 [kept, R, R, 3]) and the report. Without the cache each rank decodes
    only its shard of the files and the ranks exchange their findings.
    """
    resolution = cfg.resolution
    if cache:
        indices = list(range(len(files)))
        pixels = np.empty((len(files), resolution, resolution, 3), dtype=np.uint8)
    else:
        indices = dist.shard_indices(len(files))
        pixels = None
    scan = _ScanDataset(files, indices, resolution, cfg.resize_filter, keep_pixels=cache)
    loader = DataLoader(scan, batch_size=None, num_workers=cfg.num_workers, collate_fn=_identity)

    bad: list[tuple[int, str]] = []
    small: list[tuple[int, tuple[int, int]]] = []
    for index, error, size, image in loader:
        if error is not None:
            bad.append((index, error))
            continue
        if min(size) < resolution:
            small.append((index, size))
        if pixels is not None:
            pixels[index] = image

    if not cache:
        bad = sorted(item for part in _all_gather(bad) for item in part)
        small = sorted(item for part in _all_gather(small) for item in part)

    report = DataReport(total=len(files), cached=cache)
    report.bad = [(files[i], reason) for i, reason in bad]
    if bad and cfg.on_bad_image == "error":
        reasons = "; ".join(reason for _, reason in bad[:NAMES_SHOWN])
        raise ImageDataError(
            f"{len(bad)} of {len(files)} image files cannot be used: {reasons}"
            + (f" (and {len(bad) - NAMES_SHOWN} more)" if len(bad) > NAMES_SHOWN else "")
            + ". Fix or remove them, or set data.on_bad_image=skip"
        )

    small_names = [f"{files[i]} ({w}x{h})" for i, (w, h) in small]
    if small and cfg.on_small_image == "error":
        raise ImageDataError(
            f"{len(small)} images are smaller than data.resolution={resolution} on their short side: "
            f"{_quote_files(small_names)}. Set data.on_small_image=upscale or skip, or lower data.resolution"
        )
    if cfg.on_small_image == "skip":
        report.small_skipped = [files[i] for i, _ in small]
    else:
        report.small_upscaled = [files[i] for i, _ in small]

    dropped = {i for i, _ in bad}
    if cfg.on_small_image == "skip":
        dropped |= {i for i, _ in small}
    kept_indices = [i for i in range(len(files)) if i not in dropped]
    if pixels is not None and dropped:
        pixels = pixels[kept_indices]
    return kept_indices, pixels, report


def _log_report(report: DataReport, root: str, count: int, resolution: int) -> None:
    if not dist.is_main():
        return
    if report.bad:
        names = [f"{name} ({reason})" for name, reason in report.bad]
        log.warning("skipped %d unreadable image files of %s (data.on_bad_image=skip): %s",
                    len(report.bad), root, _quote_files(names))
    if report.small_skipped:
        log.warning("skipped %d images smaller than %d px on their short side (data.on_small_image=skip): %s",
                    len(report.small_skipped), resolution, _quote_files(report.small_skipped))
    if report.small_upscaled:
        log.warning("upscaled %d images smaller than %d px on their short side (data.on_small_image=upscale): %s",
                    len(report.small_upscaled), resolution, _quote_files(report.small_upscaled))
    storage = "cached in memory" if report.cached else "decoded on each access"
    log.info("data: %d images from %s at %dx%d, %s", count, root, resolution, resolution, storage)


# --- dataset ------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images as float tensors [3, R, R] in [-1, 1].

    Pixels come from `pixels` (uint8 [N, R, R, 3], preprocessed) when given, else
    each access decodes and preprocesses `files[index]`.

    The horizontal flip of item i is a pure function of (flip_seed, epoch, i), so it
    does not depend on the global RNG, on DataLoader workers or on which rank loads
    the item. A resumed run therefore gets the same augmentation. `build_loader` sets
    `flip_seed` and `infinite_batches` calls `set_epoch`.
    """

    def __init__(
        self,
        files: list[str],
        resolution: int,
        resize_filter: str = "lanczos",
        flip: bool = False,
        pixels: np.ndarray | None = None,
        report: DataReport | None = None,
    ):
        if pixels is not None and pixels.shape != (len(files), resolution, resolution, 3):
            raise ValueError(f"pixels: expected shape {(len(files), resolution, resolution, 3)}, got {pixels.shape}")
        self.files = files
        self.resolution = resolution
        self.resize_filter = resize_filter
        self.flip = flip
        self.pixels = pixels
        self.report = report or DataReport(total=len(files), cached=pixels is not None)
        self.flip_seed = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def is_flipped(self, index: int) -> bool:
        if not self.flip:
            return False
        # SeedSequence hashes the three integers; its entropy must be non-negative.
        state = np.random.SeedSequence([self.flip_seed % 2**64, self.epoch, int(index)]).generate_state(1)
        return bool(state[0] & 1)

    def uint8_image(self, index: int) -> np.ndarray:
        """Return image `index` unflipped, as uint8 [R, R, 3]."""
        if self.pixels is not None:
            return self.pixels[index]
        img = preprocess(open_rgb(self.files[index]), self.resolution, self.resize_filter)
        return np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy expects

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.uint8_image(index)
        if self.is_flipped(index):
            image = image[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return tensor.float() / 127.5 - 1.0


def _check_choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ImageDataError(f"{key}: invalid value {value!r}; expected one of {', '.join(allowed)}")


def _check_data_config(cfg: DataConfig) -> None:
    _check_choice("data.source", cfg.source, ("folder", "lfw_subset"))
    _check_choice("data.on_bad_image", cfg.on_bad_image, ("error", "skip"))
    _check_choice("data.on_small_image", cfg.on_small_image, ("upscale", "skip", "error"))
    _check_choice("data.resize_filter", cfg.resize_filter, tuple(RESIZE_FILTERS))
    if cfg.resolution < 1:
        raise ImageDataError(f"data.resolution: must be at least 1, got {cfg.resolution}")
    if cfg.max_images is not None and cfg.max_images < 1:
        raise ImageDataError(f"data.max_images: must be at least 1 or null (all images), got {cfg.max_images}")
    if cfg.num_workers < 0:
        raise ImageDataError(f"data.num_workers: must be >= 0, got {cfg.num_workers}")
    if cfg.cache_mb < 0:
        raise ImageDataError(f"data.cache_mb: must be >= 0 (0 disables the cache), got {cfg.cache_mb}")


def _lfw_dataset(cfg: DataConfig, flip: bool) -> ImageDataset:
    import skimage.data

    faces = skimage.data.lfw_subset()[:LFW_FACES]  # float64 [100, 25, 25] in [0, 1]
    if cfg.max_images is not None:
        faces = faces[: cfg.max_images]
    faces_uint8 = np.clip(np.rint(faces * 255.0), 0, 255).astype(np.uint8)
    pixels = np.stack([
        np.asarray(preprocess(Image.fromarray(face).convert("RGB"), cfg.resolution, cfg.resize_filter))
        for face in faces_uint8
    ])
    files = [f"lfw_subset[{i}]" for i in range(len(faces_uint8))]
    report = DataReport(total=len(files), cached=True)
    if dist.is_main():
        # 25x25 crops are smaller than usual resolutions, so upscaling is expected here.
        log.info("data: %d lfw_subset faces (25x25 gray) resized to %dx%d", len(files), cfg.resolution, cfg.resolution)
    return ImageDataset(files, cfg.resolution, cfg.resize_filter, flip=flip, pixels=pixels, report=report)


def _folder_root(cfg: DataConfig) -> Path:
    if cfg.root is None or str(cfg.root).strip() == "":
        raise ImageDataError(
            "data.root is not set: set data.root to an image folder or a .zip of images "
            "(for example data.root=data/faces), or use data.source=lfw_subset"
        )
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise ImageDataError(
            f"data.root: {root} not found (resolved to {root.resolve()}); "
            "set data.root to an existing image folder or .zip of images"
        )
    if not root.is_dir() and not _is_zip_path(root):
        raise ImageDataError(f"data.root: {root} is a file but not a .zip; set data.root to an image folder or a .zip")
    return root


def build_dataset(cfg: DataConfig, train: bool = True) -> ImageDataset:
    """Build the dataset described by `cfg`, after a verification pass over every file.

    Items are float tensors [3, R, R] in [-1, 1], with R = cfg.resolution. Items are
    flipped horizontally only when `train` and `cfg.flip` are both true. The
    preprocessed images are kept in memory when N * R * R * 3 bytes fit in
    `cfg.cache_mb` MiB. Raise ImageDataError naming the key or the file on bad input.
    """
    _check_data_config(cfg)
    flip = train and cfg.flip
    if cfg.source == "lfw_subset":
        return _lfw_dataset(cfg, flip)

    root = _folder_root(cfg)
    try:
        files = list_image_files(root)
    except ImageDataError as error:
        raise ImageDataError(f"data.root: {error}") from None
    if cfg.max_images is not None:
        files = files[: cfg.max_images]

    cache_bytes = len(files) * cfg.resolution * cfg.resolution * 3
    cache = cache_bytes <= cfg.cache_mb * 2**20
    kept_indices, pixels, report = _scan(files, cfg, cache)
    if not kept_indices:
        raise ImageDataError(
            f"data.root: none of the {len(files)} image files in {root} can be used "
            f"({len(report.bad)} unreadable, {len(report.small_skipped)} too small)"
        )
    _log_report(report, str(root), len(kept_indices), cfg.resolution)
    return ImageDataset(
        [files[i] for i in kept_indices], cfg.resolution, cfg.resize_filter, flip=flip, pixels=pixels, report=report
    )


# --- loaders ------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `skip_samples` indices.

    The skipped indices are never handed to the DataLoader, so resuming in the middle
    of an epoch decodes nothing it does not return. `set_epoch` resets the skip.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_samples = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip_samples = 0

    def __iter__(self) -> Iterator[int]:
        # A list, not a generator, so the skip is read when the DataLoader starts the epoch.
        indices = list(super().__iter__())
        return iter(indices[self.skip_samples:])

    def __len__(self) -> int:
        return self.num_samples - self.skip_samples


def build_loader(
    dataset: Dataset,
    batch_per_gpu: int,
    seed: int,
    train: bool = True,
    num_workers: int = 0,
    *,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> tuple[DataLoader, ResumableSampler]:
    """Build this rank's DataLoader and its DistributedSampler.

    Training (`train=True`) shuffles with `seed`, which must be the same on every
    rank, and drops the tail of the epoch so every rank gets the same number of full
    batches. Evaluation keeps the order, and DistributedSampler pads the last
    shard with repeated images so all ranks get the same count. Use
    `common.dist.shard_indices` when exact coverage matters.

    `num_replicas` and `rank` default to `common.dist`; passing them simulates one
    rank of a larger job without a process group. Workers are not persistent, because
    each epoch must hand them the dataset's current epoch for the flips.
    """
    if batch_per_gpu < 1:
        raise ImageDataError(f"batch_per_gpu: must be at least 1, got {batch_per_gpu}")
    world = dist.get_world_size() if num_replicas is None else num_replicas
    rank = dist.get_rank() if rank is None else rank
    sampler = ResumableSampler(
        dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train
    )
    if train and len(sampler) < batch_per_gpu:
        raise ImageDataError(
            f"{len(dataset)} images over {world} ranks give {len(sampler)} per rank, fewer than one batch of "
            f"batch_per_gpu={batch_per_gpu}; lower the batch size or add images"
        )
    if hasattr(dataset, "flip_seed"):
        dataset.flip_seed = seed
    loader = DataLoader(
        dataset,
        batch_size=batch_per_gpu,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def _start_epoch(loader: DataLoader, sampler: DistributedSampler, epoch: int) -> None:
    sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def infinite_batches(
    loader: DataLoader, sampler: DistributedSampler, start_epoch: int = 0, start_batch: int = 0
) -> Iterator[torch.Tensor]:
    """Yield batches forever, epoch after epoch, calling set_epoch before each epoch.

    The first epoch (`start_epoch`) begins at batch `start_batch`. With a
    ResumableSampler the skipped batches are not loaded at all; with a plain
    DistributedSampler they are loaded and discarded.
    """
    if start_batch and not 0 < start_batch < epoch_length(loader, sampler):
        raise ValueError(
            f"start_batch={start_batch} is outside the epoch of {epoch_length(loader, sampler)} batches; "
            "use batches_from_step to resume at a global step"
        )
    epoch = start_epoch
    skip = start_batch
    while True:
        _start_epoch(loader, sampler, epoch)
        discard = 0
        if skip:
            if isinstance(sampler, ResumableSampler):
                sampler.skip_samples = skip * loader.batch_size
            else:
                discard = skip
        for batch in loader:
            if discard:
                discard -= 1
                continue
            yield batch
        skip = 0
        epoch += 1


def epoch_length(loader: DataLoader, sampler: DistributedSampler) -> int:
    """Return the number of batches one epoch yields on this rank."""
    if loader.drop_last:
        return sampler.num_samples // loader.batch_size
    return math.ceil(sampler.num_samples / loader.batch_size)


def batches_from_step(
    loader: DataLoader, sampler: DistributedSampler, step: int, batches_per_epoch: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield the batches a run would see from batch number `step` onwards (0-based).

    `step` counts the batches this rank has already consumed. With gradient
    accumulation that is the optimizer step times the accumulation count.

    Batch `step` is batch `step % B` of epoch `step // B`, where B is the number of
    batches per epoch (computed from the loader unless given). A run resumed at step
    s thus continues with exactly the data and flips of an uninterrupted run, provided
    the dataset, seed, batch size and number of ranks are the same.
    """
    per_epoch = batches_per_epoch or epoch_length(loader, sampler)
    if per_epoch < 1:
        raise ImageDataError("the loader yields no batch per epoch; lower the batch size or add images")
    epoch, batch = divmod(step, per_epoch)
    return infinite_batches(loader, sampler, start_epoch=epoch, start_batch=batch)


# --- saving -------------------------------------------------------------------------------


def tensor_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map floats in [-1, 1] to uint8 in [0, 255] (clamped, rounded), keeping the shape."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _save_atomic(img: Image.Image, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ImageDataError(f"failed to save image {path}: unknown extension {path.suffix!r}; use .png")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; images are for everyone who reads the run
        with os.fdopen(fd, "wb") as handle:
            img.save(handle, format=image_format)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_pil(image: torch.Tensor) -> Image.Image:
    """Convert [3, H, W] (float in [-1, 1] or uint8) to a PIL RGB image."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3, H, W] or [1, H, W], got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = tensor_to_uint8(image)
    array = image.cpu().permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0]).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(array))


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write one image [3, H, W] (float in [-1, 1] or uint8) to `path`, atomically."""
    _save_atomic(_to_pil(image), path)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2) -> None:
    """Write images [N, 3, H, W] in [-1, 1] as one grid image, atomically.

    `nrow` is the number of images per row (torchvision's convention), by default
    ceil(sqrt(N)). The padding between images is black.
    """
    from torchvision.utils import make_grid

    if images.ndim != 4:
        raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(images.shape[0])))
    if images.dtype != torch.uint8:
        images = tensor_to_uint8(images)
    grid = make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=0)
    _save_atomic(_to_pil(grid), path)
