"""Train DiT/SiT with Self-Representation Alignment (or as the plain baseline with --sra off).

    accelerate launch train.py --preset sit-b2-sra --data-dir data/imagenet256-latents

Rerunning the same command resumes from the newest valid checkpoint in the run directory.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

import configs
import models
import sra
from preprocessing.dataset import LatentDataset, make_loader
from sampling.pipeline import load_decoder
from training.checkpoints import load_latest, save_checkpoint
from training.fid import InTrainingFID
from training.metrics import MetricsLogger
from training.samples import grid_inputs, save_sample_grid
from training.setup import build_run, check_resumable, finalize_config
from training.step import micro_batches, train_step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=configs.PRESET_NAMES, help="named starting config")
    parser.add_argument("--dry-run", action="store_true", help="print and save the resolved config, then stop")
    flag = parser.add_argument
    on_off = ("on", "off")
    flag("--data-dir", help="dataset written by `python -m preprocessing`")
    flag("--results-dir")
    flag("--run-name", help="run directory name under --results-dir (default: the preset or model name)")
    flag("--seed", type=int)
    flag("--model", choices=models.MODEL_NAMES)
    flag("--class-dropout-prob", type=float)
    flag("--qk-norm", choices=on_off)
    flag("--learn-sigma", choices=on_off)
    flag("--path", choices=("linear", "cosine", "vp"), help="flow interpolant (SiT)")
    flag("--prediction", choices=("velocity", "noise", "score"), help="flow model output (SiT)")
    flag("--time-sampling", choices=("uniform", "lognormal"), help="flow training times (SiT)")
    flag("--dit-teacher-min-step", type=int, help="DiT teacher step floor: 0 (paper) or 1 (release)")
    flag("--sra", choices=on_off, help="off trains the plain baseline, everything else identical")
    flag("--student-depth", type=int, help="k_s: align the output of this many student blocks")
    flag("--teacher-depth", type=int, help="k_T: target = output of this many teacher blocks")
    flag("--t-max", type=float, help="teacher interval Δ as a fraction of the time range")
    flag("--interval", choices=("dynamic", "fixed"), help="Δ ~ U(0, t_max) or Δ = t_max")
    flag("--align-distance", choices=sra.DISTANCES)
    flag("--smooth-l1-beta", type=float)
    flag("--align-weight", type=float, help="λ")
    flag("--align-weight-schedule", choices=sra.WEIGHT_SCHEDULES)
    flag("--align-decay-start-epoch", type=int)
    flag("--align-decay-epochs", type=int)
    flag("--ema-decay", type=float)
    flag("--max-steps", type=int)
    flag("--global-batch-size", type=int, help="images per optimizer step over all processes")
    flag("--grad-accum-steps", type=int)
    flag("--lr", type=float)
    flag("--adam-beta1", type=float)
    flag("--adam-beta2", type=float)
    flag("--weight-decay", type=float)
    flag("--max-grad-norm", type=float)
    flag("--mixed-precision", choices=("bf16", "fp16", "no"))
    flag("--tf32", choices=on_off)
    flag("--compile", choices=on_off)
    flag("--max-nonfinite-steps", type=int)
    flag("--num-workers", type=int)
    flag("--log-every", type=int)
    flag("--ckpt-every", type=int)
    flag("--keep-last", type=int)
    flag("--milestone-every", type=int, help="also keep every checkpoint at a multiple of this (0: none)")
    flag("--sample-every", type=int, help="EMA sample grid every N steps (0: never)")
    flag("--sample-grid-size", type=int)
    flag("--sample-steps", type=int)
    flag("--vae", help="VAE for decoding sample grids (default: the dataset's)")
    flag("--eval-every", type=int, help="FID-K of the EMA every N steps (0: never)")
    flag("--eval-ref", help="reference statistics .npz (evaluations.evaluator --save-ref-stats)")
    flag("--eval-samples", type=int, help="K, images per FID-K evaluation over all processes")
    flag("--eval-batch-size", type=int, help="FID-K sampling batch per process")
    flag("--eval-steps", type=int, help="sampling steps of the FID-K samples")
    flag("--wandb", choices=on_off)
    flag("--tensorboard", choices=on_off)
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if key not in ("preset", "dry_run")}
    for key, value in overrides.items():
        if value in on_off:
            overrides[key] = value == "on" if key != "sra" else value
    return args, configs.resolve(args.preset, overrides)


def main(argv=None):
    args, config = parse_args(argv)
    mixed = config["mixed_precision"]
    # Several CPU processes (gloo) only when no GPU is present, e.g. tests and CPU smoke runs.
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config["tf32"]
        torch.backends.cudnn.allow_tf32 = config["tf32"]

    # Data first: every mismatch is reported before any model is built.
    if config["data_dir"] is None:
        raise ValueError("--data-dir is required (a dataset written by `python -m preprocessing`)")
    dataset = LatentDataset(config["data_dir"])
    config = finalize_config(config, dataset, accelerator.num_processes)
    run_dir = Path(config["results_dir"]) / config["run_name"]
    state, state_path = load_latest(run_dir / "checkpoints")
    if state is not None:
        check_resumable(state["config"], config)
    if accelerator.is_main_process:
        print(json.dumps(config, indent=2))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if args.dry_run:
        return {"config": config}

    parts = build_run(config, accelerator, state)
    if state is not None:
        accelerator.print(f"resumed from {state_path} at step {parts.start_step}")
    del state
    student, trained, ema, optimizer = parts.student, parts.trained, parts.ema, parts.optimizer
    objective, counters, start_step = parts.objective, parts.counters, parts.start_step

    loader = make_loader(
        dataset, config["per_gpu_batch_size"], rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=config["seed"],
        consumed=start_step * config["per_gpu_batch_size"] * config["grad_accum_steps"],
        num_workers=config["num_workers"],
    )
    logger = None
    grid_z = grid_y = fid = None
    needs_decoder = config["sample_every"] or config["eval_every"]
    decode = load_decoder(config["vae"], config, device).decode if needs_decoder else None
    if config["eval_every"]:
        fid = InTrainingFID(config["eval_ref"], config["eval_samples"], config["eval_batch_size"],
                            config["eval_steps"], dataset.meta["sample_shape"], config["num_classes"], accelerator)
    if accelerator.is_main_process:
        logger = MetricsLogger(run_dir, config, start_step, config["tensorboard"], config["wandb"])
        if config["sample_every"]:
            grid_z, grid_y = grid_inputs(config["sample_grid_size"], dataset.meta["sample_shape"],
                                         config["num_classes"], device)

    # The loop. Metrics stay on the device between log steps, so the loop never waits on the host.
    window = torch.zeros(3, device=device)
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm(total=config["max_steps"], initial=start_step, disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    trained.train()
    for step in range(start_step + 1, config["max_steps"] + 1):
        weight = sra.align_weight(
            step - 1, config["align_weight_schedule"], config["align_weight"], config["steps_per_epoch"],
            config["align_decay_start_epoch"], config["align_decay_epochs"],
        )
        batches = micro_batches(loader, config["grad_accum_steps"])
        totals, grad_norm, finite = train_step(
            batches, dataset.meta, parts.loss_fn, trained, ema.model, optimizer, parts.scaler, config, weight,
            accelerator,
        )
        ema.update(student.backbone, apply=finite)
        skipped = (~finite).float()
        counters["nonfinite_total"] += skipped
        counters["nonfinite_run"] = (counters["nonfinite_run"] + 1) * skipped
        window += totals
        window_steps += 1
        progress.update(1)

        if step % config["log_every"] == 0 or step == config["max_steps"]:
            values = log_window(window / window_steps, grad_norm, counters, window_steps, window_start, config,
                                accelerator, weight)
            progress.set_postfix(loss=f"{values['loss']:.4f}", align=f"{values['align']:.4f}",
                                 img_s=f"{values['img_per_s']:.1f}")
            if logger is not None:
                logger.log(step, values)
            if values["nonfinite_run"] >= config["max_nonfinite_steps"]:
                raise RuntimeError(
                    f"{int(values['nonfinite_run'])} consecutive steps had non-finite gradients (step {step}); "
                    f"stopping. The last checkpoint in {run_dir / 'checkpoints'} is intact."
                )
            window.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if step % config["ckpt_every"] == 0 or step == config["max_steps"]:
            save_checkpoint(run_dir, step, config, student, ema, optimizer, parts.scaler, counters, accelerator)
        if config["sample_every"] and (step % config["sample_every"] == 0 or step == config["max_steps"]):
            if accelerator.is_main_process:
                save_sample_grid(ema.model, objective, decode, grid_z, grid_y,
                                 run_dir / f"samples_{step:07d}.png", config["sample_steps"])
            accelerator.wait_for_everyone()
        if fid is not None and (step % config["eval_every"] == 0 or step == config["max_steps"]):
            value = fid(ema.model, objective, decode)
            if logger is not None:
                logger.log(step, {f"fid{config['eval_samples']}": value})
                progress.write(f"step {step}: FID-{config['eval_samples']} {value:.2f}")
    progress.close()
    if logger is not None:
        logger.close()
    accelerator.end_training()
    return {"config": config, "student": student, "ema": ema}


def log_window(means, grad_norm, counters, steps, start, config, accelerator, weight):
    """Average the window's loss terms over processes and read them to the host (one sync)."""
    means = accelerator.reduce(means, reduction="mean")
    loss, gen, align = means.tolist()
    seconds = time.perf_counter() - start
    values = {
        "loss": loss, "gen_loss": gen, "align": align, "align_weight": weight,
        "grad_norm": float(grad_norm), "nonfinite_total": float(counters["nonfinite_total"]),
        "nonfinite_run": float(counters["nonfinite_run"]),
        "step_time_s": seconds / steps, "img_per_s": steps * config["global_batch_size"] / seconds,
    }
    if accelerator.device.type == "cuda":
        values["peak_mem_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return values


if __name__ == "__main__":
    main()
