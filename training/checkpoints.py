"""Training checkpoints: atomic writes, keep-last-K plus milestones, resume from the newest valid file."""
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

import models

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_path(directory, step):
    return Path(directory) / f"step_{step:07d}.pt"


def save_atomic(state, path):
    """Write to a temporary file in the same directory, then rename: a crash never leaves a
    half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def list_checkpoints(directory):
    """[(step, path)] sorted by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def load_latest(directory, map_location="cpu"):
    """(state, path) of the newest checkpoint that loads, or (None, None). Unreadable files are
    reported and passed over, never deleted."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True), path
        except Exception as error:  # a truncated or corrupt file: fall back to the one before
            print(f"warning: skipping unreadable checkpoint {path} ({type(error).__name__}: {error})")
    return None, None


def prune(directory, keep_last, milestone_every):
    """Delete all but the newest `keep_last` checkpoints, keeping every multiple of `milestone_every`."""
    checkpoints = list_checkpoints(directory)
    for step, path in checkpoints[: max(len(checkpoints) - keep_last, 0)]:
        if milestone_every and step % milestone_every == 0:
            continue
        path.unlink()


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


def time_convention(config):
    return models.DISCRETE_STEPS if models.model_family(config["model"]) == "DiT" else models.DATA_AT_0


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
