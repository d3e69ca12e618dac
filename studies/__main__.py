"""python -m studies --name NAME --data-dir DIR --setting A="train.py flags" --setting B="…" --seeds 0 1 2 …

Runs a grid of train.py trainings (settings × seeds) and says whether the settings differ by more than the
spread between seeds:

    python -m studies --name b2-sra --data-dir data/imagenet256 --seeds 0 1 2 --baseline baseline \\
        --setting baseline="--preset sit-b2" --setting sra="--preset sit-b2-sra" \\
        --common "--max-steps 100000 --eval-every 25000 --eval-ref data/ref10k.npz"
    python -m studies --grid study.json                    # the same from a JSON file (studies/grid.py)
    python -m studies --grid study.json --dry-run          # the runs, their state and commands; nothing runs
    python -m studies --grid study.json --print-commands --launcher "accelerate launch --multi_gpu --num_processes 8"
    python -m studies --grid study.json --report-only      # after the cluster jobs: the table and curves

Without --print-commands the runs train here, one after another, through train.py's own main. Rerunning
the same command resumes: finished runs are skipped, an interrupted one continues from its checkpoint.
Each run's result is the in-training FID (train.py --eval-every/--eval-ref) at its last step, or, with
--evaluate-ref, the ADM metrics of NUM_SAMPLES images sampled from its final EMA (sample_ddp.py and the
evaluator). Written to RESULTS_DIR/NAME: table.md and table.csv (per setting: mean ± std over seeds, a
95 % interval, the difference from --baseline and Welch's t-test at α = 0.05), curves.png and
curves.csv (FID against step and training time, the mean over seeds with a ±1 std band).
"""
import argparse
import json
import shlex
import sys

import sample_ddp
import train
from errors import ArgumentParser, run_cli
from evaluations import evaluator

from .grid import DEFAULT_RESULTS_DIR, load_study
from .report import (
    collect,
    curve_bands,
    evaluation_dir,
    markdown_table,
    plot_bands,
    table_rows,
    write_bands_csv,
    write_table_csv,
)


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m studies", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("--grid", metavar="FILE", help="a JSON grid (name, data_dir, seeds, common, settings, baseline); "
                                        "flags given here override it (default: none)")
    flag("--name", help="the study's directory name under --results-dir (required, here or in the grid)")
    flag("--data-dir", metavar="DIR", help="the dataset of every run (required, here or in the grid)")
    flag("--setting", action="append", default=[], metavar='NAME="FLAGS"',
         help="a setting: its name and its train.py flags; repeat for each (required, here or in the grid)")
    flag("--seeds", type=int, nargs="+", metavar="S", help="seeds of every setting (required, here or in the grid)")
    flag("--common", metavar='"FLAGS"', help="train.py flags for every run (default: none)")
    flag("--baseline", metavar="NAME", help="the setting the others are tested against (default: none)")
    flag("--results-dir", default=str(DEFAULT_RESULTS_DIR), metavar="DIR",
         help="studies go to RESULTS_DIR/NAME (default: %(default)s)")
    flag("--dry-run", action="store_true", help="list the runs, their state and their commands; run nothing")
    flag("--print-commands", action="store_true",
         help="print one train.py command per unfinished run (for a cluster) and stop")
    flag("--launcher", default="python", metavar='"CMD"',
         help='what runs train.py in printed commands, e.g. "accelerate launch --num_processes 8" '
              "(default: %(default)s)")
    flag("--report-only", action="store_true", help="train nothing; evaluate and report what is there")
    flag("--evaluate-ref", metavar="NPZ", help="evaluate each finished run's final EMA against this reference "
                                               "with sample_ddp.py and the evaluator (default: the in-training FID)")
    flag("--num-samples", type=int, default=10_000, metavar="N", help="images per evaluation (default: %(default)s)")
    flag("--sample-flags", default="", metavar='"FLAGS"',
         help="extra sample_ddp.py flags for the evaluation, e.g. \"--cfg-scale 1 --num-steps 250\" (default: none)")
    return parser.parse_args(argv)


def command(launcher, run) -> str:
    return f"{launcher} train.py {shlex.join(run.argv)}"


def evaluate(run, args):
    """The ADM metrics of NUM_SAMPLES images from the run's final checkpoint, kept in its eval directory."""
    out = evaluation_dir(run)
    if (out / "metrics.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    ckpt = run.run_dir / "checkpoints" / f"step_{run.max_steps:07d}.pt"
    samples = out / "samples.npz"
    sample_ddp.main(["--ckpt", str(ckpt), "--num-samples", str(args.num_samples), "--output", str(samples),
                     "--seed", str(run.seed), *shlex.split(args.sample_flags)])
    evaluator.main([args.evaluate_ref, str(samples), "--num-samples", str(args.num_samples),
                    "--output-json", str(out / "metrics.json")])


def report(study, runs):
    results, notes = collect(runs)
    rows = table_rows(results, list(study.settings), study.baseline)
    study.directory.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows, study.baseline) if rows else "no results yet\n"
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (study.directory / "table.md").write_text(text)
    write_table_csv(rows, study.directory / "table.csv")
    bands = curve_bands(runs)
    if bands:
        plot_bands(bands, study.directory / "curves.png")
        write_bands_csv(bands, study.directory / "curves.csv")
    print(text, end="")
    print(f"wrote {study.directory / 'table.md'}, table.csv" + (", curves.png, curves.csv" if bands else ""))
    return rows


def main(argv=None):
    args = parse_args(argv)
    study = load_study(args.grid, args.name, args.setting, args.seeds, args.common, args.data_dir, args.baseline,
                       args.results_dir)
    runs = study.runs()  # every run's flags checked by train.py's parser before anything runs
    if args.dry_run or args.print_commands:
        for run in runs:
            if args.print_commands:
                if not run.done:
                    print(command(args.launcher, run))
                continue
            state = "done" if run.done else f"at step {run.finished_step()} of {run.max_steps}"
            print(f"{run.setting} seed {run.seed}: {state}\n  {command(args.launcher, run)}")
        return {"study": study, "runs": runs}
    if not args.report_only:
        for index, run in enumerate(runs, start=1):
            if run.done:
                print(f"[{index}/{len(runs)}] {run.setting} seed {run.seed}: done")
                continue
            print(f"[{index}/{len(runs)}] {run.setting} seed {run.seed}: {command(sys.executable, run)}", flush=True)
            train.main(list(run.argv))
    if args.evaluate_ref:
        for run in runs:
            if run.done:
                evaluate(run, args)
    study.directory.mkdir(parents=True, exist_ok=True)
    (study.directory / "study.json").write_text(json.dumps({
        "name": study.name, "data_dir": study.data_dir, "seeds": list(study.seeds), "common": shlex.join(study.common),
        "settings": {key: shlex.join(flags) for key, flags in study.settings.items()}, "baseline": study.baseline,
    }, indent=2) + "\n")
    return {"study": study, "runs": runs, "rows": report(study, runs)}


if __name__ == "__main__":
    run_cli(main)
