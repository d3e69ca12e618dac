"""Pooled token features of a backbone at chosen blocks and noise levels, cached on disk.

A probing noise level t ∈ [0, 1] (0 = clean data) becomes the model's own time: t for this project's
flow models and the SRA/REPA releases (t = 0 is data), 1 − t for the SiT release (t = 1 is data), the
step round(t·(T − 1)) for DiT (SPEC §2). Dataset sample i gets its latent draw and its noise ε from a
generator seeded by (seed, i) alone, so a feature does not depend on the batch size or the split, and
every noise level perturbs the same x0 with the same ε. The model sees the null class: the paper's
probes are unconditional, and a class-conditioned feature would hand the probe its answer.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor, nn
from tqdm import tqdm

import models
from errors import UserError
from objectives import Objective
from preprocessing.dataset import LatentDataset, sample_model_input
from sampling.pipeline import build_objective, training_info
from sampling.seeds import derived_seed

NOISE_STREAM = 0  # the latent draw and ε of dataset sample i (sampling.seeds.derived_seed streams)
EMBEDDING_BLOCK = 0  # "block 0": the patch embedding plus position embedding, before any block
PRECISIONS = ("fp32", "bf16")
CACHE_DTYPE = np.float32  # pooled features are small next to the tokens; no reason to round them
DESCRIPTION_FILE = "description.json"
DIGEST_CHARS = 16  # hex digits of the cache key kept in a directory name


@dataclasses.dataclass
class FeatureModel:
    """A backbone, the objective that builds its noisy inputs, and its time convention."""

    model: nn.Module  # models.DiT, in eval mode
    objective: Objective  # ddpm for DiT, flow for SiT (x_t = α_t·x0 + σ_t·ε)
    time_convention: str  # models.DATA_AT_0, DATA_AT_1 or DISCRETE_STEPS
    name: str  # registry name, e.g. "SiT-B/2"
    source: str  # the weights that were loaded: "ema", "model" or "state_dict"
    notes: list  # how the loader decided the name and time convention, for the user
    # models.weights_sha256 of the loaded weights: the backbone by content, whatever its file's path,
    # size or mtime. load_feature_model fills it in; for a hand-built FeatureModel it is computed on use.
    weights_sha256: str | None = None

    def content_sha256(self) -> str:
        """The weights by content (models.weights_sha256), computed once."""
        if self.weights_sha256 is None:
            self.weights_sha256 = models.weights_sha256(self.model.state_dict())
        return self.weights_sha256

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    def objective_time(self, noise_level: float, n: int) -> Tensor:
        """(n,) times of noise level t in the objective's units: DiT steps round(t·(T − 1)), else t."""
        if self.time_convention == models.DISCRETE_STEPS:
            step = round(noise_level * (self.objective.num_timesteps - 1))
            return torch.full((n,), step, dtype=torch.long, device=self.device)
        return torch.full((n,), noise_level, dtype=torch.float32, device=self.device)

    def inputs(self, x0: Tensor, eps: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
        """(x_t, the time input the network expects) at noise level t ∈ [0, 1]."""
        t = self.objective_time(noise_level, len(x0))
        x_t = self.objective.noisy(x0, eps, t)
        t_model = self.objective.model_time(t)
        if self.time_convention == models.DATA_AT_1:
            t_model = 1 - t_model  # the SiT release was trained with t = 1 the data (SPEC §2)
        return x_t, t_model


def load_feature_model(path, weights="ema", model_name=None, time_convention=None) -> FeatureModel:
    """The backbone of a checkpoint (this project's or a public release) for feature extraction.

    weights: "ema" (the SRA teacher) or "model" (the online student). A release that is a bare state
    dict holds one set of weights; it serves "ema" only.
    """
    loaded = models.load_checkpoint(path, model_name, time_convention=time_convention, prefer=weights)
    if loaded.source != weights and not (weights == "ema" and loaded.source == "state_dict"):
        raise UserError(f"{path} has no '{weights}' weights (it holds '{loaded.source}'); "
                        "choose other --weights")
    if models.family_of(loaded.name).condition != "class":
        raise UserError(f"{path} holds {loaded.name}, which is conditioned on text; the probes predict class "
                        "labels, so the analysis takes class-conditional DiT/SiT checkpoints")
    model = loaded.model.eval().requires_grad_(False)
    if model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise UserError(f"{path}: the model has no null class, and probing feeds the null class label")
    objective = build_objective(loaded, training_info(path))
    return FeatureModel(model, objective, loaded.time_convention, loaded.name, loaded.source, loaded.notes,
                        models.weights_sha256(model.state_dict()))


def token_features(model: nn.Module, x_t: Tensor, t_model: Tensor, blocks) -> dict[int, Tensor]:
    """Tokens (N, T, D) after each of `blocks` (1-based; 0 = the embedded input before any block),
    from one partial-depth forward through the deepest of them, with the null class label."""
    features = {}
    if EMBEDDING_BLOCK in blocks:
        features[EMBEDDING_BLOCK] = model.x_embedder(x_t) + model.pos_embed  # (N, T, D)
    deepest = max(blocks)
    if deepest > EMBEDDING_BLOCK:
        y_null = torch.full((len(x_t),), model.num_classes, dtype=torch.long, device=x_t.device)
        hooks = [model.blocks[block - 1].register_forward_hook(partial(_keep_output, features, block))
                 for block in blocks if block != EMBEDDING_BLOCK]
        try:
            model.forward_features(x_t, t_model, y_null, deepest)
        finally:
            for hook in hooks:
                hook.remove()
    return {block: features[block] for block in blocks}


def _keep_output(features, block, module, args, output):
    features[block] = output


def pool_tokens(tokens: Tensor) -> Tensor:
    """(N, T, D) -> (N, D): adaptive average pooling over the tokens, the paper's probe input (App. C)."""
    return tokens.mean(dim=1)


def clean_inputs(dataset: LatentDataset, indices, seed: int) -> tuple[Tensor, Tensor]:
    """(x0, ε), each (N, C, H, W) float32 on the CPU, for these dataset indices; sample i's latent
    draw (VAE data) and ε come from one generator seeded by (seed, i)."""
    stored, _ = dataset.get_batch(list(indices))
    x0s, noises = [], []
    for row, index in zip(stored, indices):
        generator = torch.Generator().manual_seed(derived_seed(seed, NOISE_STREAM, int(index)))
        x0 = sample_model_input(row[None], dataset.meta, generator)  # (1, C, H, W)
        x0s.append(x0)
        noises.append(torch.randn(x0.shape, generator=generator))
    return torch.cat(x0s), torch.cat(noises)


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- the cache ---------------------------------------------------------------------------------

def cache_directory(cache_root, label: str, description: dict) -> Path:
    """root/<label>-<digest of description>: one directory per (weights, data split, seed, ...).
    The description is written beside the features, for people reading the cache."""
    text = json.dumps(description, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]
    directory = Path(cache_root) / f"{label}-{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return directory


def indices_digest(indices) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Chunk:
    """The files of one (block, noise level): the finished array, or a partial one and its row count."""

    directory: Path
    block: int
    noise_level: float

    @property
    def stem(self) -> str:
        return f"block{self.block}_t{self.noise_level!r}"  # repr: distinct floats, distinct names

    @property
    def final(self) -> Path:
        return self.directory / f"{self.stem}.npy"

    @property
    def partial(self) -> Path:
        return self.directory / f"{self.stem}.partial.npy"

    @property
    def progress(self) -> Path:
        return self.directory / f"{self.stem}.progress.json"

    def rows_done(self, shape) -> int:
        """Rows already written to the partial file (0 when there is none, or it has another shape)."""
        if not (self.partial.is_file() and self.progress.is_file()):
            return 0
        progress = json.loads(self.progress.read_text())
        return progress["rows"] if tuple(progress["shape"]) == tuple(shape) else 0

    def open_partial(self, shape, rows_done) -> np.ndarray:
        if rows_done:
            return open_memmap(self.partial, mode="r+")
        self.write_progress(shape, 0)  # before the file exists, so no stale count ever describes it
        return open_memmap(self.partial, mode="w+", dtype=CACHE_DTYPE, shape=tuple(shape))

    def write_progress(self, shape, rows):
        tmp = self.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, "shape": list(shape)}))
        os.replace(tmp, self.progress)

    def finish(self):
        os.replace(self.partial, self.final)
        self.progress.unlink()


def extract_features(feature_model: FeatureModel, dataset: LatentDataset, indices, blocks, noise_levels,
                     cache_dir, *, seed=0, batch_size=64, precision="fp32", progress=True,
                     description="features") -> dict[tuple[int, float], np.ndarray]:
    """Pooled features (N, D) of the samples `indices` for every (block, noise level), read-only
    memory maps of the cache. Missing chunks are computed batch by batch on the model's device; all
    blocks at one noise level come from one forward pass. An interrupted run resumes at the first
    batch not yet written. `cache_dir` must be specific to this model, dataset, indices and seed
    (see `cache_directory`)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    shape = (len(indices), feature_model.model.hidden_size)
    for noise_level in noise_levels:
        pending = [Chunk(cache_dir, block, noise_level) for block in blocks]
        pending = [chunk for chunk in pending if not chunk.final.is_file()]
        if pending:
            _fill_chunks(feature_model, dataset, np.asarray(indices), pending, shape, seed, batch_size,
                         precision, tqdm(desc=f"{description} t={noise_level:g}", disable=not progress,
                                         unit="img", total=shape[0]))
    return {(block, noise_level): np.load(Chunk(cache_dir, block, noise_level).final, mmap_mode="r")
            for noise_level in noise_levels for block in blocks}


@torch.no_grad()
def _fill_chunks(feature_model, dataset, indices, chunks, shape, seed, batch_size, precision, bar):
    noise_level = chunks[0].noise_level
    blocks = [chunk.block for chunk in chunks]
    rows_done = {chunk: chunk.rows_done(shape) for chunk in chunks}
    arrays = {chunk: chunk.open_partial(shape, rows_done[chunk]) for chunk in chunks}
    start = min(rows_done.values())  # a chunk ahead of the others has its rows rewritten, identically
    bar.update(start)
    for begin in range(start, shape[0], batch_size):
        end = min(begin + batch_size, shape[0])
        x0, eps = clean_inputs(dataset, indices[begin:end], seed)
        x_t, t_model = feature_model.inputs(x0.to(feature_model.device), eps.to(feature_model.device),
                                            noise_level)
        with autocast(feature_model.device, precision):
            tokens = token_features(feature_model.model, x_t, t_model, blocks)
        for chunk in chunks:
            arrays[chunk][begin:end] = pool_tokens(tokens[chunk.block]).float().cpu().numpy()
            arrays[chunk].flush()
            chunk.write_progress(shape, end)
        bar.update(end - begin)
    bar.close()
    del arrays  # closes the memory maps before the files are renamed
    for chunk in chunks:
        chunk.finish()
