"""Turning a resolved config into the pieces of a run: derived settings, model, objective, loss."""
import types

import torch

import models
import sra
from diffusion import create_objective
from training.checkpoints import restore

# Config keys a resumed run may change; any other difference from the saved config is an error.
RESUMABLE_CHANGES = {
    "max_steps", "log_every", "ckpt_every", "keep_last", "milestone_every", "sample_every",
    "sample_grid_size", "sample_steps", "num_workers", "wandb", "tensorboard", "compile", "vae",
    "eval_every", "eval_ref", "eval_samples", "eval_batch_size", "eval_steps",
}


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



def build_run(config, accelerator, state=None):
    """Model, EMA teacher, loss and optimizer, restored from `state` (a checkpoint) when given.

    `student` is the plain module (backbone and head) used for the EMA update and checkpoints;
    `trained` shares its parameters and runs the step (data-parallel, compiled with --compile)."""
    # Every process initializes the same weights (the EMA copy is taken before data parallelism
    # would broadcast them), then draws its own training noise.
    torch.manual_seed(config["seed"])
    backbone = build_model(config)
    head = sra.ProjectionHead(backbone.hidden_size) if config["sra"] == "on" else None
    student = sra.Student(backbone, head, config["student_depth"] if head is not None else None)
    ema = sra.EMATeacher(backbone, config["ema_decay"])
    torch.manual_seed(config["seed"] * accelerator.num_processes + accelerator.process_index)
    objective = build_objective(config)
    trained = accelerator.prepare_model(student)
    ema.model.to(accelerator.device)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config["lr"], betas=(config["adam_beta1"], config["adam_beta2"]),
        weight_decay=config["weight_decay"], fused=True,
    )
    zero = torch.zeros((), device=accelerator.device)
    counters = {"nonfinite_total": zero.clone(), "nonfinite_run": zero.clone()}
    start_step = 0
    if state is not None:
        restore(state, student, ema, optimizer, accelerator.scaler, accelerator)
        start_step = state["step"]
        counters = {key: torch.tensor(float(v), device=accelerator.device) for key, v in state["counters"].items()}
    if config["compile"]:
        trained = torch.compile(trained)
        ema.model.forward_features = torch.compile(ema.model.forward_features)
    return types.SimpleNamespace(
        student=student, trained=trained, ema=ema, objective=objective, loss_fn=build_loss(config, objective),
        optimizer=optimizer, scaler=accelerator.scaler, counters=counters, start_step=start_step,
    )
