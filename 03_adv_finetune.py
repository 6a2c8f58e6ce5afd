"""Fine-tune a pretrained diffusion U-Net against a discriminator (adversarial fine-tuning).

    python 03_adv_finetune.py configs/tiny.yaml model.pretrained=runs/p32/model [key=value ...]
    torchrun --nproc_per_node=N 03_adv_finetune.py CONFIG model.pretrained=DIR adv.disc_ckpt=RUN/disc_final.pt

The generator loss is adv.lambda_adv x the GAN loss (disc.loss) of generated images,
plus adv.lambda_dsm x the denoising loss on real images, plus adv.lambda_l2 x the
squared distance of the trainable weights to their initial values. adv.mode chooses
the gradient path: chain backpropagates through the sampling chain (or its last K
steps), steps through one U-Net prediction at a feedback timestep. adv.trainable
chooses what trains: all, output_blocks, patterns or a peft LoRA. The discriminator starts from adv.disc_ckpt
(a 02_train_disc.py disc_final.pt) or fresh, and keeps training on fresh samples,
adv.d_steps D steps per generator step.

With adv.probe, four steps at batch 2 and 1 first print "estimate: X GB peak, Y s/step,
Z min total" and stops with an error when that exceeds adv.max_memory_gb or the
device's memory. Writes into `run_dir`: config.yaml, log.txt, metrics.jsonl (losses,
logits, R1, grad norms, K), eval.jsonl ({"step", "checkpoint", "metrics"} every
adv.eval_every steps, EMA weights), grids/before.png, grids/step_XXXXXX.png,
grids/before_after.png, checkpoints/, and at the end the EMA model as a
`DDPMPipeline` in model/ (LoRA merged; the adapter itself in lora_adapter/).
"""

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import data, dist, finetune, gan
from common.diffusion import Sampler
from common.discriminators import build_discriminator
from common.models import load_model
from common.report import save_pair_grid
from common.rundir import StopSignal, check_finite
from common.training import (StepTimer, autocast, autocast_dtype, grad_norm, load_training_state, run_stage,
                             save_training_state, setup)

LOG_KEYS = ("g_loss", "g_adv", "g_dsm", "g_l2", "d_loss", "real_logit", "fake_logit", "r1", "g_grad_norm",
            "d_grad_norm", "grad_steps")
# gan.seeded_generator stream of the generator step's DiffAugment, t and noise (gan uses streams 0-2).
STREAM_GENERATOR_STEP = 16


def check_config(cfg) -> None:
    adv = cfg.adv
    if cfg.model.pretrained is None:
        raise finetune.FinetuneError("03_adv_finetune.py fine-tunes a pretrained model; set model.pretrained=MODEL_DIR")
    finetune.parse_trainable(adv.trainable)
    finetune.check_eval_metrics(adv.eval_metrics)
    if adv.mode == "steps" and not adv.feedback_t:
        raise finetune.FinetuneError("adv.feedback_t: steps mode needs at least one timestep, for example [200, 500]")
    if adv.disc_ckpt and not Path(adv.disc_ckpt).is_file():
        raise finetune.FinetuneError(f"adv.disc_ckpt={adv.disc_ckpt}: file not found; pass the disc_final.pt of a "
                                     "02_train_disc.py run, or adv.disc_ckpt=null to start a fresh discriminator")
    gan.check_disc_config(cfg)


def build_disc(cfg, model, device):
    """Load the discriminator of adv.disc_ckpt, or build a fresh one from the `disc` section."""
    if cfg.adv.disc_ckpt:
        disc = gan.load_disc_checkpoint(cfg.adv.disc_ckpt, cfg, unet=model.unet)
    else:
        disc = build_discriminator(cfg.disc, cfg.data.resolution, unet=model.unet)
    return disc.to(device).train()


def train_step(s, cfg, step, next_real, batch, plan=None) -> dict:
    """adv.d_steps discriminator steps on fresh no-grad fakes, then one generator step."""
    adv = cfg.adv
    plan = plan or finetune.plan_rollout(adv, s.fake_sampler, cfg.seed, step)
    alphas = s.model.scheduler.alphas_cumprod
    shape = s.model.sample_shape
    out = {"grad_steps": plan.grad_steps}
    for j in range(adv.d_steps):
        d_index = step * adv.d_steps + j
        seeds = finetune.rollout_seeds(cfg.seed, 1, d_index, batch)
        with autocast(cfg, s.device):
            fakes = finetune.generate_fakes(s.fake_sampler, s.model.decode, seeds, shape, s.device, plan,
                                            adv.mode, grad=False)
        generator = gan.seeded_generator(cfg.seed, d_index, dist.get_rank(), gan.STREAM_DISC_STEP)
        stats = gan.disc_step(s.ddp_disc, s.d_opt, next_real(), fakes.float(), d_index, s.disc_cfg, generator,
                              alphas, s.amp_dtype)
        out.update(d_loss=stats["loss"], real_logit=stats["real_logit"], fake_logit=stats["fake_logit"],
                   d_grad_norm=grad_norm(s.d_params))
        if "r1" in stats:
            out["r1"] = stats["r1"]

    # Generator step: D's parameters are frozen, so its DDP reducer receives no gradient.
    for p in s.d_params:
        p.requires_grad_(False)
    s.g_opt.zero_grad(set_to_none=True)
    seeds = finetune.rollout_seeds(cfg.seed, 0, step, batch)
    with torch.no_grad():
        real = s.model.encode(next_real())
    generator = gan.seeded_generator(cfg.seed, step, dist.get_rank(), STREAM_GENERATOR_STEP)
    with autocast(cfg, s.device):
        fakes = finetune.generate_fakes(s.train_sampler, s.model.decode, seeds, shape, s.device, plan, adv.mode,
                                        grad=True, use_checkpoint=adv.checkpointing)
        total, parts = finetune.generator_loss(fakes, s.disc, real, s.ddp_gen, s.model.scheduler, cfg, generator,
                                               s.trainable.params, s.initial)
    check_finite(step + 1, **parts)  # 1-based, as in metrics.jsonl
    total.backward()
    for p in s.d_params:
        p.requires_grad_(True)
        p.grad = None
    if adv.grad_clip > 0:
        out["g_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(s.trainable.params, adv.grad_clip))
    else:
        out["g_grad_norm"] = grad_norm(s.trainable.params)
    s.g_opt.step()
    out.update(g_loss=total.detach(), **{k: v.detach() for k, v in parts.items()})
    return out


def run_probe(s, cfg, dataset):
    """Measure G + D steps at batch 2 and 1, then restore every weight, optimizer state and RNG."""
    adv = cfg.adv
    batch = min(2, adv.batch_per_gpu)
    real = torch.stack([dataset[i % len(dataset)] for i in range(batch)]).to(s.device)
    plan = finetune.worst_case_plan(adv, s.fake_sampler)
    with finetune.preserved_state(s.trainable, s.disc, s.g_opt, s.d_opt):
        probe = finetune.measure(lambda b: train_step(s, cfg, 0, lambda: real[:b], b, plan), batch, s.device)
    state = finetune.optimizer_state_bytes(s.trainable.params, s.d_params)
    method = "cuda max_memory_allocated" if s.device.type == "cuda" else "process peak RSS"
    estimate = finetune.extrapolate(probe, state, adv.batch_per_gpu, adv.steps_total, plan.grad_steps, method)
    return dist.broadcast_object(estimate)


def save_grid(s, cfg, run, name):
    """Write grids/<name>: adv.grid_size images, seeds sample.seed + i, current weights; returns them (uint8)."""
    images = finetune.generate_images(s.model, s.eval_sampler, cfg.adv.grid_size, cfg.sample.batch_per_gpu,
                                      cfg.sample.seed, cfg.data.resolution, s.device)
    if dist.is_main():
        data.save_image_grid(images, run.path / "grids" / name)
    return images


def evaluate(s, cfg, run, step, checkpoint):
    """Sample adv.eval_num images with the current (EMA) weights and append a row to eval.jsonl."""
    images = finetune.generate_images(s.model, s.eval_sampler, cfg.adv.eval_num, cfg.sample.batch_per_gpu,
                                      cfg.sample.seed, cfg.data.resolution, s.device)
    result = s.metrics(images)
    run.append_jsonl("eval.jsonl", {"step": step, "checkpoint": checkpoint, **result})
    run.log(f"eval at step {step}: " + ", ".join(f"{k}={v['value']:.4g}" for k, v in result["metrics"].items()))


def main(cfg):
    device, run = setup(cfg, "03_adv_finetune")
    stop = StopSignal()
    check_config(cfg)
    adv = cfg.adv
    s = SimpleNamespace(device=device, amp_dtype=autocast_dtype(cfg, device))

    # Data: real images for the D step and the denoising loss.
    dataset = data.build_dataset(cfg.data, train=True)
    loader, data_sampler = data.build_loader(dataset, adv.batch_per_gpu, cfg.seed, train=True,
                                             num_workers=cfg.data.num_workers)
    global_batch = dist.get_world_size() * adv.batch_per_gpu

    # Models: D is built first, so a U-Net D copies the pretrained weights without LoRA layers.
    s.model = model = load_model(cfg)
    model.unet.to(device)
    model.scheduler.alphas_cumprod = model.scheduler.alphas_cumprod.to(device)
    if model.autoencoder is not None:
        model.autoencoder.to(device)
    s.disc = build_disc(cfg, model, device)
    s.disc_cfg = finetune.effective_disc_config(cfg.disc, s.disc)
    if s.disc_cfg.mode != cfg.disc.mode:
        run.log(f"note: adv.disc_ckpt={cfg.adv.disc_ckpt} contains a {s.disc_cfg.mode}-mode discriminator, which "
                f"keeps its mode; disc.mode={cfg.disc.mode} is ignored")
    s.d_params = [p for p in s.disc.parameters() if p.requires_grad]
    s.trainable = finetune.select_trainable(model.unet, adv.trainable)
    gen = s.trainable.module.to(device).train()
    run.log(f"trainable parameters: {s.trainable.count} of {s.trainable.total} ({100 * s.trainable.share:.2f} %), "
            f"adv.trainable={adv.trainable}; global batch {global_batch}; adv.mode={adv.mode}")
    s.initial = [p.detach().clone() for p in s.trainable.params] if adv.lambda_l2 > 0 else None
    ema = EMAModel(s.trainable.params, decay=adv.ema_decay, use_ema_warmup=False)
    s.g_opt = torch.optim.AdamW(s.trainable.params, lr=adv.lr, betas=tuple(adv.betas), weight_decay=0.0)
    s.d_opt = torch.optim.Adam(s.d_params, lr=cfg.disc.lr, betas=tuple(cfg.disc.betas))
    distributed = dist.get_world_size() > 1
    s.ddp_gen = DDP(gen) if distributed else gen
    s.ddp_disc = DDP(s.disc) if distributed else s.disc
    s.train_sampler = Sampler(s.ddp_gen, model.scheduler, adv.sampler, adv.steps, adv.eta, autocast_dtype=s.amp_dtype)
    s.fake_sampler = Sampler(gen, model.scheduler, adv.sampler, adv.steps, adv.eta, autocast_dtype=s.amp_dtype)
    s.eval_sampler = Sampler(gen, model.scheduler, cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta,
                             autocast_dtype=s.amp_dtype)
    s.metrics = finetune.SampleMetrics(cfg, dataset, adv.eval_metrics, device)

    # Memory and time estimate before any training.
    if adv.probe:
        estimate = run_probe(s, cfg, dataset)
        run.log(estimate.line())
        finetune.check_estimate(estimate, adv.max_memory_gb, device, adv.mode)

    # Resume everything, or start fresh with the "before" grid and evaluation.
    start_step = 0
    before = None
    resume = run.resume_path(cfg.resume)
    parts = dict(gen=s.trainable, ema=ema, disc=s.disc, g_opt=s.g_opt, d_opt=s.d_opt)
    if resume is not None:
        state = load_training_state(resume, **parts)
        start_step, before = state["step"], state.get("before_grid")
        run.log(f"resumed from {resume} at step {start_step}")
    run.truncate_jsonl("metrics.jsonl", start_step)
    run.truncate_jsonl("eval.jsonl", start_step)
    ema.to(device)
    if before is None:
        before = save_grid(s, cfg, run, "before.png")
        if adv.eval_every:
            evaluate(s, cfg, run, 0, str(cfg.model.pretrained))
    elif adv.eval_every and (start_step % adv.eval_every == 0 or start_step == adv.steps_total):
        # The checkpoint is written before the evaluation of its step, so a kill in between
        # loses that evaluation: redo it from the checkpoint's weights.
        evaluated = dist.broadcast_object(run.jsonl_steps("eval.jsonl") if dist.is_main() else None)
        if start_step not in evaluated:
            with finetune.ema_parameters(ema, s.trainable.params):
                save_grid(s, cfg, run, f"step_{start_step:06d}.png")
                evaluate(s, cfg, run, start_step, str(resume))

    # Training loop.
    batches = data.batches_from_step(loader, data_sampler, start_step * (adv.d_steps + 1))
    timer = StepTimer()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    bar = tqdm(range(start_step, adv.steps_total), initial=start_step, total=adv.steps_total, desc="adv finetune",
               disable=not dist.is_main(), dynamic_ncols=True)
    for step in bar:
        out = train_step(s, cfg, step, lambda: next(batches).to(device), adv.batch_per_gpu)
        ema.step(s.trainable.params)
        timer.update(global_batch)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1  # r1 only on lazy R1 steps
        done = step + 1

        if done % adv.log_every == 0 or done == adv.steps_total:
            keys = [k for k in LOG_KEYS if k in sums]
            totals = dist.sum_across_ranks([sums[k] for k in keys])
            world = dist.get_world_size()
            record = {"step": done, **{k: v / (counts[k] * world) for k, v in zip(keys, totals)}}
            run.append_jsonl("metrics.jsonl", {**record, **timer.report()})
            bar.set_postfix(g=f"{record['g_loss']:.3f}", d=f"{record.get('d_loss', float('nan')):.3f}")
            sums.clear()
            counts.clear()
        stopping = stop.should_stop()
        checkpoint = None
        if done % adv.ckpt_every == 0 or done == adv.steps_total or stopping:
            finetune.check_replicas(s.trainable.params, s.d_params)
            checkpoint = str(save_training_state(run, done, adv.keep_last, before_grid=before, **parts))
        if adv.eval_every and (done % adv.eval_every == 0 or done == adv.steps_total) and not stopping:
            with finetune.ema_parameters(ema, s.trainable.params):
                save_grid(s, cfg, run, f"step_{done:06d}.png")
                evaluate(s, cfg, run, done, checkpoint)
        if stopping:
            stop.exit_for_requeue(run, done)
    bar.close()

    # Export the EMA weights: a DDPMPipeline (LoRA merged), and the LoRA adapter itself.
    with finetune.ema_parameters(ema, s.trainable.params):
        after = save_grid(s, cfg, run, f"step_{adv.steps_total:06d}.png")
        if dist.is_main():
            save_pair_grid(before, after, run.path / "grids" / "before_after.png")
            finetune.export_model(s.trainable, model, run.path / "model")
            if s.trainable.lora:
                finetune.save_lora_adapter(s.trainable, run.path / "lora_adapter")
            run.log(f"exported EMA model to {run.path / 'model'} (load with DDPMPipeline.from_pretrained)")
    run.finish()


if __name__ == "__main__":
    run_stage(main, __doc__)
