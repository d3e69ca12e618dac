"""python -m analysis --ckpt [NAME=]PATH [--ckpt ...] --blocks 0 2 4 8 --times 0 0.25 0.5 --output-dir DIR

Linear probes (paper App. C) and PCA pictures (paper Figure 2, left) of the token features of each
checkpoint, for the EMA teacher and the online student. Writes probe.csv, probe.json,
probe_<name>.png, compare.png (two or more checkpoints) and pca.png. Extracted features are cached
under DIR/features; rerunning the same command reuses them and resumes an interrupted extraction.
A mistake in the request (a missing file, a block or noise level out of range, a split too small) ends
the command with one line, `error: ...`, and exit status 2, before any feature is extracted.
"""
import argparse

from analysis.features import PRECISIONS
from analysis.probe import PROBE_BATCH_SIZE, PROBE_EPOCHS, PROBE_LR, PROBE_WEIGHT_DECAY, ProbeConfig
from analysis.report import EXTRACT_BATCH_SIZE, PCA_IMAGES, VAL_FRACTION, WEIGHTS, checkpoint_name, run_probe
from errors import ArgumentParser, UserError, run_cli
from models.checkpoint import TIME_CONVENTIONS


def parse_checkpoints(values) -> dict:
    """`NAME=PATH` or `PATH` (named by analysis.report.checkpoint_name) -> {name: path}, names unique."""
    checkpoints = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator:
            name, path = checkpoint_name(value), value
        if name in checkpoints:
            raise UserError(f"two checkpoints are named {name!r}; name them with --ckpt NAME=PATH")
        checkpoints[name] = path
    return checkpoints


def parse_args(argv):
    parser = ArgumentParser(prog="python -m analysis", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]PATH",
                        help="checkpoint to probe (repeat to compare); this project's or a public release")
    parser.add_argument("--output-dir", required=True, help="where the table, figures and feature cache go")
    parser.add_argument("--blocks", type=int, nargs="+", required=True,
                        help="blocks to probe, 1-based (after that many blocks); 0 = the embedded input")
    parser.add_argument("--times", type=float, nargs="+", required=True,
                        help="noise levels in [0, 1], 0 = clean (converted to each model's time convention)")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS),
                        help="ema = the SRA teacher, model = the online student")
    parser.add_argument("--data-dir", help="labelled dataset (python -m preprocessing); default: the "
                        "checkpoints' training dataset")
    parser.add_argument("--val-dir", help="held-out dataset; default: --val-fraction of --data-dir")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--max-train-samples", type=int, help="probe on a seeded random subset")
    parser.add_argument("--max-val-samples", type=int, help="score on a seeded random subset")
    parser.add_argument("--seed", type=int, default=0, help="split, noise per sample, probe init and order")
    parser.add_argument("--epochs", type=int, default=PROBE_EPOCHS, help="probe epochs (paper: 80)")
    parser.add_argument("--probe-batch-size", type=int, default=PROBE_BATCH_SIZE, help="paper: 4096")
    parser.add_argument("--lr", type=float, default=PROBE_LR,
                        help="start of the cosine schedule (paper: 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=PROBE_WEIGHT_DECAY, help="AdamW weight decay")
    parser.add_argument("--extract-batch-size", type=int, default=EXTRACT_BATCH_SIZE,
                        help="images per feature forward (memory only)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of the feature forward")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--cache-dir", help="feature cache; default: OUTPUT_DIR/features")
    parser.add_argument("--pca-images", type=int, default=PCA_IMAGES, help="images in pca.png (0: none)")
    parser.add_argument("--model", help="model name for a release that cannot say (e.g. SiT-XL/2)")
    parser.add_argument("--time-convention", choices=TIME_CONVENTIONS, help="override the loader's choice")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.checkpoints = parse_checkpoints(args.ckpt)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    probe = ProbeConfig(epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr,
                        weight_decay=args.weight_decay, seed=args.seed)
    report = run_probe(
        args.checkpoints, args.output_dir, blocks=args.blocks, times=args.times, data_dir=args.data_dir,
        val_dir=args.val_dir, weights=args.weights, val_fraction=args.val_fraction,
        max_train_samples=args.max_train_samples, max_val_samples=args.max_val_samples, seed=args.seed,
        probe=probe, extract_batch_size=args.extract_batch_size, precision=args.precision, device=args.device,
        cache_dir=args.cache_dir, pca_images=args.pca_images, model_name=args.model,
        time_convention=args.time_convention, progress=not args.no_progress,
    )
    print(f"wrote {args.output_dir}/probe.csv, probe.json and figures ({len(report['results'])} probes)")
    return report


if __name__ == "__main__":
    run_cli(main)
