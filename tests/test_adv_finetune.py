"""Tests of 03_adv_finetune.py and common/finetune.py on a tiny U-Net (16 px, CPU)."""

import json
import shutil
import time

import pytest
import torch
from conftest import REPO, run_stage

from common import finetune, gan
from common.config import load_config
from common.diffusion import Sampler
from common.discriminators import build_discriminator
from common.models import export_pipeline, load_model
from common.rundir import load_checkpoint

torch.set_num_threads(2)

# Fast settings for the subprocess runs: one evaluation at the end, C2ST only.
FAST = ["adv.eval_metrics=[c2st]", "adv.eval_num=8", "resume=none"]
# Settings under which 1 and 2 processes compute the same global-batch gradients:
# no DiffAugment, no R1, no minibatch std (it mixes samples), no denoising loss (its
# noise comes from each rank's own RNG stream).
EXACT = ["disc.diffaug=''", "disc.r1_gamma=0", "disc.mbstd_group=0", "adv.lambda_dsm=0", "adv.eval_every=0"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised tiny U-Net exported as a DDPMPipeline folder."""
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = load_model(cfg)
    folder = tmp_path_factory.mktemp("pretrained") / "model"
    export_pipeline(model.unet, model.scheduler, folder)
    return folder


def make_cfg(tiny_config, model_dir, *overrides):
    return load_config(tiny_config, [f"model.pretrained={model_dir}", *overrides])


def generator_grads(cfg, seed=0):
    """Build the pieces of a generator step and backpropagate the adversarial loss once."""
    torch.manual_seed(seed)
    model = load_model(cfg)
    disc = build_discriminator(cfg.disc, cfg.data.resolution)
    trainable = finetune.select_trainable(model.unet, cfg.adv.trainable)
    if trainable.lora:
        # peft starts lora_B at zero, which makes lora_A's gradient zero; move off that point.
        with torch.no_grad():
            for name, p in trainable.module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    sampler = Sampler(trainable.module, model.scheduler, cfg.adv.sampler, cfg.adv.steps)
    plan = finetune.plan_rollout(cfg.adv, sampler, cfg.seed, 0)
    fakes = finetune.generate_fakes(sampler, model.decode, [1, 2], model.sample_shape, torch.device("cpu"), plan,
                                    cfg.adv.mode, grad=True, use_checkpoint=cfg.adv.checkpointing)
    real = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, _ = finetune.generator_loss(fakes, disc, real, trainable.module, model.scheduler, cfg,
                                      torch.Generator().manual_seed(0), trainable.params, None)
    loss.backward()
    return trainable, disc


MODES = {"chain_full": ["adv.mode=chain", "adv.grad_steps=all"],
         "chain_k": ["adv.mode=chain", "adv.grad_steps=1"],
         "steps": ["adv.mode=steps", "adv.feedback_t=[600]"]}
SELECTIONS = {"all": ["adv.trainable=all"],
              "output_blocks": ["adv.trainable={output_blocks: 1}"],
              "patterns": ["adv.trainable={patterns: ['attentions', 'conv_out']}"],
              "lora": ["adv.trainable={lora: {rank: 2, target_modules: [to_q, to_v, conv1]}}"]}


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_every_trainable_gets_gradient(tiny_config, tiny_model, mode, selection):
    cfg = make_cfg(tiny_config, tiny_model, *MODES[mode], *SELECTIONS[selection], "adv.lambda_dsm=0",
                   "disc.diffaug=''")
    trainable, disc = generator_grads(cfg)
    for name, p in zip(trainable.names, trainable.params):
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has a zero gradient"
    frozen = [n for n, p in trainable.module.named_parameters() if not p.requires_grad]
    if selection != "all":
        assert frozen
    for name, p in trainable.module.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
    if selection == "lora":
        assert all("lora_" in n for n in trainable.names)


def test_lora_trains_adapter_only(tiny_config, tiny_model):
    cfg = make_cfg(tiny_config, tiny_model, "adv.trainable={lora: {rank: 2}}", "disc.diffaug=''")
    trainable, _ = generator_grads(cfg)
    base = {n: p.detach().clone() for n, p in trainable.module.named_parameters() if not p.requires_grad}
    adapters = trainable.state_dict()
    torch.optim.SGD(trainable.params, lr=0.1).step()
    for name, p in trainable.module.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"base weight {name} changed"
    changed = [n for n, p in zip(trainable.names, trainable.params) if not torch.equal(p, adapters[n])]
    assert changed
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        adapted = trainable.module(x, t).sample
        merged = finetune.merged_unet(trainable)(x, t).sample
    assert type(finetune.merged_unet(trainable)).__name__ == "UNet2DModel"
    assert torch.allclose(merged, adapted, atol=1e-5)


def test_truncation_drops_early_steps(tiny_config, tiny_model):
    cfg = make_cfg(tiny_config, tiny_model, "adv.steps=3")
    torch.manual_seed(0)
    model = load_model(cfg)
    unet = model.unet
    sampler = Sampler(unet, model.scheduler, "ddim", 3)
    seeds = [5, 6]
    weight = torch.randn(2, 3, 16, 16)

    def grads(fn):
        unet.zero_grad(set_to_none=True)
        (fn() * weight).sum().backward()
        return [p.grad.clone() for p in unet.parameters()]

    truncated = grads(lambda: sampler.sample(seeds, model.sample_shape, "cpu", grad_steps=1, use_checkpoint=True))
    with torch.no_grad():
        x_mid = sampler.sample(seeds, model.sample_shape, "cpu", stop_index=2)
    detached = grads(lambda: sampler.step(x_mid.detach(), 2, seeds))
    full = grads(lambda: sampler.sample(seeds, model.sample_shape, "cpu", grad_steps=3, use_checkpoint=True))
    for a, b in zip(truncated, detached):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(full, truncated))


def test_random_k_and_feedback_t(tiny_config, tiny_model):
    cfg = make_cfg(tiny_config, tiny_model, "adv.grad_steps=random", "adv.grad_steps_max=2", "adv.steps=3")
    model = load_model(cfg)
    sampler = Sampler(model.unet, model.scheduler, "ddim", 3)
    ks = [finetune.plan_rollout(cfg.adv, sampler, 0, step).grad_steps for step in range(40)]
    assert set(ks) == {1, 2}
    assert ks == [finetune.plan_rollout(cfg.adv, sampler, 0, step).grad_steps for step in range(40)]
    steps_cfg = make_cfg(tiny_config, tiny_model, "adv.mode=steps", "adv.feedback_t=[640]", "adv.steps=3")
    plan = finetune.plan_rollout(steps_cfg.adv, sampler, 0, 0)
    assert plan.t == min(sampler.timesteps, key=lambda t: abs(t - 640))
    assert sampler.timesteps[plan.index] == plan.t


@pytest.mark.parametrize("spec, key", [
    ({"foo": 1}, "adv.trainable.foo"),
    ({"lora": {"rank": 2, "dropout": 0.1}}, "adv.trainable.lora.dropout"),
    ({"output_blocks": 0}, "adv.trainable.output_blocks"),
    ({"patterns": ["("]}, "adv.trainable.patterns[0]"),
    ("some", "adv.trainable"),
])
def test_trainable_spec_errors(spec, key):
    with pytest.raises(finetune.FinetuneError, match=key.replace("[", r"\[").replace("]", r"\]")):
        finetune.parse_trainable(spec)


def test_output_blocks_too_many(tiny_config, tiny_model):
    model = load_model(make_cfg(tiny_config, tiny_model))
    with pytest.raises(finetune.FinetuneError, match="exceeds the U-Net's 2 up-blocks"):
        finetune.select_trainable(model.unet, {"output_blocks": 3})


@pytest.mark.parametrize("seconds, expected", [
    ({2: 2.0, 1: 1.5}, 2.0 + 0.5 * 6),  # fixed part 1 s, 0.5 s per sample
    ({2: 2.0, 1: 1.0}, 8.0),  # no fixed part: in proportion to the batch
    ({2: 2.0, 1: 0.5}, 8.0),  # faster than in proportion (noise): capped at proportional
    ({2: 2.0, 1: 2.5}, 2.0),  # batch 1 slower (noise): the slope is not negative
])
def test_estimate_time_line(seconds, expected):
    estimate = finetune.extrapolate(finetune.Probe(0, 0, seconds), 0, 8, 10, 1, "test")
    assert estimate.sec_per_step == pytest.approx(expected)
    assert estimate.total_min == pytest.approx(expected * 10 / 60)


def test_measure_times_warm_steps():
    calls = []

    def step(batch):
        calls.append(batch)
        time.sleep(0.2 if len(calls) in (1, 3) else 0.01 * batch)  # first call at each batch is slow

    probe = finetune.measure(step, 2, torch.device("cpu"))
    assert calls == [2, 2, 1, 1]
    assert set(probe.seconds) == {1, 2}
    assert probe.seconds[2] < 0.15
    assert probe.seconds[1] < 0.15
    assert probe.peak >= probe.before > 0


def test_estimate_check_suggests_fixes():
    estimate = finetune.extrapolate(finetune.Probe(1 * 2**30, 3 * 2**30, {2: 2.0}), 0, 8, 100, 5, "test")
    assert estimate.peak_gb == pytest.approx(1 + 2 * 4)
    assert estimate.sec_per_step == pytest.approx(8.0)
    with pytest.raises(finetune.MemoryEstimateError, match="adv.grad_steps=K with K < 5") as error:
        finetune.check_estimate(estimate, 4.0, torch.device("cpu"), "chain")
    assert "adv.mode=steps" in str(error.value)
    assert "lora" in str(error.value)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["chain", "steps"])
def test_smoke_run(tiny_config, tiny_model, tmp_path, mode):
    extra = ["adv.trainable={lora: {rank: 2}}", "adv.lr=0.01"] if mode == "steps" else ["adv.grad_steps=2"]
    result = run_stage("03_adv_finetune.py", str(tiny_config), f"run_dir={tmp_path}", f"model.pretrained={tiny_model}",
                       f"adv.mode={mode}", "adv.eval_every=4", *FAST, *extra)
    lines = result.stdout.splitlines()
    estimate = [i for i, line in enumerate(lines) if line.startswith("estimate: ")]
    assert estimate, result.stdout
    later = [i for i, line in enumerate(lines) if line.startswith(("eval at step", "saved checkpoint"))]
    assert later and estimate[0] < min(later)
    assert " GB peak, " in lines[estimate[0]]
    assert " min total" in lines[estimate[0]]
    rows = read_jsonl(tmp_path / "eval.jsonl")
    assert [row["step"] for row in rows] == [0, 4]
    assert "c2st_accuracy" in rows[-1]["metrics"]
    assert rows[-1]["checkpoint"].endswith("ckpt_000004.pt")
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("g_adv", "d_loss", "real_logit", "fake_logit", "g_grad_norm", "d_grad_norm", "grad_steps"):
        assert key in metrics[0]
    assert "r1" in metrics[0]  # lazy R1 runs at D step 0
    for name in ("before.png", "step_000004.png", "before_after.png"):
        assert (tmp_path / "grids" / name).is_file()
    assert (tmp_path / "model" / "unet" / "config.json").is_file()
    if mode == "steps":
        assert (tmp_path / "lora_adapter" / "adapter_config.json").is_file()
        assert metrics[0]["grad_steps"] == 1
        check_export_loads(tiny_config, tiny_model, tmp_path / "model")


def check_export_loads(tiny_config, pretrained, exported_dir):
    """Check that the exported folder samples through DDPMPipeline and contains weights that moved."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(exported_dir)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    assert images.min() >= 0
    assert images.max() <= 1
    exported = load_model(load_config(tiny_config, [f"model.pretrained={exported_dir}"])).unet
    original = load_model(load_config(tiny_config, [f"model.pretrained={pretrained}"])).unet
    assert type(exported).__name__ == "UNet2DModel"
    assert any(not torch.equal(a, b) for a, b in zip(exported.parameters(), original.parameters()))


def final_state(run_dir):
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1]
    return load_checkpoint(ckpt)


def assert_states_close(a, b, atol):
    for part in ("gen", "disc"):
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=atol), f"{part}.{key} differs"
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.allclose(x, y, atol=atol)


def test_resume_and_probe_match(tiny_config, tiny_model, tmp_path):
    common = [str(tiny_config), f"model.pretrained={tiny_model}", "adv.eval_every=0", "adv.eval_metrics=[c2st]",
              "adv.ckpt_every=3", "adv.steps_total=6", "adv.lr=0.001"]
    run_stage("03_adv_finetune.py", *common, f"run_dir={tmp_path / 'a'}", "adv.probe=false", "resume=none")
    run_stage("03_adv_finetune.py", *common, f"run_dir={tmp_path / 'b'}", "adv.steps_total=3", "resume=none")
    second = run_stage("03_adv_finetune.py", *common, f"run_dir={tmp_path / 'b'}", "resume=auto")
    assert "resumed from" in second.stdout
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    assert_states_close(a, b, atol=1e-6)
    assert [m["step"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_lost_evaluation_redone_on_resume(tiny_config, tiny_model, tmp_path):
    common = [str(tiny_config), f"model.pretrained={tiny_model}", f"run_dir={tmp_path}", "adv.probe=false",
              "adv.steps_total=2", "adv.ckpt_every=2", "adv.eval_every=2", "adv.eval_metrics=[c2st]", "adv.eval_num=8"]
    run_stage("03_adv_finetune.py", *common, "resume=none")
    # A kill after the step-2 checkpoint but during its evaluation: no step-2 row, no export.
    rows = read_jsonl(tmp_path / "eval.jsonl")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] != 2))
    shutil.rmtree(tmp_path / "model")

    result = run_stage("03_adv_finetune.py", *common, "resume=auto")

    assert "resumed from" in result.stdout
    assert [row["step"] for row in read_jsonl(tmp_path / "eval.jsonl")] == [0, 2]
    assert (tmp_path / "model" / "model_index.json").is_file()


def test_two_processes_match_one(tiny_config, tiny_model, tmp_path):
    common = [str(tiny_config), f"model.pretrained={tiny_model}", "adv.steps_total=2", "adv.probe=false",
              "adv.ckpt_every=2", "adv.lr=0.001", "adv.trainable={lora: {rank: 2}}", *EXACT, *FAST]
    run_stage("03_adv_finetune.py", *common, f"run_dir={tmp_path / 'one'}", "adv.batch_per_gpu=2")
    # check_replicas raises at each checkpoint when the ranks' parameters differ.
    run_stage("03_adv_finetune.py", *common, f"run_dir={tmp_path / 'two'}", "adv.batch_per_gpu=1", nproc=2)
    assert_states_close(final_state(tmp_path / "one"), final_state(tmp_path / "two"), atol=1e-5)


def test_memory_limit_stops(tiny_config, tiny_model, tmp_path):
    result = run_stage("03_adv_finetune.py", str(tiny_config), f"run_dir={tmp_path}", f"model.pretrained={tiny_model}",
                       "adv.max_memory_gb=0.0001", *FAST, check=False)
    assert result.returncode != 0
    assert result.stdout.lstrip().splitlines()[-1].startswith("estimate: ")
    assert "exceeds adv.max_memory_gb" in result.stderr
    assert "adv.mode=steps" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "checkpoints").glob("ckpt_*.pt"))


def test_disc_checkpoint_is_used(tiny_config, tiny_model, tmp_path):
    cfg = make_cfg(tiny_config, tiny_model)
    torch.manual_seed(3)
    disc = build_discriminator(cfg.disc, cfg.data.resolution)
    gan.save_disc_checkpoint(tmp_path / "disc_final.pt", disc, cfg)
    # The file contains a pixel-mode D; a config asking for noisy mode gets a note, not a silent switch.
    result = run_stage("03_adv_finetune.py", str(tiny_config), f"run_dir={tmp_path / 'run'}",
                       f"model.pretrained={tiny_model}", f"adv.disc_ckpt={tmp_path / 'disc_final.pt'}",
                       "adv.steps_total=1", "adv.probe=false", "adv.eval_every=0", "disc.lr=0", "disc.mode=noisy", *FAST)
    assert "contains a pixel-mode discriminator, which keeps its mode; disc.mode=noisy is ignored" in result.stdout
    saved = final_state(tmp_path / "run")["disc"]
    for key, value in disc.state_dict().items():
        assert torch.allclose(saved[key], value), key
