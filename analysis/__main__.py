"""python -m analysis --ckpt [NAME=]PATH [--ckpt ...] --blocks 0 2 4 8 --times 0 0.25 0.5 --output-dir DIR

Linear probes (paper App. C) and PCA pictures (paper Figure 2, left) of the token features of each
checkpoint, for its EMA weights (SRA's teacher) and its online weights. Writes probe.csv, probe.json,
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
    flag = parser.add_argument
    flag("--ckpt", action="append", required=True, metavar="[NAME=]PATH",
         help="checkpoint to probe, repeat to compare; this project's or a public release (required)")
    flag("--output-dir", required=True, metavar="DIR",
         help="where the table, figures and feature cache go (required)")
    flag("--blocks", type=int, nargs="+", required=True, metavar="K",
         help="blocks to probe, 1-based (after that many blocks); 0 = the embedded input (required)")
    flag("--times", type=float, nargs="+", required=True, metavar="T",
         help="noise levels in [0, 1], 0 = clean, converted to each model's time convention (required)")
    flag("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS),
         help="ema = the EMA weights (sampled; SRA's teacher), model = the online weights "
              f"(default: {' '.join(WEIGHTS)})")
    flag("--data-dir", metavar="DIR", help="labelled dataset (python -m preprocessing) "
                                           "(default: the checkpoints' training dataset)")
    flag("--val-dir", metavar="DIR", help="held-out dataset (default: --val-fraction of --data-dir)")
    flag("--val-fraction", type=float, default=VAL_FRACTION, metavar="F",
         help="seeded share of --data-dir held out when there is no --val-dir (default: %(default)s)")
    flag("--max-train-samples", type=int, metavar="N", help="probe on a seeded random subset (default: all)")
    flag("--max-val-samples", type=int, metavar="N", help="score on a seeded random subset (default: all)")
    flag("--seed", type=int, default=0, help="split, noise per sample, probe init and order (default: %(default)s)")
    flag("--epochs", type=int, default=PROBE_EPOCHS, metavar="N",
         help="probe training epochs, paper App. C (default: %(default)s)")
    flag("--probe-batch-size", type=int, default=PROBE_BATCH_SIZE, metavar="N",
         help="probe batch, paper App. C (default: %(default)s)")
    flag("--lr", type=float, default=PROBE_LR,
         help="start of the probe's cosine schedule, paper App. C (default: %(default)g)")
    flag("--weight-decay", type=float, default=PROBE_WEIGHT_DECAY, metavar="WD",
         help="the probe's AdamW weight decay (default: %(default)g)")
    flag("--extract-batch-size", type=int, default=EXTRACT_BATCH_SIZE, metavar="N",
         help="images per feature forward, memory only (default: %(default)s)")
    flag("--precision", choices=PRECISIONS, default="fp32", help="of the feature forward (default: %(default)s)")
    flag("--device", help="torch device (default: cuda if available, else cpu)")
    flag("--cache-dir", metavar="DIR", help="feature cache (default: OUTPUT_DIR/features)")
    flag("--pca-images", type=int, default=PCA_IMAGES, metavar="N",
         help="val images in pca.png, 0 = no pca.png (default: %(default)s)")
    flag("--model", metavar="NAME",
         help="model name for a release that cannot say, e.g. SiT-XL/2 (default: read from the checkpoint)")
    flag("--time-convention", choices=TIME_CONVENTIONS,
         help="override the loader's choice (default: inferred from the checkpoint)")
    flag("--no-progress", action="store_true", help="no progress bars (default: shown)")
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
