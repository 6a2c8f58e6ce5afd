"""The README's demo command, end to end on a much smaller setting."""

import subprocess

from conftest import REPO

SMALL = ["data.resolution=16", "train.steps=4", "train.sample_every=0", "train.ckpt_every=4", "train.grid_steps=3",
         "sample.num=12", "sample.steps=3", "sample.batch_per_gpu=6", "sample.grid_size=4", "metrics.real_max=16",
         "metrics.kid_subset_size=6", "metrics.is_splits=2", "metrics.bootstrap=3", "metrics.c2st_steps=5", "metrics.c2st_batch=8",
         "disc.steps=4", "disc.eval_every=0", "disc.eval_num=4", "disc.t_buckets=2", "disc.fake_buffer=8",
         "disc.channels=16", "disc.max_channels=32", "adv.steps=3", "adv.steps_total=2", "adv.eval_every=2",
         "adv.eval_num=8", "adv.grid_size=4", "adv.ckpt_every=2"]


def test_demo_script_prints_table(tmp_path):
    import sys

    out = tmp_path / "demo"
    result = subprocess.run(["bash", str(REPO / "demo.sh"), str(out), *SMALL], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                         "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "eval" / "results.md").read_text()
    assert "| baseline |" in table
    assert "| finetune |" in table
    assert "fid" in table.lower()
    assert "c2st" in table.lower()
    assert table.splitlines()[0] in result.stdout  # the table is printed at the end
    for path in ("baseline/grid.png", "finetune/model/model_index.json", "eval/grids/pair_finetune.png"):
        assert (out / path).exists(), path


def test_recipe_stage_configs_valid(tmp_path):
    import sys

    faces = tmp_path / "faces"
    faces.mkdir()  # --dry-run stops before any stage reads it
    result = subprocess.run(["bash", str(REPO / "recipe_faces.sh"), str(faces), str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "DRY_RUN": "1",
                                 "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = [line for line in result.stdout.splitlines() if line.startswith("=== ")]
    assert len(stages) == 10, stages
    assert "trainable:\n    lora:" in result.stdout  # the LoRA variant's nested override parsed
