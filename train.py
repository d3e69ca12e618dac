"""Train DiT/SiT with Self-Representation Alignment (or as the plain baseline with --sra off).

    accelerate launch train.py --preset sit-b2-sra --data-dir data/imagenet256-latents

Rerunning the same command resumes from the newest valid checkpoint in the run directory.
"""
import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from tqdm import tqdm

import configs
import models
import sra
from diffusion import create_objective
from preprocessing.dataset import LatentDataset, make_loader, sample_model_input
from training.checkpoints import checkpoint_path, load_latest, prune, save_atomic
from training.fid import InTrainingFID
from training.metrics import MetricsLogger
from training.samples import grid_inputs, save_sample_grid

# Config keys a resumed run may change; any other difference from the saved config is an error.
RESUMABLE_CHANGES = {
    "max_steps", "log_every", "ckpt_every", "keep_last", "milestone_every", "sample_every",
    "sample_grid_size", "sample_steps", "num_workers", "wandb", "tensorboard", "compile", "vae",
    "eval_every", "eval_ref", "eval_samples", "eval_batch_size", "eval_steps",
}


# --- configuration -----------------------------------------------------------------------------

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


def finalize_config(config, dataset, world_size):
    """Fill what depends on the data, the model and the number of processes; check consistency."""
    config["run_name"] = config["run_name"] or config["preset"] or config["model"].replace("/", "")
    channels, height, width = dataset.meta["sample_shape"]
    if height != width:
        raise ValueError(f"the model needs square inputs; the dataset holds {height}×{width}")
    config.update(input_size=height, in_channels=channels, num_classes=dataset.meta["num_classes"])
    config["steps_per_epoch"] = max(len(dataset) // config["global_batch_size"], 1)
    if config["sra"] == "on":
        depth = _model_depth(config)
        student_default, teacher_default = sra.default_block_pair(config["model"])
        config["student_depth"] = config["student_depth"] or student_default
        config["teacher_depth"] = config["teacher_depth"] or teacher_default
        for key in ("student_depth", "teacher_depth"):
            if not 1 <= config[key] <= depth:
                raise ValueError(f"--{key.replace('_', '-')} {config[key]} is outside the model's 1..{depth} blocks")
    if config["eval_every"] and not config["eval_ref"]:
        raise ValueError("--eval-every needs --eval-ref (reference statistics from evaluations.evaluator)")
    per_step = world_size * config["grad_accum_steps"]
    if config["global_batch_size"] % per_step:
        raise ValueError(
            f"--global-batch-size {config['global_batch_size']} is not divisible by "
            f"{world_size} processes × {config['grad_accum_steps']} accumulation steps"
        )
    config["per_gpu_batch_size"] = config["global_batch_size"] // per_step
    config["world_size"] = world_size
    return config


def _model_depth(config):
    return models.SIZES[models.parse_model_name(config["model"])[1]][0]


def check_resumable(saved, config):
    changed = {k for k in set(saved) | set(config) if saved.get(k) != config.get(k)} - RESUMABLE_CHANGES
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in sorted(changed))
        raise ValueError(
            f"this run directory holds a run with a different config ({details}); "
            "use another --run-name or the original flags"
        )


# --- building ----------------------------------------------------------------------------------

def build_model(config):
    options = {"class_dropout_prob": config["class_dropout_prob"], "qk_norm": config["qk_norm"]}
    if config["learn_sigma"] is not None:
        options["learn_sigma"] = config["learn_sigma"]
    return models.create_model(
        config["model"], config["input_size"], config["in_channels"], config["num_classes"], **options
    )


def build_objective(config):
    if models.model_family(config["model"]) == "DiT":
        return create_objective("ddpm", min_step=config["dit_teacher_min_step"])
    return create_objective(
        "flow", path=config["path"], prediction=config["prediction"], time_sampling=config["time_sampling"]
    )


def build_loss(config, objective):
    sra_config = None
    if config["sra"] == "on":
        sra_config = sra.SRAConfig(
            student_depth=config["student_depth"],
            teacher_depth=config["teacher_depth"],
            t_max=config["t_max"],
            fixed_interval=config["interval"] == "fixed",
            distance=config["align_distance"],
            smooth_l1_beta=config["smooth_l1_beta"],
        )
    return sra.TrainingLoss(objective, config["class_dropout_prob"], config["num_classes"], sra_config)


def time_convention(config):
    return models.DISCRETE_STEPS if models.model_family(config["model"]) == "DiT" else models.DATA_AT_0


def make_decoder(meta, vae_name, device):
    """Model-space samples -> images in [-1, 1]."""
    if meta["kind"] == "pixels":
        return lambda x: x
    from preprocessing.vae import load_vae

    vae = load_vae(vae_name or meta["vae"], device)
    return lambda x: vae.model.decode(x / meta["scale"] + meta["shift"]).sample


# --- checkpoints -------------------------------------------------------------------------------

def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_objects(obj):
    """Every process's `obj`, in rank order (just [obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def save_checkpoint(run_dir, step, config, student, ema, optimizer, scaler, counters, accelerator):
    rng_states = gather_objects(rng_state(accelerator.device))  # every process takes part
    if not accelerator.is_main_process:
        return
    state = {
        "format": models.CHECKPOINT_FORMAT,
        "meta": models.checkpoint_metadata(student.backbone, time_convention(config)),
        "step": step,
        "model": student.backbone.state_dict(),
        "ema": ema.state_dict(),
        "head": student.head.state_dict() if student.head is not None else None,
        "opt": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states,
        "sampler": {"consumed": step * config["per_gpu_batch_size"] * config["grad_accum_steps"]},
        "counters": {key: int(value) for key, value in counters.items()},
        "config": config,
    }
    directory = Path(run_dir) / "checkpoints"
    save_atomic(state, checkpoint_path(directory, step))
    prune(directory, config["keep_last"], config["milestone_every"])


def restore(state, student, ema, optimizer, scaler, accelerator):
    student.backbone.load_state_dict(state["model"])
    if student.head is not None:
        student.head.load_state_dict(state["head"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["opt"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    ranks = state["rng"]
    if len(ranks) != accelerator.num_processes:
        raise ValueError(
            f"the checkpoint was written by {len(ranks)} processes; resume with the same number "
            f"(now {accelerator.num_processes}) so the run continues identically"
        )
    set_rng_state(ranks[accelerator.process_index], accelerator.device)


# --- the step ----------------------------------------------------------------------------------

def train_step(batches, meta, loss_fn, trained, teacher_model, optimizer, scaler, config, weight, accelerator):
    """One optimizer step over `grad_accum_steps` micro-batches. Returns device tensors only (no host
    sync): the loss terms, the grad norm and whether the step was applied (all gradients finite)."""
    accum = config["grad_accum_steps"]
    totals = None
    for index, (x, y) in enumerate(batches):
        x0 = sample_model_input(x.to(accelerator.device, non_blocking=True), meta)
        y = y.to(accelerator.device, non_blocking=True)
        # Gradients are all-reduced only on the last micro-batch.
        sync = contextlib.nullcontext() if index == accum - 1 else accelerator.no_sync(trained)
        with sync, accelerator.autocast():
            terms = loss_fn(trained, teacher_model, x0, y, weight)
            accelerator.backward(terms["loss"] / accum)
        detached = torch.stack([terms["loss"].detach(), terms["gen"], terms["align"]]) / accum
        totals = detached if totals is None else totals + detached
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), config["max_grad_norm"])
    finite = torch.isfinite(grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # the scaler skips non-finite steps itself
        scaler.update()
    else:
        # The fused AdamW skips the update (and its step count) where found_inf is 1: no host sync.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm, finite


def micro_batches(loader, count):
    return [next(loader) for _ in range(count)]


# --- main --------------------------------------------------------------------------------------

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

    # Model, teacher, optimizer. Every process initializes the same weights (the EMA copy is taken
    # before data parallelism would broadcast them), then draws its own training noise.
    torch.manual_seed(config["seed"])
    backbone = build_model(config)
    head = sra.ProjectionHead(backbone.hidden_size) if config["sra"] == "on" else None
    student = sra.Student(backbone, head, config["student_depth"] if head is not None else None)
    ema = sra.EMATeacher(backbone, config["ema_decay"])
    torch.manual_seed(config["seed"] * accelerator.num_processes + accelerator.process_index)
    objective = build_objective(config)
    loss_fn = build_loss(config, objective)
    # `trained` is what runs the step (data-parallel, maybe compiled); `student` is the plain module
    # that shares its parameters, used for the EMA update and checkpoints.
    trained = accelerator.prepare_model(student)
    ema.model.to(device)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config["lr"], betas=(config["adam_beta1"], config["adam_beta2"]),
        weight_decay=config["weight_decay"], fused=True,
    )
    scaler = accelerator.scaler  # fp16 only
    start_step = 0
    counters = {"nonfinite_total": torch.zeros((), device=device), "nonfinite_run": torch.zeros((), device=device)}
    if state is not None:
        restore(state, student, ema, optimizer, scaler, accelerator)
        start_step = state["step"]
        counters = {key: torch.tensor(float(value), device=device) for key, value in state["counters"].items()}
        accelerator.print(f"resumed from {state_path} at step {start_step}")
    del state
    teacher_model = ema.model
    if config["compile"]:
        trained = torch.compile(trained)
        teacher_model.forward_features = torch.compile(teacher_model.forward_features)

    loader = make_loader(
        dataset, config["per_gpu_batch_size"], rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=config["seed"],
        consumed=start_step * config["per_gpu_batch_size"] * config["grad_accum_steps"],
        num_workers=config["num_workers"],
    )
    logger = None
    grid_z = grid_y = fid = None
    needs_decoder = config["sample_every"] or config["eval_every"]
    decode = make_decoder(dataset.meta, config["vae"], device) if needs_decoder else None
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
            batches, dataset.meta, loss_fn, trained, teacher_model, optimizer, scaler, config, weight, accelerator
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
            save_checkpoint(run_dir, step, config, student, ema, optimizer, scaler, counters, accelerator)
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
