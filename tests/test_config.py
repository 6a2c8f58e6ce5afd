"""Config loading: overrides, type checks, unknown keys, dry run."""

import pytest
import yaml

from common.config import Config, ConfigError, load_config, parse_override
from conftest import REPO, run_stage


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_apply_dotted_keys(tiny_config):
    cfg = load_config(tiny_config, ["run_dir=runs/a", "train.lr=2e-4", "sample.steps=7", "eval.runs=[a, b]"])
    assert cfg.run_dir == "runs/a"
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.sample.steps == 7
    assert cfg.eval.runs == ["a", "b"]


def test_yaml_exponent_string_is_float(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 without a dot as the string "1e-4".
    assert isinstance(yaml.safe_load("lr: 1e-4")["lr"], str)
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-4\n"))
    assert cfg.train.lr == pytest.approx(1e-4)


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rte'.*") as info:
        load_config(write(tmp_path, "train:\n  learning_rte: 0.1\n"))
    assert "c.yaml" in str(info.value)
    with pytest.raises(ConfigError, match=r"did you mean 'sample.steps'"):
        load_config(None, ["sample.stepz=3"])


def test_unknown_section_suggests_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'metrics'"):
        load_config(None, ["metric.features=inception"])


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'many'"):
        load_config(write(tmp_path, "train:\n  steps: many\n"))
    with pytest.raises(ConfigError, match=r"data.flip: expected true or false"):
        load_config(None, ["data.flip=3"])
    with pytest.raises(ConfigError, match=r"train.lr: expected a number"):
        load_config(None, ["train.lr=fast"])


def test_invalid_choice_lists_options():
    with pytest.raises(ConfigError, match=r"sample.sampler: invalid value 'euler'; expected one of ddim, ddpm"):
        load_config(None, ["sample.sampler=euler"])


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]
    assert isinstance(cfg, Config)


def test_override_without_equals_rejected():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_all_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_dry_run_prints_resolved_config(tiny_config, tmp_path):
    result = run_stage("00_pretrain.py", str(tiny_config), f"run_dir={tmp_path / 'r'}", "train.lr=3e-3", "--dry-run")
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["lr"] == pytest.approx(3e-3)
    assert not (tmp_path / "r").exists()


def test_cli_error_is_one_line(tiny_config):
    result = run_stage("00_pretrain.py", str(tiny_config), "train.stepss=3", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "did you mean 'train.steps'" in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=0", "train.steps: must be at least 1, got 0"),
        ("train.log_every=0", "train.log_every: must be at least 1"),
        ("disc.steps=-1", "disc.steps: must be at least 1"),
        ("adv.steps_total=0", "adv.steps_total: must be at least 1"),
        ("metrics.kid_subset_size=0", "metrics.kid_subset_size: must be at least 1"),
        ("train.grad_clip=-1", "train.grad_clip: must be a finite number >= 0"),
        ("train.lr=.inf", "train.lr: the learning rate must be a finite number >= 0"),
        ("train.ema_decay=2", "train.ema_decay: must be in [0, 1)"),
        ("data.resolution=24", "data.resolution: must be a power of two >= 8"),
        ("data.resolution=4", "data.resolution: must be a power of two >= 8"),
    ],
)
def test_out_of_range_values_rejected(tiny_config, override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(tiny_config, [override])

    assert message in str(caught.value)


def test_yaml_syntax_error_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  resolution: [16\nmodel: {\n")

    with pytest.raises(ConfigError) as caught:
        load_config(bad)

    assert str(bad) in str(caught.value)
    assert "at line 3, column 6" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_override_error_blames_command_line(tiny_config):
    with pytest.raises(ConfigError) as caught:
        load_config(tiny_config, ["data.resolution=16.5"])

    assert str(caught.value).endswith("(from the command line)")
