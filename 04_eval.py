"""Evaluate run directories or sample folders against real images; write result tables.

    python 04_eval.py configs/celeba32_cpu.yaml runs=[runs/b32,runs/ft_chain] data.root=DIR run_dir=runs/eval
    torchrun --nproc_per_node=N 04_eval.py CONFIG runs=[...] eval.baseline=runs/b32

Each entry of `runs` (or `eval.runs`) is one of:
- a run directory with samples/ (01_baseline.py), or with w*/samples/ (a guidance
  sweep, one row per weight);
- a run directory with model/ and no samples (00 or 03): `sample.num` images are
  generated with the `sample.*` settings into run_dir/samples/<label>/;
- a folder of images.

Per entry, one feature pass gives FID, KID, IS, precision, recall, density and
coverage, each with a bootstrap 95 % interval (`metrics.bootstrap` rounds); the
classifier two-sample test (C2ST) adds held-out accuracy and AUC with intervals;
the memorisation check finds each sample's nearest real image. Writes into
`run_dir`: evals/<label>.json, results.md/.csv/.tex/.json, memorization/<label>.png,
plots/<label>_curves.png (metrics against fine-tuning step, from the entry's
eval.jsonl), and with `eval.baseline` paired.json/paired.md (paired bootstrap of
each metric's difference to the baseline) and grids/pair_<label>.png (same seeds).
"""

import dataclasses
import json
from pathlib import Path


from common import c2st, data, dist, metrics, report
from common.diffusion import Sampler
from common.evaluation import evaluate, files_uint8, real_features, real_images_uint8
from common.models import load_model
from common.sampling import sample_files, write_samples
from common.training import autocast_dtype, run_stage, setup


def find_entries(cfg, run):
    """(label, run folder or None, sample folder or model folder) for every requested entry."""
    paths = list(cfg.runs) + list(cfg.eval.runs)
    if not paths:
        raise data.ImageDataError("nothing to evaluate: pass runs=[RUN_DIR, ...] or eval.runs=[...]")
    labels = list(cfg.eval.labels) or [Path(p).name for p in paths]
    if len(labels) != len(paths):
        raise data.ImageDataError(f"eval.labels has {len(labels)} names for {len(paths)} runs")
    if len(set(labels)) != len(labels):
        raise data.ImageDataError(f"runs share a label ({', '.join(labels)}); set eval.labels=[...] to unique names")
    base = cfg.eval.baseline
    if base is not None and base not in labels and base not in paths:
        raise data.ImageDataError(f"eval.baseline={base} is neither a label ({', '.join(labels)}) nor a path in runs")
    entries = []
    for label, raw in zip(labels, paths):
        path = Path(raw)
        sweep = sorted(p for p in path.glob("w*") if (p / "samples").is_dir()) if path.is_dir() else []
        if not path.is_dir():
            raise data.ImageDataError(f"run {raw}: no such folder")
        if (path / "samples").is_dir():
            entries.append((label, path, path / "samples"))
        elif sweep:
            entries += [(f"{label}/{p.name}", p, p / "samples") for p in sweep]
        elif (path / "model").is_dir():
            entries.append((label, path, path / "model"))
        elif (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
            raise data.ImageDataError(
                f"run {raw} has no samples/ or model/ (a 02 discriminator run, or a 00 or 03 run stopped before "
                "its export); pass the run of 01_baseline.py, a finished 00 or 03 run, or a folder of images"
            )
        else:
            data.list_image_files(path)  # raises a clear error for a folder without images
            entries.append((label, None, path))
    for label, _, folder in entries:
        check_entry_size(cfg, label, folder)
    return entries


def check_entry_size(cfg, label, folder):
    """Stop before any work when an entry's images are not data.resolution pixels square."""
    if folder.name == "model":
        return  # load_model compares the model's image size with data.resolution
    first = data.list_image_files(folder)[0]
    with data.open_rgb(first) as img:
        size = img.size
    if size != (cfg.data.resolution, cfg.data.resolution):
        raise data.ImageDataError(
            f"{label}: {first} is {size[0]}x{size[1]} px but data.resolution={cfg.data.resolution}; evaluate "
            "each resolution in its own 04_eval.py run with the matching data.resolution"
        )


def sample_model(cfg, model_dir, out_dir, device):
    """Generate `sample.num` images of an exported model into out_dir (seeds sample.seed + i)."""
    model_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(model_dir)))
    model = load_model(model_cfg)
    model.unet.to(device).eval().requires_grad_(False)
    if model.autoencoder is not None:
        model.autoencoder.to(device)
    sampler = Sampler(model.unet, model.scheduler, cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta,
                      autocast_dtype=autocast_dtype(cfg, device))
    write_samples(model, sampler, cfg.sample.num, cfg.sample.batch_per_gpu, cfg.sample.seed, out_dir, device)
    return sample_files(out_dir, cfg.sample.num), sampler.num_steps


def realism_checks(cfg, real, real_uint8, fake, fake_uint8, label, run):
    """C2ST with intervals and the memorisation check (rank 0); returns their results."""
    result = c2st.c2st_from_config(real_uint8, fake_uint8, cfg.metrics, seed=cfg.seed)
    intervals = {"accuracy": None, "auc": None}
    if cfg.metrics.bootstrap >= 2:
        intervals = c2st.c2st_bootstrap_ci(result["probs"], result["labels"], cfg.metrics.bootstrap, cfg.seed)
    table = {f"c2st_{key}": {"value": result[key], "ci": None if intervals[key] is None else list(intervals[key])}
             for key in ("accuracy", "auc")}
    memo = metrics.memorization_report(fake, real, cfg.metrics.memorization_quantile)
    pairs = memo["closest_pairs"]
    grid = run.path / "memorization" / f"{label.replace('/', '_')}.png"
    report.save_nn_grid(fake_uint8[[p["fake"] for p in pairs]], real_uint8[[p["train"] for p in pairs]],
                        [p["distance"] for p in pairs], grid)
    c2st_info = {k: result[k] for k in ("accuracy", "auc", "n_train", "n_test", "steps")}
    return table, {"c2st": c2st_info, "memorization": {**memo, "grid": str(grid)}}


def main(cfg):
    device, run = setup(cfg, "04_eval")
    entries = find_entries(cfg, run)

    # Reference set: features (cached) and pixels for C2ST and memorisation grids.
    extractor = metrics.build_extractor(cfg, device, offline=cfg.offline)
    real = real_features(cfg, extractor, device)
    real_uint8 = real_images_uint8(cfg, limit=len(real))  # same order as the features: sorted files
    run.log(f"reference: {len(real)} real images at {cfg.data.resolution} px, extractor {real.extractor}")

    # Evaluate each entry: one feature pass, then every metric with intervals.
    rows, fakes = [], {}
    for label, source_run, folder in entries:
        nfe = None
        if folder.name == "model":
            fake_files, nfe = sample_model(cfg, folder, run.path / "samples" / label, device)
        else:
            fake_files = [Path(f) for f in data.list_image_files(folder)]
        if source_run is not None and (source_run / "eval.json").is_file():
            nfe = json.loads((source_run / "eval.json").read_text()).get("nfe", nfe)
        fake = metrics.extract_from_files(fake_files, extractor, cfg.metrics.batch_size, cfg.metrics.num_workers,
                                          device)
        fakes[label] = (fake, fake_files)
        if not dist.is_main():
            continue
        fake_uint8 = files_uint8(fake_files)
        result = evaluate(cfg, real, fake, ci=cfg.metrics.bootstrap > 0)
        if cfg.metrics.c2st:
            table, extra = realism_checks(cfg, real, real_uint8, fake, fake_uint8, label, run)
            result["metrics"].update(table)
            result.update(extra)
        row = {"run": label, "nfe": nfe, "source": str(folder), **result}
        run.write_json(f"evals/{label.replace('/', '_')}.json", row)
        rows.append(row)
        shown = ", ".join(f"{k}={v['value']:.4g}" for k, v in row["metrics"].items())
        run.log(f"{label}: {shown}")
        if source_run is not None and (source_run / "eval.jsonl").is_file():
            report.plot_metric_curves(source_run / "eval.jsonl", run.path / "plots" / f"{label}_curves.png")

    # Tables, and paired comparisons with the baseline (same seeds, same sample count).
    if dist.is_main():
        paths = report.write_tables(rows, run.path)
        run.write_json("results.json", {"rows": rows})
        if cfg.eval.baseline is not None and cfg.metrics.bootstrap >= 2:
            write_paired(cfg, real, fakes, rows, run)
        run.log(f"wrote {paths['md']}\n" + paths["md"].read_text())
    run.finish()


def write_paired(cfg, real, fakes, rows, run):
    """Paired bootstrap of metric(run) - metric(baseline) for runs sharing the baseline's seeds."""
    labels = list(cfg.eval.labels) or [Path(p).name for p in list(cfg.runs) + list(cfg.eval.runs)]
    paths = list(cfg.runs) + list(cfg.eval.runs)
    base_label = cfg.eval.baseline if cfg.eval.baseline in labels else labels[paths.index(cfg.eval.baseline)]
    if base_label not in fakes:
        raise data.ImageDataError(f"eval.baseline={cfg.eval.baseline} is not one of the evaluated runs: "
                                  f"{', '.join(fakes)}")
    base, base_files = fakes[base_label]
    paired, lines = {}, ["| run | metric | difference to baseline | 95 % CI |", "|---|---|---|---|"]
    for label, (fake, files) in fakes.items():
        if label == base_label or len(fake) != len(base):
            continue
        report.save_pair_grid(files_uint8(base_files[:16]), files_uint8(files[:16]),
                              run.path / "grids" / f"pair_{label.replace('/', '_')}.png",
                              labels=(base_label, label))
        paired[label] = {}
        for name in ("fid", "kid", "pr", "dc"):
            result = metrics.paired_bootstrap(real, fake, base, metrics.metric_function(name, cfg.metrics),
                                              cfg.metrics.bootstrap, cfg.metrics.seed)
            for key, value in result.items():
                if key.endswith("_std"):
                    continue
                paired[label][key] = value
                lines.append(f"| {label} | {key} | {value['delta']:+.4g} | [{value['low']:+.4g}, {value['high']:+.4g}] |")
    run.write_json("paired.json", {"baseline": base_label, "differences": paired})
    lines.append("\nPercentile bootstrap over both sets with the same resampled rows. Resampling duplicates "
                 "images, which biases FID upwards, so its interval can miss the point estimate when the "
                 "difference is small; read such a difference as not significant. KID leaves out pairs of "
                 "copies, and the k-NN metrics keep the balls of the full sets.")
    report.atomic_write_text(run.path / "paired.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_stage(main, __doc__)
