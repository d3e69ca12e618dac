"""From checkpoints and a labelled dataset to the probe table and figures: `run_probe`.

For every checkpoint and weights (EMA, online), features are extracted (cached,
resumable) on a train and a val split, one linear probe is trained per (block, noise level) on the
train features, and its top-1 on the val features is reported.
"""
import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from analysis.features import (
    EMBEDDING_BLOCK,
    PRECISIONS,
    FeatureModel,
    cache_directory,
    clean_inputs,
    extract_features,
    indices_digest,
    load_feature_model,
)
from analysis.pca import input_pictures, pca_panels
from analysis.plots import plot_checkpoint, plot_comparison, save_pca_figure
from analysis.probe import ProbeConfig, top1_accuracy, train_linear_probe
from errors import UserError
from evaluations.evaluator import check_device
from preprocessing.dataset import LatentDataset
from sampling.pipeline import training_info

WEIGHTS = ("ema", "model")  # the EMA weights (SRA's teacher, SPEC §3) and the online weights
VAL_FRACTION = 0.1  # held-out share of --data-dir when there is no --val-dir (a choice)
EXTRACT_BATCH_SIZE = 64  # images per feature forward; changes memory and speed, never the features
PCA_IMAGES = 2  # images in pca.png
MIN_SPLIT_SAMPLES = 2  # the probe's BatchNorm needs two rows
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")  # checkpoint names become file names
CSV_COLUMNS = ("checkpoint", "weights", "block", "t", "top1", "train_top1", "train_samples", "val_samples")


def checkpoint_name(path) -> str:
    """A short name for a checkpoint: `<run>_<step file>` for train.py's `<run>/checkpoints/*.pt`,
    else the file's stem."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}_{path.stem}"
    return path.stem


@dataclasses.dataclass
class Split:
    """The train and val samples of a probe: datasets (maybe the same one) and sorted indices."""

    train: LatentDataset
    train_indices: np.ndarray
    val: LatentDataset
    val_indices: np.ndarray


def make_split(data_dir, val_dir=None, val_fraction=VAL_FRACTION, seed=0, max_train_samples=None,
               max_val_samples=None) -> Split:
    """Train = data_dir and val = val_dir, or one seeded permutation of data_dir cut at val_fraction.
    max_*_samples keep a seeded random subset of each side."""
    for flag, limit in (("--max-train-samples", max_train_samples), ("--max-val-samples", max_val_samples)):
        if limit is not None and limit <= 0:
            raise UserError(f"{flag} must be positive, got {limit}")
    train = LatentDataset(data_dir)
    if val_dir is not None:
        val = LatentDataset(val_dir)
        train_indices, val_indices = np.arange(len(train)), np.arange(len(val))
    else:
        if not 0 < val_fraction < 1:
            raise UserError(f"--val-fraction must lie in (0, 1), got {val_fraction}")
        val = train
        val_count = round(len(train) * val_fraction)
        order = np.random.default_rng(seed).permutation(len(train))
        train_indices, val_indices = order[val_count:], order[:val_count]
    if any(train.meta[key] != val.meta[key] for key in ("num_classes", "sample_shape", "kind")):
        raise UserError(f"{data_dir} and {val_dir} differ in classes, sample shape or kind")
    rng = np.random.default_rng([seed, 1])
    split = Split(train, _subset(train_indices, max_train_samples, rng),
                  val, _subset(val_indices, max_val_samples, rng))
    if min(len(split.train_indices), len(split.val_indices)) < MIN_SPLIT_SAMPLES:
        raise UserError(f"the split has {len(split.train_indices)} train and {len(split.val_indices)} val "
                        f"samples; each side needs at least {MIN_SPLIT_SAMPLES}")
    return split


def _subset(indices, limit, rng) -> np.ndarray:
    if limit is not None:
        indices = rng.permutation(indices)[:limit]
    return np.sort(indices)  # sorted reads are sequential in the shards


def _check_request(checkpoints, blocks, times, weights, seed):
    if not checkpoints:
        raise UserError("no checkpoints given")
    bad_names = [name for name in checkpoints if not NAME_PATTERN.match(name)]
    if bad_names:
        raise UserError(f"checkpoint names {bad_names} must use only letters, digits, '.', '_', '-'")
    for path in checkpoints.values():
        if not Path(path).is_file():
            raise UserError(f"--ckpt {path}: no such checkpoint file")
    if not blocks or len(set(blocks)) != len(blocks) or min(blocks) < EMBEDDING_BLOCK:
        raise UserError(f"blocks must be distinct integers >= 0 (0 = embedded input), got {blocks}")
    if not times or len(set(times)) != len(times) or not all(0 <= t <= 1 for t in times):
        raise UserError(f"noise levels must be distinct values in [0, 1] (0 = clean), got {times}")
    if not weights or len(set(weights)) != len(weights) or not set(weights) <= set(WEIGHTS):
        raise UserError(f"weights must be distinct values of {WEIGHTS}, got {weights}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")  # numpy's generators refuse negative seeds


def _check_directories(output_dir: Path, cache_root: Path):
    """Both are created later, once the request is known to be good; a file in their place is a mistake."""
    for flag, directory in (("--output-dir", output_dir), ("--cache-dir", cache_root)):
        if directory.exists() and not directory.is_dir():
            raise UserError(f"{flag} {directory} exists and is not a directory")


def _check_models(feature_models: dict, blocks, split: Split):
    shape = list(split.train.meta["sample_shape"])
    for (name, _), feature_model in feature_models.items():
        model = feature_model.model
        if max(blocks) > model.depth:
            raise UserError(f"{name} ({feature_model.name}) has {model.depth} blocks; block {max(blocks)} "
                            "does not exist")
        expected = [model.in_channels, model.input_size, model.input_size]
        if expected != shape:
            raise UserError(f"{name} takes inputs of shape {expected}, the dataset holds {shape}")


def _training_data_dir(checkpoints) -> str:
    """The data_dir every checkpoint of this project was trained on, when they agree and it is here."""
    found = {training_info(path).get("data_dir") for path in checkpoints.values()}
    if len(found) != 1 or None in found:
        raise UserError("pass --data-dir: the checkpoints do not name one training dataset")
    data_dir = found.pop()
    if not Path(data_dir).is_dir():
        raise UserError(f"the checkpoints were trained on {data_dir}, which is not on this machine; "
                        "pass --data-dir")
    return data_dir


def _features(feature_model: FeatureModel, weights, name, dataset, indices, side, blocks, times,
              cache_root, seed, batch_size, precision, progress):
    # The weights are identified by their content, never by the file's path, size or mtime: a file
    # overwritten in place (cp -p, rsync -a, tar x keep the old mtime) gets its own cache, and the
    # same weights moved elsewhere reuse theirs.
    description = {
        "weights_sha256": feature_model.content_sha256(), "weights": weights, "model": feature_model.name,
        "time_convention": feature_model.time_convention, "precision": precision, "seed": seed,
        "dataset": {"root": str(dataset.root.resolve()), "checksum": dataset.meta["checksum"]},
        "indices": indices_digest(indices),
    }
    directory = cache_directory(cache_root, f"{name}-{weights}-{side}", description)
    return extract_features(feature_model, dataset, indices, blocks, times, directory, seed=seed,
                            batch_size=batch_size, precision=precision, progress=progress,
                            description=f"{name} {weights} {side}")


def _as_tensor(array, device) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).to(device)  # a writable copy of the memory map


def _probe_rows(name, weights, train_features, val_features, train_labels, val_labels, num_classes, probe,
                blocks, times, progress):
    """One probe per (block, noise level); only that pair's features are on the device at a time."""
    rows = []
    device = train_labels.device
    for t in times:
        for block in blocks:
            train_x = _as_tensor(train_features[block, t], device)
            val_x = _as_tensor(val_features[block, t], device)
            classifier = train_linear_probe(train_x, train_labels, num_classes, probe, progress)
            row = {"checkpoint": name, "weights": weights, "block": block, "t": t,
                   "top1": top1_accuracy(classifier, val_x, val_labels),
                   "train_top1": top1_accuracy(classifier, train_x, train_labels),
                   "train_samples": len(train_x), "val_samples": len(val_x)}
            if progress:
                tqdm.write(f"{name} {weights} block {block} t={t:g}: top-1 {row['top1']:.2%}")
            rows.append(row)
    return rows


def _checkpoint_settings(feature_models: dict, name, path, weights) -> dict:
    """The checkpoint's path (information only) and, per weights probed, their sha256 by content
    (models.weights_sha256, the key of the feature cache)."""
    feature_model = feature_models[name, weights[0]]
    return {"path": str(path), "model": feature_model.name, "time_convention": feature_model.time_convention,
            "weights_sha256": {w: feature_models[name, w].content_sha256() for w in weights},
            "notes": feature_model.notes}


def _write_table(rows, settings, output_dir):
    with open(output_dir / "probe.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    report = {"settings": settings, "results": rows}
    (output_dir / "probe.json").write_text(json.dumps(report, indent=2) + "\n")


def _pca_figure(feature_models, checkpoints, weights, split, blocks, times, count, seed, device, path):
    """pca.png of the first `count` val images, for the given weights of every checkpoint."""
    x0, eps = clean_inputs(split.val, split.val_indices[:count], seed)
    panels, inputs = {}, {}
    for name in checkpoints:
        feature_model = feature_models[name, weights]
        feature_model.model.to(device)
        panels[name] = pca_panels(feature_model, x0, eps, blocks, times)
        noisy = [feature_model.inputs(x0.to(feature_model.device), eps.to(feature_model.device), t)[0]
                 for t in times]
        inputs[name] = torch.stack([input_pictures(x_t, split.val.meta["kind"]) for x_t in noisy], dim=1)
        feature_model.model.to("cpu")
    save_pca_figure(panels, inputs, blocks, times, path, weights)


def run_probe(checkpoints: dict, output_dir, *, blocks, times, data_dir=None, val_dir=None, weights=WEIGHTS,
              val_fraction=VAL_FRACTION, max_train_samples=None, max_val_samples=None, seed=0,
              probe: ProbeConfig | None = None, extract_batch_size=EXTRACT_BATCH_SIZE, precision="fp32",
              device=None, cache_dir=None, pca_images=PCA_IMAGES, model_name=None, time_convention=None,
              progress=True) -> dict:
    """Probe every checkpoint ({name: path}) at every (weights, block, noise level) and write to
    output_dir: probe.csv and probe.json (the table), probe_<name>.png, compare.png (two or more
    checkpoints), pca.png (pca_images > 0; the first of `weights`). Returns {"settings", "results"}.

    blocks: 1-based block indices, 0 = the embedded input; times: noise levels in [0, 1], 0 = clean.
    data_dir: default, the training dataset the checkpoints name. seed: split, noise and probe seed.
    cache_dir: default output_dir/features; rerunning reuses and resumes the extracted features.
    model_name, time_convention: for releases whose file cannot say (see models.load_checkpoint).
    """
    blocks, times, weights = list(blocks), [float(t) for t in times], list(weights)
    probe = probe or ProbeConfig()
    _check_request(checkpoints, blocks, times, weights, seed)
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if pca_images < 0 or extract_batch_size <= 0:
        raise UserError(f"--pca-images must be >= 0 and --extract-batch-size > 0, got {pca_images}, "
                        f"{extract_batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)  # a device this machine lacks is found now, not at the first `.to(device)`
    output_dir = Path(output_dir)
    cache_root = Path(cache_dir) if cache_dir is not None else output_dir / "features"
    _check_directories(output_dir, cache_root)
    feature_models = {(name, w): load_feature_model(path, w, model_name, time_convention)
                      for name, path in checkpoints.items() for w in weights}
    data_dir = data_dir if data_dir is not None else _training_data_dir(checkpoints)
    split = make_split(data_dir, val_dir, val_fraction, seed, max_train_samples, max_val_samples)
    _check_models(feature_models, blocks, split)
    device = torch.device(device)
    output_dir.mkdir(parents=True, exist_ok=True)
    num_classes = split.train.meta["num_classes"]
    train_labels = _as_tensor(split.train.labels[split.train_indices], device)
    val_labels = _as_tensor(split.val.labels[split.val_indices], device)

    rows = []
    for (name, w), feature_model in feature_models.items():
        feature_model.model.to(device)
        common = (blocks, times, cache_root, seed, extract_batch_size, precision, progress)
        train_features = _features(feature_model, w, name, split.train, split.train_indices, "train", *common)
        val_features = _features(feature_model, w, name, split.val, split.val_indices, "val", *common)
        rows += _probe_rows(name, w, train_features, val_features, train_labels, val_labels, num_classes,
                            probe, blocks, times, progress)
        feature_model.model.to("cpu")

    settings = {
        "checkpoints": {name: _checkpoint_settings(feature_models, name, path, weights)
                        for name, path in checkpoints.items()},
        "data_dir": str(data_dir), "val_dir": None if val_dir is None else str(val_dir),
        "val_fraction": None if val_dir is not None else val_fraction, "num_classes": num_classes,
        "blocks": blocks, "times": times, "weights": weights, "seed": seed, "precision": precision,
        "probe": dataclasses.asdict(probe), "pooling": "mean over tokens, then BatchNorm (paper App. C)",
        "label_input": "null class (unconditional features)",
    }
    _write_table(rows, settings, output_dir)
    chance = 1 / num_classes
    for name in checkpoints:
        plot_checkpoint(rows, name, output_dir / f"probe_{name}.png", chance)
    if len(checkpoints) > 1:
        plot_comparison(rows, list(checkpoints), output_dir / "compare.png", chance)
    if pca_images:
        _pca_figure(feature_models, checkpoints, weights[0], split, blocks, times, pca_images, seed, device,
                    output_dir / "pca.png")
    return {"settings": settings, "results": rows}
