"""Benchmark of the ADM evaluation suite, end to end: features of a sample and a reference set, then
statistics, FID, sFID, Inception Score, precision and recall, each timed.

    python bench/bench_evaluator.py --num-samples 50000 --num-reference 10000 --batch-size 500   # GPU
    python bench/bench_evaluator.py --num-samples 16 --num-reference 8 --device cpu              # CPU

Images are random uint8 (N, H, W, 3), generated batch by batch as a file reader would deliver them.
--random-weights builds the same architecture with random weights, for machines the 87 MB weight file
cannot reach; the softmax weight for the IS is always random (it is not shipped), which times the same.
"""

import argparse
import contextlib
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as `python bench/bench_evaluator.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.evaluator import BATCH_SIZE  # noqa: E402
from evaluations.features import InceptionFeatures  # noqa: E402
from evaluations.inception import (  # noqa: E402
    NUM_LOGITS,
    POOL_DIM,
    default_weights_path,
    load_fid_inception,
    random_fid_inception,
    torchscript_max_abs_differences,
)
from evaluations.metrics import frechet_distance, inception_score, precision_recall  # noqa: E402

SOFTMAX_WEIGHT_SCALE = 0.01  # keeps random logits small enough that no probability underflows to 0
CPU_CHECK_IMAGES = 4  # images compared between the device and the CPU


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=50000)
    parser.add_argument("--num-reference", type=int, default=10000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per Inception forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--random-weights", action="store_true", help="random weights, same architecture")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def random_images(num_images, batch_size, image_size, seed):
    rng = np.random.default_rng(seed)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        yield rng.integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def stage(timings, name, device):
    """Record the wall time of the block under `name`, device work included."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    timings[name] = time.perf_counter() - start


def report_device_vs_cpu(features, image_size):
    """Max |device - CPU| of the features of a few images (TF32 must be off for this to be ~1e-5)."""
    images = next(random_images(CPU_CHECK_IMAGES, CPU_CHECK_IMAGES, image_size, seed=1))
    device_pool, device_spatial = features(images)
    cpu_pool, cpu_spatial = InceptionFeatures(copy.deepcopy(features.network).cpu())(images)
    print(
        f"device vs CPU max |diff| on {CPU_CHECK_IMAGES} images: pool_3 "
        f"{(device_pool.cpu() - cpu_pool).abs().max().item():.3g} "
        f"(max |pool_3| {cpu_pool.abs().max().item():.3g}), "
        f"sFID features {(device_spatial.cpu() - cpu_spatial).abs().max().item():.3g}"
    )


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    network = random_fid_inception(args.seed) if args.random_weights else load_fid_inception()
    generator = torch.Generator().manual_seed(args.seed)
    if not args.random_weights:
        inputs = torch.rand(2, 3, 299, 299, generator=generator) * 2 - 1
        pool_difference, spatial_difference = torchscript_max_abs_differences(
            network, default_weights_path(), inputs
        )
        print(f"eager vs TorchScript max |diff| (CPU): pool_3 {pool_difference}, sFID {spatial_difference}")
    softmax_weight = torch.randn(POOL_DIM, NUM_LOGITS, generator=generator) * SOFTMAX_WEIGHT_SCALE
    features = InceptionFeatures(network, device, softmax_weight)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    print(
        f"device {device_name}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
        f"weights {'random' if args.random_weights else 'default_1.pt'}, batch {args.batch_size}, "
        f"{args.image_size}px, cudnn.benchmark {args.cudnn_benchmark}"
    )
    if device.type != "cpu":
        report_device_vs_cpu(features, args.image_size)
    features(next(random_images(2, 2, args.image_size, args.seed)))  # warm-up: kernels, allocator

    timings = {}
    with stage(timings, "reference features", device):
        reference_images = random_images(args.num_reference, args.batch_size, args.image_size, args.seed + 1)
        reference = features.activations(reference_images, args.num_reference, "reference")
    with stage(timings, "sample features", device):
        sample_images = random_images(args.num_samples, args.batch_size, args.image_size, args.seed + 2)
        sample = features.activations(sample_images, args.num_samples, "sample")
    with stage(timings, "statistics", device):
        reference_statistics, sample_statistics = reference.statistics(), sample.statistics()
    with stage(timings, "FID", device):
        fid = frechet_distance(sample_statistics.pool, reference_statistics.pool)
    with stage(timings, "sFID", device):
        sfid = frechet_distance(sample_statistics.spatial, reference_statistics.spatial)
    with stage(timings, "Inception Score", device):
        inception = inception_score(features.probabilities(sample.pool))
    with stage(timings, "precision/recall", device):
        reference_pool = torch.from_numpy(reference.pool).to(device)
        precision, recall = precision_recall(reference_pool, torch.from_numpy(sample.pool).to(device))

    num_images = args.num_samples + args.num_reference
    feature_seconds = timings["reference features"] + timings["sample features"]
    total_seconds = sum(timings.values())
    print(f"Inception Score: {inception}\nFID: {fid}\nsFID: {sfid}\nPrecision: {precision}\nRecall: {recall}")
    for name, seconds in timings.items():
        print(f"{name:>22}: {seconds:8.2f} s")
    print(f"Inception throughput: {num_images / feature_seconds:.1f} images/s ({num_images} images)")
    print(
        f"end to end: {total_seconds:.1f} s for {args.num_samples} samples against {args.num_reference} "
        f"reference images"
    )


if __name__ == "__main__":
    main()
