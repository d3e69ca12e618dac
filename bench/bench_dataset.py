"""Reading speed of a preprocessed dataset (samples/s), on a synthetic dataset of the ImageNet 256 shape.

Writes a dataset of SD-VAE posterior moments, (8, 32, 32) float16 per sample (what `python -m preprocessing
--resolution 256` stores), through the preprocessing's own writer, then times:
  item      dataset[i] in shuffled order, one process (what a plain DataLoader does per sample)
  batch     dataset.get_batch(indices), one process (what make_loader's workers do per batch)
  loader    make_loader(...) end to end, with 0 and N workers (collation, worker transfer, no pinning on CPU)
The data was just written, so it is in the page cache: these are warm-cache numbers.

    python bench/bench_dataset.py                          # prints a markdown block
    python bench/bench_dataset.py --num-samples 65536 --workers 8
"""

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from itertools import islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import store  # noqa: E402
from preprocessing.dataset import LatentDataset, make_loader  # noqa: E402

SAMPLE_SHAPE = (8, 32, 32)  # mean and std of 4 x 32 x 32 SD latents: 256 px images (SPEC §1)
NUM_CLASSES = 1000  # ImageNet


def write_synthetic(root: Path, num_samples: int, samples_per_shard: int) -> None:
    rng = np.random.default_rng(0)
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        count = min(samples_per_shard, num_samples - start)
        samples = rng.standard_normal((count, *SAMPLE_SHAPE), dtype=np.float32).astype(np.float16)
        labels = rng.integers(0, NUM_CLASSES, count).tolist()
        store.write_shard(root, shard, samples, labels, [f"{start + i}.png" for i in range(count)], [])
    description = {
        "kind": "vae",
        "sample_shape": [SAMPLE_SHAPE[0] // 2, *SAMPLE_SHAPE[1:]],
        "stored_shape": list(SAMPLE_SHAPE),
        "stored_dtype": "float16",
        "num_classes": NUM_CLASSES,
        "class_names": [str(k) for k in range(NUM_CLASSES)],
    }
    store.finalize(root, shard + 1, description)


def rate(samples: int, start: float) -> float:
    return samples / (time.perf_counter() - start)


def time_items(dataset: LatentDataset, count: int) -> float:
    order = np.random.default_rng(1).permutation(len(dataset))[:count].tolist()
    start = time.perf_counter()
    for i in order:
        dataset[i]
    return rate(count, start)


def time_batches(dataset: LatentDataset, batch_size: int, batches: int) -> float:
    order = np.random.default_rng(2).permutation(len(dataset))
    start = time.perf_counter()
    for k in range(batches):
        dataset.get_batch(order[k * batch_size : (k + 1) * batch_size].tolist())
    return rate(batches * batch_size, start)


def time_loader(dataset: LatentDataset, batch_size: int, batches: int, num_workers: int) -> float:
    loader = make_loader(dataset, batch_size, num_workers=num_workers, seed=3)
    next(loader)  # worker start-up is a one-off cost, not reading speed
    start = time.perf_counter()
    for _ in islice(loader, batches):
        pass
    return rate(batches * batch_size, start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=32768)
    parser.add_argument("--samples-per-shard", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256, help="per-GPU batch (SPEC §4: 256 global)")
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the multi-process run")
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores", help="how the report names it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_synthetic(root, args.num_samples, args.samples_per_shard)
        start = time.perf_counter()
        dataset = LatentDataset(root, expected_shape=(4, 32, 32), num_classes=NUM_CLASSES)
        open_ms = 1e3 * (time.perf_counter() - start)
        results = [
            ("item (dataset[i], shuffled)", time_items(dataset, min(len(dataset), 20000))),
            (f"batch (get_batch, {args.batch_size})", time_batches(dataset, args.batch_size, args.batches)),
            (
                f"loader, batch {args.batch_size}, 0 workers",
                time_loader(dataset, args.batch_size, args.batches, 0),
            ),
            (
                f"loader, batch {args.batch_size}, {args.workers} workers",
                time_loader(dataset, args.batch_size, args.batches, args.workers),
            ),
        ]
    size_mb = args.num_samples * np.prod(SAMPLE_SHAPE) * 2 / 2**20
    print(
        f"### Dataset reading ({date.today()}, {args.machine}, {platform.python_implementation()} "
        f"{platform.python_version()}, warm page cache)"
    )
    print(f"`{shlex.join(['python', 'bench/bench_dataset.py', *sys.argv[1:]])}`")
    print(
        f"{args.num_samples} samples of {SAMPLE_SHAPE} float16 ({size_mb:.0f} MB, "
        f"{args.samples_per_shard} per shard); opening and validating the dataset took {open_ms:.0f} ms.\n"
    )
    print("| path | samples/s |\n|---|---|")
    for name, samples_per_second in results:
        print(f"| {name} | {samples_per_second:,.0f} |")


if __name__ == "__main__":
    main()
