"""python -m demo.study [--seeds 0 1 2] [--output-dir results/demo-study] [any python -m demo flag]
(what `make study` runs)

The demo's comparison, baseline against SRA, repeated with several seeds, so that the difference between
them can be read against the spread between seeds: each seed is a whole demo (python -m demo --seed S,
in OUTPUT_DIR/seed<S>: its own training seeds and sampling seed, the same dataset), and the table puts,
per run and metric, the mean over seeds, the standard deviation, a 95 % interval and Welch's t-test of SRA
against the baseline (studies/stats.py). Metrics: FID of the samples against the held-out reference, the
share of samples a classifier assigns to their class (demo/classifier.py; shape alone and colour + shape)
and the linear-probe top-1 averaged over blocks and noise levels (python -m analysis). Rerunning the same
command reuses every finished seed and stage.
"""
import argparse
import json
import os
import time
from pathlib import Path

from demo import __main__ as demo_cli
from demo import report
from demo.paths import RUNS, DemoPaths
from errors import ArgumentParser, UserError, run_cli
from studies.report import markdown_table, table_rows, write_table_csv

DEFAULT_OUTPUT_DIR = "results/demo-study"
DEFAULT_SEEDS = (0, 1, 2)
BASELINE = "baseline"


def parse_args(argv=None):
    # allow_abbrev off: "--seed" must reach the check below, not be read as "--seeds"
    parser = ArgumentParser(prog="python -m demo.study", description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), metavar="S",
                        help="one whole demo per seed (default: 0 1 2)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                        help="seed S goes to DIR/seed<S>, the table to DIR (default: %(default)s)")
    args, demo_flags = parser.parse_known_args(argv)
    owned = [flag for flag in demo_flags if flag.split("=")[0] in ("--seed", "--output-dir")]
    if owned:
        raise UserError(f"{', '.join(owned)}: set by the study (--seeds, --output-dir)")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UserError(f"--seeds must be different non-negative integers, got {args.seeds}")
    return args, demo_flags


def seed_values(root: Path) -> dict:
    """{run: {metric: value}} from one finished demo directory."""
    paths = DemoPaths(root)
    values = {run: {} for run in RUNS}
    classes = json.loads(paths.classifier.read_text())
    probe = json.loads((paths.probe / "probe.json").read_text())
    for run in RUNS:
        metrics = json.loads(paths.sample_metrics(run).read_text())
        values[run][f"fid{metrics['num_samples']}"] = metrics["fid"]
        values[run]["class share, shape (%)"] = 100 * classes["runs"][run]["shape"]["share"]
        values[run]["class share, colour + shape (%)"] = 100 * classes["runs"][run]["rgb"]["share"]
        top1 = [r["top1"] for r in probe["results"] if r["checkpoint"] == run]
        values[run]["probe top-1, mean over blocks and t (%)"] = 100 * sum(top1) / len(top1)
    return values


def main(argv=None):
    args, demo_flags = parse_args(argv)
    root = Path(args.output_dir)
    start, load_at_start = time.perf_counter(), os.getloadavg()
    per_seed = {}
    for seed in args.seeds:
        print(f"\n=== seed {seed} ===", flush=True)
        demo_cli.main([*demo_flags, "--seed", str(seed), "--output-dir", str(root / f"seed{seed}")])
        per_seed[seed] = seed_values(root / f"seed{seed}")
    results = {run: {} for run in RUNS}
    for values in per_seed.values():
        for run, metrics in values.items():
            for metric, value in metrics.items():
                results[run].setdefault(metric, []).append(value)
    rows = table_rows(results, list(RUNS), BASELINE)
    elapsed = time.perf_counter() - start
    load = os.getloadavg()
    text = (f"# The demo over seeds {', '.join(map(str, args.seeds))}\n\nBaseline against SRA, one whole demo per "
            "seed (python -m demo.study). Per metric: mean ± standard deviation over seeds, the 95 % interval "
            "(Student's t), SRA − baseline, and whether that difference is larger than the seed-to-seed spread "
            "by Welch's two-sided t-test at α = 0.05.\n\n" + markdown_table(rows, BASELINE) +
            f"\nWall time of this command {report.format_duration(elapsed)} (seeds already finished are "
            f"reused, not timed); load average {load_at_start[0]:.1f} at the start, {load[0]:.1f} at the end.\n\n"
            "Per seed:\n\n" + "\n".join(
                f"- seed {seed}: " + "; ".join(f"{run} " + ", ".join(f"{m} {v:.2f}" for m, v in metrics.items())
                                               for run, metrics in values.items())
                for seed, values in per_seed.items()) + "\n")
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(text)
    write_table_csv(rows, root / "table.csv")
    print("\n" + text)
    print(f"wrote {root / 'table.md'} and table.csv")
    return rows


if __name__ == "__main__":
    run_cli(main)
