"""Training checkpoints: atomic, checksummed writes, keep-last-K plus milestones, resume from the newest
file that loads and verifies.

A checkpoint is one file `step_XXXXXXX.pt` written under a temporary name, fsynced and renamed, so a
crash never leaves a half-written file under the final name. It carries a sha256 over its whole content
(every tensor's bytes and every other value), recomputed on load: a flipped byte anywhere is caught.
"""
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

import models
from errors import UserError
from models.checkpoint import DIGEST_KEY, check_content_digest, content_digest
from objectives.registry import describe
from training.parallel import full_state_dict, load_full_state_dict, load_optimizer_state_dict, optimizer_state_dict

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_path(directory, step):
    return Path(directory) / f"step_{step:07d}.pt"


def save_atomic(state, path):
    """torch.save to a temporary file in the same directory, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def list_checkpoints(directory):
    """[(step, path)] sorted by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def read_checkpoint(path, map_location="cpu"):
    """A checkpoint's state, its checksum verified; ValueError naming what is wrong otherwise. The file is
    memory-mapped, so the processes of one machine that all read it share its pages."""
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    if not isinstance(state, dict) or DIGEST_KEY not in state:
        if isinstance(state, dict) and state.get("format") == models.CHECKPOINT_FORMAT_V1:
            return state  # written before checksums existed
        raise ValueError("not a training checkpoint of this project (no checksum)")
    return check_content_digest(state)


def load_latest(directory, map_location="cpu"):
    """(state, path, unreadable) for the newest checkpoint that loads and verifies, or (None, None,
    unreadable). `unreadable` lists (path, reason) of the newer files passed over; none is deleted."""
    unreadable = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path, map_location), path, unreadable
        except Exception as error:  # a truncated, corrupt or foreign file: fall back to the one before
            reason = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
            print(f"warning: skipping unreadable checkpoint {path} ({reason})")
            unreadable.append((path, reason))
    return None, None, unreadable


def prune(directory, current_step, keep_last, milestone_every):
    """Keep the checkpoint of `current_step`, the newest keep_last − 1 before it and every milestone.
    Files of later steps (unreadable ones a resumed run passed over) are left alone: pruning never
    deletes the newest loadable checkpoint in favour of them."""
    older = [(step, path) for step, path in list_checkpoints(directory) if step < current_step]
    for step, path in older[: max(len(older) - (keep_last - 1), 0)]:
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


def checkpoint_meta(record, backbone, objective):
    """What sampling and analysis read to use a checkpoint without flags: the model spec, its time
    convention, the objective it was trained with, where its data came from, and what it is conditioned
    on (for text, the encoder of its contexts by name and by content)."""
    meta = models.checkpoint_metadata(backbone, models.family_of(record["model"]["model"]).time_convention)
    meta["objective"] = describe(objective)
    meta["data_dir"] = record["run"]["data_dir"]
    meta["vae"] = record["output"]["vae"]
    data = record["data"]
    meta["condition"] = {key: data.get(key) for key in ("condition", "context_shape", "text_encoder",
                                                         "text_encoder_sha256")}
    return meta


def own_teacher(parts) -> bool:
    """Whether the run's teacher is an EMA of its own (SRA --teacher-update ssl_cosine/copy), saved as 'teacher'."""
    return parts.teacher is not None and parts.teacher is not parts.ema


def save_checkpoint(run_dir, step, record, parts, counters, accelerator):
    """Every process takes part (its RNG state is gathered, and sharded weights and optimizer state are
    gathered whole); the main process writes and prunes."""
    rng_states = gather_objects(rng_state(accelerator.device))
    student, optimizer, scaler = parts.student, parts.optimizer, parts.scaler
    keep = accelerator.is_main_process
    weights = {
        "model": full_state_dict(student.backbone, keep),
        "ema": parts.ema.state_dict(keep),
        "teacher": parts.teacher.state_dict(keep) if own_teacher(parts) else None,
        "head": full_state_dict(student.head, keep) if student.head is not None else None,
        "opt": optimizer_state_dict(student, optimizer),
    }
    if not accelerator.is_main_process:
        return
    data = record["data"]
    state = {
        "format": models.CHECKPOINT_FORMAT,
        "meta": checkpoint_meta(record, student.backbone, parts.objective),
        "step": step,
        **weights,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states,
        "sampler": {"consumed": step * data["per_gpu_batch_size"] * record["optim"]["grad_accum_steps"]},
        "counters": {key: float(value) for key, value in counters.items()},
        "config": record,
    }
    state[DIGEST_KEY] = content_digest(state).hexdigest()
    directory = Path(run_dir) / "checkpoints"
    save_atomic(state, checkpoint_path(directory, step))
    output = record["output"]
    prune(directory, step, output["keep_last"], output["milestone_every"])


def check_loadable(state, path, accelerator):
    """A mismatch between the checkpoint and this launch, reported before anything is restored."""
    if state.get("format") != models.CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} was written by an older version of this code ({state.get('format')}); finish that run "
            "with that version, or start a new one (--run-name). sample_ddp.py and analysis still read it")
    ranks = state["rng"]
    if len(ranks) != accelerator.num_processes:
        raise UserError(
            f"{path} was written by {len(ranks)} processes; resume with the same number (now "
            f"{accelerator.num_processes}) so the run continues identically")


def restore(state, parts, accelerator):
    student = parts.student
    load_full_state_dict(student.backbone, state["model"])
    if student.head is not None:
        load_full_state_dict(student.head, state["head"])
    parts.ema.load_state_dict(state["ema"])
    if own_teacher(parts):
        parts.teacher.load_state_dict(state["teacher"])
    load_optimizer_state_dict(student, parts.optimizer, state["opt"])
    if parts.scaler is not None and state["scaler"] is not None:
        parts.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][accelerator.process_index], accelerator.device)
