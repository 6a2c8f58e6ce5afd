"""Fault tolerance of the stage scripts: kills, stop signals, bad input, full disk, NaN loss.

Stages run on configs/tiny.yaml with one thread: as subprocesses where a kill, a signal
or a second process is involved, and in this process for the bad-input cases, which
fail before any training step.
"""

import ast
import errno
import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_stage
from faults import run_with_kills, run_with_stop_signal, start, stage_command
from PIL import Image

from common.config import load_config
from common.rundir import EXIT_REQUEUE, RunDir, RunDirError, load_checkpoint

torch.set_num_threads(1)
TINY = "configs/tiny.yaml"
PRETRAIN = ["train.steps=16", "train.ckpt_every=2", "train.log_every=1", "train.sample_every=0"]
DISC = ["disc.steps=12", "disc.ckpt_every=2", "disc.log_every=1", "disc.eval_every=0"]
ADV = ["adv.steps_total=8", "adv.ckpt_every=2", "adv.log_every=1", "adv.eval_every=0", "adv.probe=false"]


# --- helpers ---------------------------------------------------------------------------------


def assert_same(a, b, where="checkpoint"):
    """Recursive equality of checkpoint contents: tensors bit for bit, everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b), key=str)} differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def last_checkpoint(run_dir):
    found = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def temporary_files(run_dir):
    return [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def assert_user_error(result, *fragments):
    """Non-zero exit, no traceback, and every fragment in the error output."""
    output = result.stdout + result.stderr
    assert result.returncode not in (0, EXIT_REQUEUE), output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr[-1500:]}"


def snapshot(run_dir):
    """Contents of every file but .lock, which records the pid of the latest holder."""
    return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def assert_intact(run_dir, before):
    """Files present before a failed run are unchanged; log.txt only grew; config.yaml kept somewhere."""
    configs = [p.read_bytes() for p in run_dir.glob("config*.yaml")]
    for name, content in before.items():
        path = run_dir / name
        if name.name == "config.yaml":
            assert content in configs, "the earlier config.yaml was lost"
        elif name.name == "log.txt":
            assert path.read_bytes().startswith(content), "log.txt was rewritten"
        else:
            assert path.is_file(), f"{name} was deleted"
            assert path.read_bytes() == content, f"{name} was changed"


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def existing_run(pretrain_ref):
    """A finished 00 run whose files later failed runs must leave intact (tests work on copies)."""
    return pretrain_ref


def run_in_process(script, *args, capsys):
    """Run a stage's `__main__` in this process (no interpreter start-up), as the command line would.

    Returns a CompletedProcess with the exit code and the captured output. An exception
    other than SystemExit propagates, so a traceback fails the test.
    """
    argv = [str(REPO / script), *map(str, args)]
    old_argv = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = old_argv
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def rerun_on(existing_run, tmp_path, *args, capsys=None, env=None):
    """Copy the finished run, rerun 00 with bad input on the copy, check that its files survive.

    With `capsys` the stage runs in this process; without it, as a subprocess with `env`.
    """
    run_dir = tmp_path / "run"
    shutil.copytree(existing_run, run_dir)
    before = snapshot(run_dir)
    if capsys is not None:
        result = run_in_process("00_pretrain.py", TINY, f"run_dir={run_dir}", *args, capsys=capsys)
    else:
        result = run_stage("00_pretrain.py", TINY, f"run_dir={run_dir}", *args, check=False, env=env)
    assert_intact(run_dir, before)
    return result


# --- uninterrupted references ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_ref(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain_ref") / "run"
    run_stage("00_pretrain.py", TINY, f"run_dir={run_dir}", *PRETRAIN)
    return run_dir


@pytest.fixture(scope="module")
def disc_ref(tmp_path_factory, pretrain_ref):
    run_dir = tmp_path_factory.mktemp("disc_ref") / "run"
    run_stage("02_train_disc.py", TINY, f"run_dir={run_dir}", f"model.pretrained={pretrain_ref / 'model'}", *DISC)
    return run_dir


@pytest.fixture(scope="module")
def adv_ref(tmp_path_factory, pretrain_ref):
    run_dir = tmp_path_factory.mktemp("adv_ref") / "run"
    run_stage("03_adv_finetune.py", TINY, f"run_dir={run_dir}", f"model.pretrained={pretrain_ref / 'model'}", *ADV)
    return run_dir


# --- SIGKILL at random moments ------------------------------------------------------------------


def test_pretrain_kill_resume(tmp_path, pretrain_ref):
    run = run_with_kills("00_pretrain.py", TINY, tmp_path / "run", *PRETRAIN, kills=1, seed=1)
    assert run.kills == 1, [(a.mode, a.returncode) for a in run.attempts]
    final = load_checkpoint(last_checkpoint(run.run_dir))
    reference = load_checkpoint(last_checkpoint(pretrain_ref))
    assert final["step"] == 16
    for part in ("unet", "ema", "optimizer", "lr_schedule", "step"):
        assert_same(final[part], reference[part], part)

    rows = read_rows(run.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    for row, ref in zip(rows, read_rows(pretrain_ref / "metrics.jsonl")):
        assert row["loss"] == ref["loss"], f"loss at step {row['step']}"
    assert not temporary_files(run.run_dir)


def test_disc_kill_resume(tmp_path, pretrain_ref, disc_ref):
    run = run_with_kills("02_train_disc.py", TINY, tmp_path / "run", f"model.pretrained={pretrain_ref / 'model'}",
                         *DISC, kills=1, seed=2)
    assert run.kills == 1, [(a.mode, a.returncode) for a in run.attempts]
    final = load_checkpoint(last_checkpoint(run.run_dir))
    reference = load_checkpoint(last_checkpoint(disc_ref))
    for part in ("disc", "optimizer", "step"):
        assert_same(final[part], reference[part], part)
    final_disc = torch.load(run.run_dir / "disc_final.pt", map_location="cpu", weights_only=True)
    reference_disc = torch.load(disc_ref / "disc_final.pt", map_location="cpu", weights_only=True)
    assert_same(final_disc, reference_disc, "disc_final.pt")
    assert [r["step"] for r in read_rows(run.run_dir / "metrics.jsonl")] == list(range(1, 13))


def test_adv_three_kills(tmp_path, pretrain_ref, adv_ref):
    # One kill aimed at a checkpoint write, two at random steps or delays.
    run = run_with_kills("03_adv_finetune.py", TINY, tmp_path / "run", f"model.pretrained={pretrain_ref / 'model'}",
                         *ADV, kills=3, seed=3, modes=["write", "step", "delay"], max_step=2, max_delay=0.5)
    assert run.kills >= 2, [(a.mode, a.killed, a.returncode) for a in run.attempts]
    final = load_checkpoint(last_checkpoint(run.run_dir))
    reference = load_checkpoint(last_checkpoint(adv_ref))
    assert final["step"] == 8
    for part in ("gen", "ema", "disc", "g_opt", "d_opt"):
        assert_same(final[part], reference[part], part)
    assert [r["step"] for r in read_rows(run.run_dir / "metrics.jsonl")] == list(range(1, 9))
    assert not temporary_files(run.run_dir)


# --- SIGUSR1: checkpoint, exit 75, resume ----------------------------------------------------------


@pytest.mark.parametrize("stage", ["00", "03"])
def test_sigusr1_requeue(tmp_path, stage, pretrain_ref, request):
    if stage == "00":
        script, args, ref, parts = "00_pretrain.py", PRETRAIN, pretrain_ref, ("unet", "ema", "optimizer")
    else:
        script, args, parts = "03_adv_finetune.py", [f"model.pretrained={pretrain_ref / 'model'}", *ADV], ("gen", "ema")
        ref = request.getfixturevalue("adv_ref")
    run_dir = tmp_path / "run"
    stopped = run_with_stop_signal(script, TINY, run_dir, *args, after_step=2)
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    line = next(text for text in stopped.stdout.splitlines() if "received SIGUSR1" in text)
    step = int(line.split("checkpoint written at step ")[1].split(",")[0])
    assert last_checkpoint(run_dir).name == f"ckpt_{step:06d}.pt"
    assert load_checkpoint(last_checkpoint(run_dir))["step"] == step

    resumed = run_stage(script, TINY, f"run_dir={run_dir}", *args, "resume=auto")
    assert f"at step {step}" in resumed.stdout
    final = load_checkpoint(last_checkpoint(run_dir))
    reference = load_checkpoint(last_checkpoint(ref))
    for part in parts:
        assert_same(final[part], reference[part], part)


def test_live_run_dir_locked(tmp_path):
    run_dir = tmp_path / "run"
    first = start(stage_command("00_pretrain.py", TINY, run_dir, "train.steps=100000", "train.ckpt_every=100000",
                                "train.sample_every=0", "train.log_every=1"))
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "first run did not start training"
            time.sleep(0.05)
        config_before = (run_dir / "config.yaml").read_bytes()
        second = run_stage("00_pretrain.py", TINY, f"run_dir={run_dir}", "train.steps=3", check=False)
        assert_user_error(second, "is in use by a live run", f"pid {first.pid}")
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert first.poll() is None, "the first run stopped"
    finally:
        first.send_signal(signal.SIGUSR1)
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == EXIT_REQUEUE, stderr[-2000:]


# --- bad input: one line, no traceback, nothing lost ------------------------------------------------


def test_unknown_key(existing_run, tmp_path, capsys):
    result = rerun_on(existing_run, tmp_path, "train.lrr=1e-4", capsys=capsys)
    assert_user_error(result, "unknown config key 'train.lrr'", "did you mean 'train.lr'")


def test_wrong_type_and_float_lr():
    with pytest.raises(ValueError, match="train.steps: expected an integer, got 'abc'"):
        load_config(REPO / TINY, ["train.steps=abc"])
    assert load_config(REPO / TINY, ["train.lr=1e-4"]).train.lr == 1e-4
    assert load_config(REPO / TINY, ["train.lr=1"]).train.lr == 1.0


def test_wrong_type_cli(existing_run, tmp_path, capsys):
    result = rerun_on(existing_run, tmp_path, "train.steps=abc", capsys=capsys)
    assert_user_error(result, "train.steps: expected an integer, got 'abc'")


def test_missing_data_root(existing_run, tmp_path, capsys):
    result = rerun_on(existing_run, tmp_path, "data.source=folder", capsys=capsys)
    assert_user_error(result, "data.root is not set", "data.root=")


def test_empty_and_non_image_folders(existing_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    result = rerun_on(existing_run, tmp_path / "a", "data.source=folder", f"data.root={tmp_path / 'empty'}",
                      capsys=capsys)
    assert_user_error(result, "no images found", str(tmp_path / "empty"))

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not an image")
    (other / "labels.csv").write_text("a,b\n")
    result = rerun_on(existing_run, tmp_path / "b", "data.source=folder", f"data.root={other}", capsys=capsys)
    assert_user_error(result, "no images found", str(other))


def test_bad_images_named(existing_run, tmp_path, capsys):
    folder = write_images(tmp_path / "images", [(20, 20)] * 3)
    good = (folder / "000.png").read_bytes()
    (folder / "zero.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "noise.jpg").write_bytes(b"\xff\xd8not a jpeg" * 8)
    result = rerun_on(existing_run, tmp_path, "data.source=folder", f"data.root={folder}", "data.on_bad_image=error",
                      capsys=capsys)
    assert_user_error(result, "zero.png", "cut.png", "noise.jpg")


def test_mixed_size_training_data(tmp_path, capsys):
    folder = write_images(tmp_path / "images", [(20, 24), (16, 16), (40, 30)] * 4)
    result = run_in_process("00_pretrain.py", TINY, f"run_dir={tmp_path / 'run'}", "data.source=folder", f"data.root={folder}",
              "train.steps=2", "train.batch_per_gpu=4", "train.sample_every=0", capsys=capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "model").is_dir()


@pytest.fixture(scope="module")
def eval_args(tmp_path_factory):
    """01 settings with a small reference set and a private feature cache."""
    cache = tmp_path_factory.mktemp("feature_cache")
    return ["data.max_images=16", f"metrics.cache_dir={cache}"]


def test_mixed_size_samples_rejected(tmp_path, eval_args, capsys):
    folder = write_images(tmp_path / "samples", [(16, 16), (20, 16)] * 3)
    result = run_in_process("01_baseline.py", TINY, f"run_dir={tmp_path / 'run'}", f"sample.dir={folder}", *eval_args,
                            capsys=capsys)
    assert_user_error(result, "mixed sizes", str(folder))


def test_too_few_samples(tmp_path, eval_args, capsys):
    folder = write_images(tmp_path / "samples", [(16, 16)])
    result = run_in_process("01_baseline.py", TINY, f"run_dir={tmp_path / 'run'}", f"sample.dir={folder}", *eval_args,
                            capsys=capsys)
    assert_user_error(result, "fid: needs at least 2 samples")


def test_pixel_disc_guidance(tmp_path, pretrain_ref, disc_ref, eval_args, capsys):
    result = run_in_process("01_baseline.py", TINY, f"run_dir={tmp_path / 'run'}",
                            f"model.pretrained={pretrain_ref / 'model'}", f"guidance.disc={disc_ref / 'disc_final.pt'}",
                            "guidance.weight=1", *eval_args, capsys=capsys)
    assert_user_error(result, "pixel-mode discriminator", "disc.mode=noisy")


def test_eval_run_without_samples(tmp_path, eval_args, capsys):
    run_dir = tmp_path / "disc_run"
    write_images(run_dir / "grids", [(16, 16)] * 2)  # grids are not samples
    (run_dir / "config.yaml").write_text("seed: 0\n")
    result = run_in_process("04_eval.py", TINY, f"run_dir={tmp_path / 'eval'}", f"runs=[{run_dir}]", *eval_args,
                            capsys=capsys)
    assert_user_error(result, f"run {run_dir} has no samples/ or model/")


def test_eval_size_checked_first(tmp_path, eval_args, capsys):
    small = write_images(tmp_path / "small", [(16, 16)] * 6)
    large = write_images(tmp_path / "large", [(32, 32)] * 6)
    result = run_in_process("04_eval.py", TINY, f"run_dir={tmp_path / 'eval'}", f"runs=[{small},{large}]",
                            *eval_args, capsys=capsys)
    assert_user_error(result, "large: ", "is 32x32 px but data.resolution=16")
    assert "inception features" not in result.stderr  # stopped before any feature pass


def test_model_resolution_mismatch(tmp_path, pretrain_ref, eval_args, capsys):
    result = run_in_process("01_baseline.py", TINY, f"run_dir={tmp_path / 'run'}", "data.resolution=32",
                            f"model.pretrained={pretrain_ref / 'model'}", *eval_args, capsys=capsys)
    assert_user_error(result, "generates 16 px images but data.resolution=32", "set data.resolution=16")


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_damaged_model_folder(tmp_path, pretrain_ref, eval_args, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(pretrain_ref / "model", model)
    if damage == "config":
        target = model / "unet" / "config.json"
        target.write_text(target.read_text().replace('"', "'", 3))
    else:
        target = model / "unet" / "diffusion_pytorch_model.safetensors"
        target.write_bytes(target.read_bytes()[:100])
    result = run_in_process("01_baseline.py", TINY, f"run_dir={tmp_path / 'run'}", f"model.pretrained={model}",
                            *eval_args, capsys=capsys)
    assert_user_error(result, "failed to load", "export or download it again")


def test_checkpoint_file_mode(tmp_path):
    from common.rundir import atomic_torch_save

    atomic_torch_save({"w": torch.ones(1)}, tmp_path / "ckpt.pt")

    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_model_offline(existing_run, tmp_path):
    hub = tmp_path / "hf"
    hub.mkdir()
    result = rerun_on(existing_run, tmp_path / "a", "model.pretrained=google/ddpm-ema-celebahq-256", "offline=true",
                      env={"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "google/ddpm-ema-celebahq-256", "huggingface-cli download google/ddpm-ema-celebahq-256",
                      "model.pretrained")


@pytest.mark.parametrize("script", ["00_pretrain.py", "02_train_disc.py"])
def test_missing_model_before_data(tmp_path, capsys, script):
    # An empty image folder would fail too, but only after the data pass. The model is checked first.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_in_process(script, TINY, f"run_dir={tmp_path / 'run'}", f"model.pretrained={tmp_path / 'nothing'}",
                            "data.source=folder", f"data.root={empty}", capsys=capsys)
    assert_user_error(result, "model.pretrained", str(tmp_path / "nothing"))
    assert "no images found" not in result.stderr


def test_inception_offline(tmp_path, eval_args, capsys, monkeypatch):
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    result = run_in_process("01_baseline.py", TINY, f"run_dir={tmp_path / 'run'}", "metrics.features=inception",
                            "offline=true", *eval_args, capsys=capsys)
    assert_user_error(result, "pt_inception-2015-12-05-6726825d.pth", "metrics.inception_weights")
    assert str(torch_home) in result.stderr


def test_checkpoint_other_architecture(existing_run, tmp_path, capsys):
    checkpoint = last_checkpoint(existing_run)
    result = run_in_process("00_pretrain.py", TINY, f"run_dir={tmp_path / 'run'}",
                            "model.unet.block_out_channels=[8, 16]", f"resume={checkpoint}", capsys=capsys)
    assert_user_error(result, str(checkpoint), "does not match", "size mismatch")


def test_nan_loss_keeps_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = run_in_process("00_pretrain.py", TINY, f"run_dir={run_dir}", "train.lr=1e30", "train.ckpt_every=1",
                            "train.sample_every=0", capsys=capsys)
    assert_user_error(result, "non-finite loss at step", "resume=auto")
    kept = last_checkpoint(run_dir)
    state = load_checkpoint(kept)
    assert all(torch.isfinite(t).all() for t in state["unet"].values())
    assert not temporary_files(run_dir)


def test_full_disk_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(REPO / TINY, [f"run_dir={tmp_path / 'run'}"])
    run = RunDir(cfg, "test")
    try:
        first = run.save({"w": torch.arange(4.0)}, 1, keep_last=2)

        def partial_save(obj, f, *args, **kwargs):
            f.write(b"partial checkpoint bytes")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", partial_save)
        with pytest.raises(RunDirError, match="no space left on device") as caught:
            run.save({"w": torch.zeros(4)}, 2, keep_last=2)
        monkeypatch.undo()
    finally:
        run.release()
    assert "ckpt_000002.pt" in str(caught.value)
    assert "resume=auto" in str(caught.value)
    assert [p.name for p in run.checkpoints()] == [first.name]
    assert torch.equal(load_checkpoint(first)["w"], torch.arange(4.0))
    assert not temporary_files(run.path)


def test_stale_temporary_removed(tmp_path):
    cfg = load_config(REPO / TINY, [f"run_dir={tmp_path / 'run'}"])
    stale = tmp_path / "run" / "checkpoints" / ".ckpt_000004.pt.abc123.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"cut short by a kill")
    RunDir(cfg, "test").release()
    assert not stale.exists()


def test_changed_config_kept(tmp_path):
    first = RunDir(load_config(REPO / TINY, [f"run_dir={tmp_path}", "seed=1"]), "test")
    first.release()
    original = (tmp_path / "config.yaml").read_text()
    RunDir(load_config(REPO / TINY, [f"run_dir={tmp_path}", "seed=2"]), "test").release()
    kept = [p.read_text() for p in tmp_path.glob("config.*.yaml")]
    assert kept == [original]
    assert "seed: 2" in (tmp_path / "config.yaml").read_text()


def test_warnings_reach_log_txt(tmp_path, capsys):
    run = RunDir(load_config(REPO / TINY, [f"run_dir={tmp_path}"]), "test")
    logging.getLogger("common.data").warning("skipped 2 unreadable image files of %s", "faces/")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("FID from 40 samples is biased")
    run.release()
    logging.getLogger("common.data").warning("after the run")
    log = (tmp_path / "log.txt").read_text()
    assert "warning: skipped 2 unreadable image files of faces/" in log
    assert "warning: UserWarning: FID from 40 samples is biased" in log
    assert "after the run" not in log
    # Logged warnings still reach stderr (pytest itself records warnings.warn, so it is not checked here).
    err = capsys.readouterr().err
    assert "skipped 2 unreadable" in err
    assert "after the run" in err


def test_resume_none_sets_old_run_aside(tmp_path):
    run = RunDir(load_config(REPO / TINY, [f"run_dir={tmp_path}"]), "test")
    run.save({"w": torch.ones(2)}, step=30, keep_last=2)
    run.append_jsonl("metrics.jsonl", {"step": 30, "loss": 1.0})

    assert run.resume_path("none") is None

    aside = list(tmp_path.glob("replaced-*"))
    assert len(aside) == 1
    assert (aside[0] / "checkpoints" / "ckpt_000030.pt").is_file()
    assert json.loads((aside[0] / "metrics.jsonl").read_text())["step"] == 30
    assert run.checkpoints() == []
    assert not (tmp_path / "metrics.jsonl").exists()
    # The fresh run's checkpoints are not pruned in favour of the old, later ones.
    run.save({"w": torch.zeros(2)}, step=5, keep_last=1)
    assert run.resume_path("auto") == tmp_path / "checkpoints" / "ckpt_000005.pt"
    run.release()


# --- safety audit of the sources --------------------------------------------------------------------


def python_sources():
    skip = {".git", ".ruff_cache", ".pytest_cache", "runs", "__pycache__"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def keyword(node, name):
    for kw in node.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_safe_loading_audit():
    violations = []
    for path in python_sources():
        text = path.read_text()
        for node, name in calls(ast.parse(text)):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load" and keyword(node, "weights_only") is not True:
                violations.append(f"{where}: torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.full_load", "yaml.unsafe_load", "yaml.load_all"):
                violations.append(f"{where}: {name}; use yaml.safe_load")
            if name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") not in (None, False):
                violations.append(f"{where}: {name} with allow_pickle")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler") and "allow_pickle" not in text \
                    and "allow-pickle" not in text:
                violations.append(f"{where}: {name} outside an allow_pickle guard")
    assert not violations, "\n".join(violations)


# --- SLURM scripts with mocked srun, scancel and scontrol ------------------------------------------

MOCKS = {
    # srun: drop its options, record the step's pid (kept by exec), run the command.
    "srun": '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\necho $$ > "$MOCK_DIR/step.pid"\nexec "$@"\n',
    # scancel --signal=SIG JOB: send SIG to every process of the step except the step's
    # own first process, as slurmstepd would to all of them (torchrun ignores USR1 here).
    "scancel": '#!/bin/bash\nsig=${1#--signal=}\necho "scancel $*" >> "$MOCK_DIR/calls"\n'
               'tree() { for c in $(ps -o pid= --ppid "$1"); do echo "$c"; tree "$c"; done; }\n'
               'root=$(cat "$MOCK_DIR/step.pid")\nfor p in $root $(tree "$root"); do kill -s "$sig" "$p" || true; done\n',
    "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$MOCK_DIR/calls"\n'
                'if [[ $1 == show ]]; then echo localhost; fi\n',
    # The venv's torchrun entry point may carry a stale shebang; the module is the same program.
    "torchrun": f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n',
}


def test_sbatch_syntax():
    for name in ("single_node.sbatch", "multi_node.sbatch", "launch.sh"):
        result = subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"
    for name in ("single_node.sbatch", "multi_node.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert "#SBATCH --requeue" in text
        assert "#SBATCH --signal=B:USR1@120" in text


def test_sbatch_usr1_requeues(tmp_path):
    mock_dir = tmp_path / "mock"
    mock_dir.mkdir()
    for name, text in MOCKS.items():
        (mock_dir / name).write_text(text)
        (mock_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{mock_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MOCK_DIR": str(mock_dir), "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "ASSETS": str(tmp_path / "assets"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    batch = subprocess.Popen(["bash", str(REPO / "slurm" / "single_node.sbatch"), "00_pretrain.py", TINY,
                              f"run_dir={run_dir}", "train.steps=100000", "train.ckpt_every=100000",
                              "train.sample_every=0", "train.log_every=1"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").is_file():
        assert batch.poll() is None and time.monotonic() < deadline, batch.communicate()[0][-3000:]
        time.sleep(0.1)
    batch.send_signal(signal.SIGUSR1)
    output, _ = batch.communicate(timeout=180)
    assert batch.returncode == 0, output[-3000:]
    calls = (mock_dir / "calls").read_text()
    assert "scancel --signal=USR1 4242" in calls
    assert "scontrol requeue 4242" in calls, output[-3000:]
    assert "exiting with code 75" in (run_dir / "log.txt").read_text()
    assert last_checkpoint(run_dir).is_file()


def test_run_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "run_file"
    target.write_text("keep me")
    result = run_stage("00_pretrain.py", "configs/tiny.yaml", f"run_dir={target}", check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "is an existing file" in result.stderr
    assert target.read_text() == "keep me"


def test_invalid_learning_rate_and_resolution():
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.lr: the learning rate must be a finite number >= 0, got -1.0"):
        load_config("configs/tiny.yaml", ["train.lr=-1"])
    with pytest.raises(ConfigError, match="data.resolution: must be a power of two >= 8"):
        load_config("configs/tiny.yaml", ["data.resolution=7"])
