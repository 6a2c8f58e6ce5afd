"""02_train_disc.py end to end (subprocess runs on configs/tiny.yaml) and common.gan units."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import gan
from common.config import load_config
from common.data import ImageDataError
from common.discriminators import DiscriminatorError
from conftest import run_stage

torch.set_num_threads(1)

# DDP vs one process compares weights after float sums in another order.
DDP_ATOL = 1e-5
# Settings under which 2 x 4 and 1 x 8 images per step give the same D: DiffAugment
# draws per rank and minibatch std groups per rank batch, so both are off. R1 is a
# per-image mean, so it stays on.
DDP_SETTINGS = ["disc.diffaug=''", "disc.mbstd_group=0", "disc.r1_every=2", "disc.steps=3", "disc.eval_every=0"]


def load_final(run_dir: Path) -> dict:
    return torch.load(run_dir / "disc_final.pt", map_location="cpu", weights_only=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain")
    run_stage("00_pretrain.py", "configs/tiny.yaml", f"run_dir={run_dir}")
    return run_dir / "model"


@pytest.fixture(scope="module")
def fakes_dir(tmp_path_factory) -> Path:
    """20 random-noise PNGs of 20x20 px, so the stage has to resize them to 16 px."""
    folder = tmp_path_factory.mktemp("fakes")
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory, pretrained) -> tuple[Path, list[str]]:
    """Pixel mode, fakes generated on the fly; R1 every 2 steps so the 6-step run uses it."""
    run_dir = tmp_path_factory.mktemp("pixel")
    args = ["configs/tiny.yaml", f"model.pretrained={pretrained}", "disc.r1_every=2"]
    run_stage("02_train_disc.py", *args, f"run_dir={run_dir}")
    return run_dir, args


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory, fakes_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("noisy")
    run_stage("02_train_disc.py", "configs/tiny.yaml", f"run_dir={run_dir}", "disc.mode=noisy",
              f"disc.fakes={fakes_dir}", "disc.t_dist=low")
    return run_dir


def test_pixel_run_outputs(pixel_run):
    run_dir, _ = pixel_run
    report = json.loads((run_dir / "disc_eval.json").read_text())
    for key in ("step", "mode", "arch", "num_real", "num_fake", "overall", "buckets", "grids"):
        assert key in report
    assert report["step"] == 6
    assert report["mode"] == "pixel"
    assert report["num_real"] == report["num_fake"] == 8
    assert report["buckets"] == []
    assert 0.0 <= report["overall"]["auc"] <= 1.0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 4, 6]
    for key in ("d_loss", "r1", "real_logit", "fake_logit", "accuracy", "sec_per_step"):
        assert key in rows[0]
    assert rows[0]["r1"] is not None
    assert [row["step"] for row in read_jsonl(run_dir / "eval.jsonl")] == [3, 6]
    final = load_final(run_dir)
    assert final["mode"] == "pixel"
    assert final["noise_aware"] is False
    assert final["resolution"] == 16
    assert final["config"]["arch"] == "resnet"
    for name in ("most_real", "least_real"):
        with Image.open(run_dir / "grids" / f"{name}.png") as grid:
            assert grid.size[0] > 16


def test_noisy_run_outputs(noisy_run):
    report = json.loads((noisy_run / "disc_eval.json").read_text())
    assert report["mode"] == "noisy"
    assert [(b["t_min"], b["t_max"]) for b in report["buckets"]] == [(0, 500), (500, 1000)]
    for bucket in report["buckets"]:
        assert 0.0 <= bucket["auc"] <= 1.0
        assert 0.0 <= bucket["accuracy"] <= 1.0
    assert (noisy_run / "auc_vs_t.png").stat().st_size > 0
    assert load_final(noisy_run)["noise_aware"] is True
    metrics = read_jsonl(noisy_run / "eval.jsonl")[-1]["metrics"]
    assert "disc_auc_t0-500" in metrics


def test_ddp_matches_single(tmp_path, fakes_dir):
    common = ["configs/tiny.yaml", f"disc.fakes={fakes_dir}", *DDP_SETTINGS]
    run_stage("02_train_disc.py", *common, f"run_dir={tmp_path / 'one'}", "disc.batch_per_gpu=8")
    run_stage("02_train_disc.py", *common, f"run_dir={tmp_path / 'two'}", "disc.batch_per_gpu=4", nproc=2)
    one, two = load_final(tmp_path / "one")["disc"], load_final(tmp_path / "two")["disc"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=DDP_ATOL, rtol=0, msg=key)


def test_resume_matches_uninterrupted(tmp_path, pixel_run):
    reference, args = pixel_run
    run_stage("02_train_disc.py", *args, f"run_dir={tmp_path}", "disc.steps=3")
    resumed = run_stage("02_train_disc.py", *args, f"run_dir={tmp_path}")
    assert "resumed from" in resumed.stdout
    ours, theirs = load_final(tmp_path)["disc"], load_final(reference)["disc"]
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_unet_pixel_one_line(tmp_path):
    result = run_stage("02_train_disc.py", "configs/tiny.yaml", f"run_dir={tmp_path}", "model.pretrained=unused",
                       "disc.arch=unet", "disc.mode=pixel", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "needs disc.mode=noisy" in lines[0]
    assert not (tmp_path / "config.yaml").exists()


def test_empty_fakes_rejected(tmp_path, tiny_config):
    # The same check runs first in the stage, and run_stage prints ImageDataError as one line.
    cfg = load_config(tiny_config, [f"disc.fakes={tmp_path}"])
    with pytest.raises(ImageDataError, match="disc.fakes: no images found"):
        gan.check_disc_config(cfg)


def _write_pngs(folder: Path, sizes: list[int]) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def test_fake_folder_mixed_sizes_rejected(tmp_path):
    _write_pngs(tmp_path / "fakes", [16] * 5 + [32] * 5)

    with pytest.raises(ImageDataError, match=r"disc.fakes=.*mixed sizes \[\(16, 16\), \(32, 32\)\]"):
        gan.FakeFolder(str(tmp_path / "fakes"), 16, "lanczos", eval_num=2, seed=0)


def test_fake_folder_resize_warns(tmp_path):
    _write_pngs(tmp_path / "fakes", [32] * 6)

    with pytest.warns(UserWarning, match="32x32 images resized to data.resolution=16"):
        fakes = gan.FakeFolder(str(tmp_path / "fakes"), 16, "lanczos", eval_num=2, seed=0)

    assert tuple(fakes.pool.shape) == (4, 3, 16, 16)
    assert tuple(fakes.eval_images.shape) == (2, 3, 16, 16)


def test_load_requires_noise_aware(pixel_run, noisy_run, tiny_config):
    cfg = load_config(tiny_config)
    with pytest.raises(DiscriminatorError, match="is a pixel-mode discriminator; discriminator guidance needs"):
        gan.load_disc_checkpoint(pixel_run[0] / "disc_final.pt", cfg, require_noise_aware=True)
    disc = gan.load_disc_checkpoint(noisy_run / "disc_final.pt", cfg, require_noise_aware=True)
    saved = load_final(noisy_run)["disc"]
    for key, value in disc.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_load_rejects_resolution(noisy_run, tiny_config):
    cfg = load_config(tiny_config, ["data.resolution=32"])
    with pytest.raises(DiscriminatorError, match="16 px"):
        gan.load_disc_checkpoint(noisy_run / "disc_final.pt", cfg)


def test_low_t_dist_density():
    t = gan.sample_timesteps(40000, [100, 900], "low", torch.Generator().manual_seed(0))
    assert int(t.min()) >= 100
    assert int(t.max()) < 900
    # P(t < t_min + span / 4) = sqrt(1 / 4) = 0.5 for the "low" density.
    assert abs(float((t < 300).float().mean()) - 0.5) < 0.02


def test_fake_draw_same_union(monkeypatch):
    source = gan.FakeSource(seed=3)
    source.pool = torch.arange(40, dtype=torch.uint8).reshape(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    single = source.batch(5, 8, "cpu")
    monkeypatch.setattr(gan.dist, "get_world_size", lambda: 2)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(gan.dist, "get_rank", lambda rank=rank: rank)
        parts.append(source.batch(5, 4, "cpu"))
    assert torch.equal(torch.cat(parts), single)


def test_held_out_split_disjoint():
    train, held_out = gan.held_out_split(30, 8, seed=1, source_name="data")
    assert len(held_out) == 8
    assert set(train) | set(held_out) == set(range(30))
    assert not set(train) & set(held_out)
    assert gan.held_out_split(30, 8, seed=1, source_name="data") == (train, held_out)


def test_check_config_rejects_buckets(tiny_config):
    cfg = load_config(tiny_config, ["disc.mode=noisy", "disc.t_range=[0, 4]", "disc.t_buckets=5",
                                    "disc.fakes=x"])
    with pytest.raises(DiscriminatorError, match="disc.t_buckets"):
        gan.check_disc_config(cfg)


def test_bucket_edges_cover_range():
    assert gan.bucket_edges([0, 1000], 4) == [0, 250, 500, 750, 1000]
    assert gan.bucket_edges([10, 17], 2) == [10, 14, 17]
