"""Tests of common/data.py on generated images, the CelebA sample and lfw_subset."""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import DataConfig
from common.data import (
    ImageDataError,
    ImageDataset,
    batches_from_step,
    build_dataset,
    build_loader,
    infinite_batches,
    list_image_files,
    open_rgb,
    preprocess,
    save_image_grid,
    save_png,
    tensor_to_uint8,
    to_rgb,
)

torch.set_num_threads(1)

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
CELEBA_JPEGS = FACES / "celeba64-original-sample"
LOGGER = "common.data"


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_rgb(path: Path, width: int = 24, height: int = 20, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(width, height, seed)).save(path)
    return path


def _folder(tmp_path: Path, count: int, width: int = 24, height: int = 20) -> Path:
    root = tmp_path / "images"
    for i in range(count):
        _write_rgb(root / f"{i:03d}.png", width, height, seed=i)
    return root


def _cfg(root, **kwargs) -> DataConfig:
    return DataConfig(root=str(root), resolution=16, **kwargs)


# --- listing ------------------------------------------------------------------------------


def test_listing_sorted_recursive(tmp_path):
    root = tmp_path / "data"
    _write_rgb(root / "b" / "2.PNG")
    _write_rgb(root / "b" / "10.jpeg")
    _write_rgb(root / "a.JPG")
    _write_rgb(root / "c.webp")
    _write_rgb(root / "d.bmp")
    _write_rgb(root / ".hidden.png")
    _write_rgb(root / ".cache" / "x.png")
    (root / "notes.txt").write_text("not an image")
    (root / "manifest.csv").write_text("png\n")

    files = list_image_files(root)

    relative = [Path(f).relative_to(root).as_posix() for f in files]
    assert relative == ["a.JPG", "b/10.jpeg", "b/2.PNG", "c.webp", "d.bmp"]


def test_listing_symlink_loop_once(tmp_path):
    root = tmp_path / "data"
    _write_rgb(root / "a.png")
    _write_rgb(root / "sub" / "b.png")
    (root / "sub" / "up").symlink_to(root)  # a loop back to the top
    (root / "alias").symlink_to(root / "sub")  # a second name for one folder

    files = list_image_files(root)

    assert len(files) == 2
    assert sorted(Path(f).name for f in files) == ["a.png", "b.png"]


def test_listing_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageDataError, match="no images found"):
        list_image_files(tmp_path)


def test_dataset_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageDataError) as info:
        build_dataset(_cfg(tmp_path))
    assert "data.root" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_dataset_missing_root(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ImageDataError) as info:
        build_dataset(_cfg(missing))
    message = str(info.value)
    assert "data.root" in message
    assert "does-not-exist" in message
    assert "set data.root" in message


def test_dataset_root_unset():
    with pytest.raises(ImageDataError, match="data.root is not set"):
        build_dataset(DataConfig(root=None))


def test_dataset_invalid_choice(tmp_path):
    root = _folder(tmp_path, 2)
    with pytest.raises(ImageDataError, match="data.on_bad_image"):
        build_dataset(_cfg(root, on_bad_image="ignore"))


# --- decoding -----------------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rgb = Image.fromarray(_noise(20, 12))
    rgba = rgb.convert("RGBA")
    palette_transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent.info["transparency"] = 0
    gradient = (np.arange(20 * 12).reshape(12, 20) * 270).astype(np.uint16)
    return {
        "gray.png": rgb.convert("L"),
        "gray_alpha.png": rgb.convert("LA"),
        "rgba.png": rgba,
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "palette_transparent.png": palette_transparent,
        "gray16.png": Image.fromarray(gradient),
        "cmyk.jpg": rgb.convert("CMYK"),
        "bilevel.png": rgb.convert("1"),
        "bilevel.bmp": rgb.convert("1"),
        "rgb.webp": rgb,
        "rgb.bmp": rgb,
    }


def test_modes_load_as_rgb(tmp_path):
    for name, img in _mode_images().items():
        path = tmp_path / name
        img.save(path)
        out = open_rgb(str(path))
        assert out.mode == "RGB", name
        assert out.size == (20, 12), name
        assert np.asarray(out).dtype == np.uint8, name


def test_modes_saved_as_expected(tmp_path):
    # Guards the test above: the files really have the modes it claims to cover.
    expected = {"gray16.png": "I;16", "cmyk.jpg": "CMYK", "gray_alpha.png": "LA", "palette_transparent.png": "P"}
    for name, mode in expected.items():
        path = tmp_path / name
        _mode_images()[name].save(path)
        with Image.open(path) as img:
            assert img.mode == mode, name


def test_sixteen_bit_full_range(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = tmp_path / "gradient16.png"
    Image.fromarray(gradient).save(path)

    out = np.asarray(open_rgb(str(path)))

    assert out[..., 0].min() == 0
    assert out[..., 0].max() == 255
    assert len(np.unique(out[..., 0])) == 256
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)
    assert np.array_equal(out[..., 0], out[..., 2])


def test_sixteen_bit_big_endian():
    values = np.array([[0, 257, 32896, 65535]], dtype=">u2")
    img = Image.frombytes("I;16B", (4, 1), values.tobytes())
    out = np.asarray(to_rgb(img))[0, :, 0]
    assert out.tolist() == [0, 1, 128, 255]


def test_rgba_on_white(tmp_path):
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 0)  # fully transparent red
    pixels[0, 1] = (255, 0, 0, 255)  # opaque red
    pixels[1, 0] = (0, 0, 0, 128)  # half transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, mode="RGBA").save(path)

    out = np.asarray(open_rgb(str(path)))

    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert 120 <= out[1, 0, 0] <= 135


def test_palette_transparency_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    path = tmp_path / "palette.png"
    img.save(path)

    out = np.asarray(open_rgb(str(path)))

    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 255, 0]


def test_open_rgb_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDataError, match="empty.png"):
        open_rgb(str(empty))
    with pytest.raises(ImageDataError, match="missing.png"):
        open_rgb(str(tmp_path / "missing.png"))
    text = tmp_path / "text.jpg"
    text.write_text("this is not a JPEG")
    with pytest.raises(ImageDataError, match="text.jpg"):
        open_rgb(str(text))


# --- preprocessing ------------------------------------------------------------------------


def test_preprocess_centre_crop():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white centre square between black side bands
    out = preprocess(Image.fromarray(pixels), 10, "nearest")
    assert out.size == (10, 10)
    assert np.asarray(out).min() == 255


def test_preprocess_upscales_small():
    out = preprocess(Image.fromarray(_noise(5, 7)), 16)
    assert out.size == (16, 16)


def test_preprocess_invalid_filter():
    with pytest.raises(ImageDataError, match="resize_filter"):
        preprocess(Image.fromarray(_noise(8, 8)), 4, "cubic")


# --- bad and small images -----------------------------------------------------------------


def _with_bad_files(tmp_path: Path) -> Path:
    root = _folder(tmp_path, 4)
    source = _write_rgb(tmp_path / "whole.jpg", 40, 40)
    data = source.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "zero.png").write_bytes(b"")
    return root


def test_bad_image_error(tmp_path):
    root = _with_bad_files(tmp_path)
    with pytest.raises(ImageDataError) as info:
        build_dataset(_cfg(root, on_bad_image="error"))
    message = str(info.value)
    assert "truncated.jpg" in message
    assert "zero.png" in message
    assert "data.on_bad_image=skip" in message


def test_bad_image_skip(tmp_path, caplog):
    root = _with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = build_dataset(_cfg(root, on_bad_image="skip"))

    assert len(dataset) == 4
    assert sorted(Path(name).name for name, _ in dataset.report.bad) == ["truncated.jpg", "zero.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 unreadable" in warnings[0]
    assert "truncated.jpg" in warnings[0]


def test_bad_image_skip_lazy(tmp_path):
    root = _with_bad_files(tmp_path)
    dataset = build_dataset(_cfg(root, on_bad_image="skip", cache_mb=0))
    assert dataset.pixels is None
    assert len(dataset) == 4
    assert dataset[3].shape == (3, 16, 16)


def test_all_bad_images(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageDataError, match="none of the 1 image files"):
        build_dataset(_cfg(tmp_path, on_bad_image="skip"))


def _with_small_file(tmp_path: Path) -> Path:
    root = _folder(tmp_path, 3)
    _write_rgb(root / "small.png", 10, 30)
    return root


def test_small_image_upscale(tmp_path, caplog):
    root = _with_small_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = build_dataset(_cfg(root, on_small_image="upscale"))
    assert len(dataset) == 4
    assert [Path(f).name for f in dataset.report.small_upscaled] == ["small.png"]
    assert any("upscaled 1 images" in r.getMessage() for r in caplog.records)
    assert dataset[3].shape == (3, 16, 16)


def test_small_image_skip(tmp_path, caplog):
    root = _with_small_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = build_dataset(_cfg(root, on_small_image="skip"))
    assert len(dataset) == 3
    assert all("small.png" not in f for f in dataset.files)
    assert any("skipped 1 images smaller" in r.getMessage() for r in caplog.records)


def test_small_image_error(tmp_path):
    root = _with_small_file(tmp_path)
    with pytest.raises(ImageDataError) as info:
        build_dataset(_cfg(root, on_small_image="error"))
    assert "small.png (10x30)" in str(info.value)
    assert "data.on_small_image" in str(info.value)


# --- datasets -----------------------------------------------------------------------------


def test_max_images_first(tmp_path):
    root = _folder(tmp_path, 5)
    dataset = build_dataset(_cfg(root, max_images=3))
    assert [Path(f).name for f in dataset.files] == ["000.png", "001.png", "002.png"]


def test_cache_matches_lazy(tmp_path):
    root = _folder(tmp_path, 3, 30, 22)
    cached = build_dataset(_cfg(root), train=False)
    lazy = build_dataset(_cfg(root, cache_mb=0), train=False)
    assert cached.pixels is not None
    assert lazy.pixels is None
    for i in range(3):
        assert torch.equal(cached[i], lazy[i])


def test_zip_matches_folder(tmp_path):
    root = _folder(tmp_path, 3)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name in ["002.png", "000.png", "001.png"]:
            handle.write(root / name, f"faces/{name}")
        handle.writestr("faces/readme.txt", "ignored")
        handle.writestr("__MACOSX/faces/._000.png", b"resource fork")

    files = list_image_files(archive)
    assert files == [f"{archive}::faces/{i:03d}.png" for i in range(3)]

    from_zip = build_dataset(_cfg(archive, cache_mb=0), train=False)
    from_folder = build_dataset(_cfg(root), train=False)
    assert len(from_zip) == 3
    for i in range(3):
        assert torch.equal(from_zip[i], from_folder[i])


def test_zip_lazy_workers(tmp_path):
    root = _folder(tmp_path, 4)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(root.iterdir()):
            handle.write(path, path.name)
    dataset = build_dataset(_cfg(archive, cache_mb=0, num_workers=1), train=False)
    loader, _ = build_loader(dataset, 2, seed=0, train=False, num_workers=1)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0].shape == (2, 3, 16, 16)


def test_lfw_subset():
    dataset = build_dataset(DataConfig(source="lfw_subset", resolution=32, on_small_image="error"))
    assert len(dataset) == 100
    items = torch.stack([dataset[i] for i in range(len(dataset))])
    assert items.shape == (100, 3, 32, 32)
    assert items.min() >= -1.0
    assert items.max() <= 1.0
    assert items.min() < -0.5
    assert items.max() > 0.5
    assert torch.equal(items[:, 0], items[:, 1])  # gray faces: equal channels


@pytest.mark.skipif(not CELEBA_JPEGS.is_dir(), reason=f"CelebA JPEG sample not found at {CELEBA_JPEGS}")
def test_celeba_loader():
    cfg = DataConfig(root=str(CELEBA_JPEGS), resolution=16, max_images=24)
    dataset = build_dataset(cfg, train=True)
    names = [Path(f).name for f in dataset.files]
    assert names == sorted(p.name for p in CELEBA_JPEGS.glob("*.jpg"))[:24]

    loader, sampler = build_loader(dataset, batch_per_gpu=8, seed=3)
    batches = [b for _, b in zip(range(3), infinite_batches(loader, sampler))]
    assert [b.shape for b in batches] == [(8, 3, 16, 16)] * 3
    stacked = torch.cat(batches)
    assert stacked.dtype == torch.float32
    assert stacked.min() >= -1.0
    assert stacked.max() <= 1.0
    assert stacked.std() > 0.1

    again = build_dataset(cfg, train=True)
    loader2, sampler2 = build_loader(again, batch_per_gpu=8, seed=3)
    batches2 = [b for _, b in zip(range(3), infinite_batches(loader2, sampler2))]
    for first, second in zip(batches, batches2):
        assert torch.equal(first, second)


@pytest.mark.skipif(not CELEBA_JPEGS.is_dir(), reason=f"CelebA JPEG sample not found at {CELEBA_JPEGS}")
def test_celeba_lazy_matches_cache():
    cfg = DataConfig(root=str(CELEBA_JPEGS), resolution=16, max_images=4)
    cached = build_dataset(cfg, train=False)
    lazy = build_dataset(dataclasses.replace(cfg, cache_mb=0), train=False)
    for i in range(4):
        assert torch.equal(cached[i], lazy[i])


# --- flips, sampling and resuming ---------------------------------------------------------


def _flip_dataset(count: int = 16, flip: bool = True) -> ImageDataset:
    pixels = np.stack([_noise(8, 8, seed=i) for i in range(count)])
    return ImageDataset([f"item{i}" for i in range(count)], 8, flip=flip, pixels=pixels)


def test_flip_deterministic():
    first, second = _flip_dataset(), _flip_dataset()
    loader1, sampler1 = build_loader(first, 4, seed=7)
    loader2, sampler2 = build_loader(second, 4, seed=7)
    stream1 = infinite_batches(loader1, sampler1, start_epoch=2)
    stream2 = infinite_batches(loader2, sampler2, start_epoch=2)
    for _ in range(8):
        assert torch.equal(next(stream1), next(stream2))


def test_flip_varies_by_epoch():
    dataset = _flip_dataset(64)
    dataset.set_epoch(0)
    epoch0 = [dataset.is_flipped(i) for i in range(64)]
    dataset.set_epoch(1)
    epoch1 = [dataset.is_flipped(i) for i in range(64)]
    assert epoch0 != epoch1
    assert 10 < sum(epoch0) < 54


def test_flip_mirrors_image():
    dataset = _flip_dataset(64)
    plain = _flip_dataset(64, flip=False)
    index = next(i for i in range(64) if dataset.is_flipped(i))
    assert torch.equal(dataset[index], torch.flip(plain[index], dims=[2]))
    assert not any(plain.is_flipped(i) for i in range(64))


def test_flip_off_for_eval(tmp_path):
    root = _folder(tmp_path, 8)
    dataset = build_dataset(_cfg(root, flip=True), train=False)
    assert not any(dataset.is_flipped(i) for i in range(8))


def _epoch_indices(dataset, seed: int, world: int, rank: int, train: bool, epoch: int = 0) -> list[int]:
    _, sampler = build_loader(dataset, 1, seed=seed, train=train, num_replicas=world, rank=rank)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_two_ranks():
    dataset = _flip_dataset(10)
    rank0 = _epoch_indices(dataset, 5, 2, 0, train=True)
    rank1 = _epoch_indices(dataset, 5, 2, 1, train=True)
    assert len(rank0) == len(rank1) == 5
    assert set(rank0).isdisjoint(rank1)
    assert sorted(rank0 + rank1) == list(range(10))
    assert rank0 + rank1 != list(range(10))  # shuffled


def test_sampler_drops_tail():
    dataset = _flip_dataset(11)
    rank0 = _epoch_indices(dataset, 5, 2, 0, train=True, epoch=1)
    rank1 = _epoch_indices(dataset, 5, 2, 1, train=True, epoch=1)
    assert len(rank0) == len(rank1) == 5
    assert set(rank0).isdisjoint(rank1)
    assert len(set(rank0) | set(rank1)) == 10


def test_sampler_eval_order():
    dataset = _flip_dataset(10)
    rank0 = _epoch_indices(dataset, 5, 2, 0, train=False)
    rank1 = _epoch_indices(dataset, 5, 2, 1, train=False)
    assert rank0 == [0, 2, 4, 6, 8]
    assert rank1 == [1, 3, 5, 7, 9]


def test_sampler_shuffle_by_epoch():
    dataset = _flip_dataset(16)
    assert _epoch_indices(dataset, 5, 1, 0, True, 0) != _epoch_indices(dataset, 5, 1, 0, True, 1)
    assert _epoch_indices(dataset, 5, 1, 0, True, 1) == _epoch_indices(dataset, 5, 1, 0, True, 1)


class _CountingDataset(ImageDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded = 0

    def uint8_image(self, index):
        self.loaded += 1
        return super().uint8_image(index)


def test_resume_exact():
    reference = _flip_dataset(10)
    loader, sampler = build_loader(reference, 3, seed=1)  # 3 batches per epoch, 1 image dropped
    stream = infinite_batches(loader, sampler)
    expected = [next(stream) for _ in range(8)]

    for step in (0, 2, 3, 5, 7):
        pixels = np.stack([_noise(8, 8, seed=i) for i in range(10)])
        resumed = _CountingDataset([f"item{i}" for i in range(10)], 8, flip=True, pixels=pixels)
        loader2, sampler2 = build_loader(resumed, 3, seed=1)
        resumed_stream = batches_from_step(loader2, sampler2, step)
        first = next(resumed_stream)
        assert torch.equal(first, expected[step]), step
        assert resumed.loaded == 3, step  # skipped batches were never loaded
        for later in range(step + 1, 8):
            assert torch.equal(next(resumed_stream), expected[later]), (step, later)


def test_batch_larger_than_shard():
    dataset = _flip_dataset(6)
    with pytest.raises(ImageDataError, match="batch_per_gpu=4"):
        build_loader(dataset, 4, seed=0, num_replicas=2, rank=0)


# --- saving -------------------------------------------------------------------------------


def test_uint8_round_trip():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    as_float = values.float() / 127.5 - 1.0
    assert torch.equal(tensor_to_uint8(as_float), values)
    assert tensor_to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_save_image_grid(tmp_path):
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    path = tmp_path / "grids" / "grid.png"
    save_image_grid(images, path)

    with Image.open(path) as img:
        assert img.mode == "RGB"
        assert img.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 columns, 2 rows, 2 px padding
        top_left = np.asarray(img)[2:10, 2:10]
    assert np.array_equal(top_left, tensor_to_uint8(images[0]).permute(1, 2, 0).numpy())
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_save_png(tmp_path):
    image = torch.rand(3, 6, 5) * 2 - 1
    path = tmp_path / "one.png"
    save_png(image, path)
    loaded = np.asarray(open_rgb(str(path)))
    assert loaded.shape == (6, 5, 3)
    assert np.array_equal(loaded, tensor_to_uint8(image).permute(1, 2, 0).numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["one.png"]


def test_exif_orientation(tmp_path):
    img = Image.fromarray(_noise(30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert open_rgb(str(path)).size == (20, 30)


# --- two ranks with a process group -------------------------------------------------------


def _two_rank_worker(rank: int, init_file: str, root: str, out_dir: str) -> None:
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dataset = build_dataset(DataConfig(root=root, resolution=16, on_bad_image="skip", cache_mb=0))
        loader, sampler = build_loader(dataset, 2, seed=4)
        sampler.set_epoch(0)
        result = {
            "files": [Path(f).name for f in dataset.files],
            "bad": sorted(Path(name).name for name, _ in dataset.report.bad),
            "indices": list(sampler),
            "batches": len(loader),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def test_two_ranks_process_group(tmp_path):
    root = _with_bad_files(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    torch.multiprocessing.spawn(
        _two_rank_worker, args=(str(tmp_path / "init"), str(root), str(out_dir)), nprocs=2, join=True
    )
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for result in results:
        assert result["files"] == ["000.png", "001.png", "002.png", "003.png"]
        assert result["bad"] == ["truncated.jpg", "zero.png"]  # found by either rank's shard
        assert result["batches"] == 1
    assert set(results[0]["indices"]).isdisjoint(results[1]["indices"])
    assert sorted(results[0]["indices"] + results[1]["indices"]) == [0, 1, 2, 3]


def test_start_batch_outside_epoch():
    dataset = _flip_dataset(10)
    loader, sampler = build_loader(dataset, 3, seed=1)
    with pytest.raises(ValueError, match="start_batch=3"):
        next(infinite_batches(loader, sampler, start_batch=3))
