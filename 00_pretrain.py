"""Train (or continue training) a diffusion U-Net on an image folder.

    python 00_pretrain.py configs/demo.yaml [key=value ...] [--dry-run]
    torchrun --nproc_per_node=N 00_pretrain.py configs/celeba32_cpu.yaml data.root=DIR

Reads `data.*` images (or the embedded LFW faces) and, with `model.pretrained`, a
diffusers model to continue from. Writes into `run_dir`: config.yaml, log.txt,
metrics.jsonl (step, loss, lr, grad_norm, sec_per_step, img_per_sec), fixed-seed
sample grids in grids/, checkpoints/ (full resume state), and at the end the EMA
weights as a `DDPMPipeline` in model/.
"""


import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import data, dist
from common.diffusion import Sampler, denoising_loss
from common.models import count_parameters, export_pipeline, load_model
from common.rundir import StopSignal, check_finite
from common.training import (StepTimer, autocast, ema_weights, grad_norm, load_training_state, lr_warmup,
                             make_ema, run_stage, save_training_state, setup)


def save_grid(sampler, model, cfg, run, step, device):
    """Sample `train.grid_size` images with seeds 0..N-1 and write grids/step_<step>.png."""
    seeds = list(range(cfg.train.grid_size))
    with torch.no_grad():
        images = model.decode(sampler.sample(seeds, model.sample_shape, device))
    if dist.is_main():
        path = run.path / "grids" / f"step_{step:06d}.png"
        data.save_image_grid(images.cpu(), path)
        run.log(f"wrote sample grid {path}")


def main(cfg):
    device, run = setup(cfg, "00_pretrain")
    stop = StopSignal()

    # A pretrained model loads before the data pass, so a bad model.pretrained fails fast. A fresh U-Net
    # is built after it: building the dataset draws from the global RNG, and moving the U-Net's random
    # initialisation before it would change the weights of every earlier seeded run.
    pretrained = load_model(cfg) if cfg.model.pretrained is not None else None

    # Data: one shared seed for the sampler order; batch arithmetic checked once.
    dataset = data.build_dataset(cfg.data, train=True)
    loader, data_sampler = data.build_loader(dataset, cfg.train.batch_per_gpu, cfg.seed, train=True,
                                             num_workers=cfg.data.num_workers)
    global_batch = dist.get_world_size() * cfg.train.batch_per_gpu * cfg.train.grad_accum
    run.log(f"images={len(dataset)} global_batch={global_batch} = {dist.get_world_size()} ranks x "
            f"{cfg.train.batch_per_gpu} per GPU x {cfg.train.grad_accum} accumulation")

    # Model, EMA, optimizer, learning-rate warmup.
    model = pretrained if pretrained is not None else load_model(cfg)
    if model.is_latent:
        raise SystemExit("00_pretrain.py trains pixel-space models only; model.pretrained is a latent model")
    unet = model.unet.to(device).train()
    model.scheduler.alphas_cumprod = model.scheduler.alphas_cumprod.to(device)
    run.log(f"U-Net parameters: {count_parameters(unet) / 1e6:.3f} M, source: {model.source}")
    ema = make_ema(unet, cfg.train.ema_decay, cfg.train.ema_warmup)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    lr_schedule = lr_warmup(optimizer, cfg.train.warmup_steps)
    ddp_unet = DDP(unet) if dist.get_world_size() > 1 else unet
    grid_sampler = Sampler(unet, model.scheduler, "ddim", steps=cfg.train.grid_steps)

    # Resume everything, or start fresh.
    start_step = 0
    resume = run.resume_path(cfg.resume)
    if resume is not None:
        state = load_training_state(resume, unet=unet, ema=ema, optimizer=optimizer, lr_schedule=lr_schedule)
        start_step = state["step"]
        run.log(f"resumed from {resume} at step {start_step}")
    run.truncate_jsonl("metrics.jsonl", start_step)
    ema.to(device)

    # Training loop.
    batches = data.batches_from_step(loader, data_sampler, start_step * cfg.train.grad_accum)
    timer = StepTimer()
    bar = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps,
               desc="pretrain", disable=not dist.is_main(), dynamic_ncols=True)
    step = start_step
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=device)
        for _ in range(cfg.train.grad_accum):
            x0 = next(batches).to(device)  # [B, 3, R, R] in [-1, 1]
            with autocast(cfg, device):
                loss = denoising_loss(ddp_unet, model.scheduler, x0) / cfg.train.grad_accum
            loss.backward()
            total_loss += loss.detach()
        check_finite(step + 1, loss=total_loss)  # 1-based, as in metrics.jsonl
        if cfg.train.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip))
        else:
            norm = grad_norm(unet.parameters())
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        timer.update(global_batch)
        done = step + 1

        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            loss_mean = float(dist.all_reduce_sum(total_loss.clone())) / dist.get_world_size()
            record = {"step": done, "loss": loss_mean, "lr": lr_schedule.get_last_lr()[0], "grad_norm": norm,
                      **timer.report()}
            run.append_jsonl("metrics.jsonl", record)
            bar.set_postfix(loss=f"{loss_mean:.4f}")
        if cfg.train.sample_every and done % cfg.train.sample_every == 0 and dist.is_main():
            with ema_weights(ema, unet):
                save_grid(grid_sampler, model, cfg, run, done, device)
        stopping = stop.should_stop()
        if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps or stopping:
            save_training_state(run, done, cfg.train.keep_last, unet=unet, ema=ema, optimizer=optimizer,
                                lr_schedule=lr_schedule)
        if stopping:
            stop.exit_for_requeue(run, done)
    bar.close()

    # Export the EMA weights as a diffusers pipeline.
    if dist.is_main():
        with ema_weights(ema, unet):
            if cfg.train.sample_every:
                save_grid(grid_sampler, model, cfg, run, cfg.train.steps, device)
            export_pipeline(unet, model.scheduler, run.path / "model")
        run.log(f"exported EMA model to {run.path / 'model'} (load with DDPMPipeline.from_pretrained)")
    run.finish()


if __name__ == "__main__":
    run_stage(main, __doc__)
