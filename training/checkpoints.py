"""Training checkpoints: atomic writes, keep-last-K plus milestones, resume from the newest valid file."""
import os
import re
from pathlib import Path

import torch

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
