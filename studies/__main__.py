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
the same command resumes: finished runs are skipped, an interrupted one continues from its checkpoint; a
run directory whose run was trained with other flags (other than those train.py lets a resumed run change,
such as a larger --max-steps) is refused before anything runs. Each run's result is the in-training FID
(train.py --eval-every/--eval-ref) at its last step, or, with --evaluate-ref, the ADM metrics of
NUM_SAMPLES images sampled from its final EMA (sample_ddp.py and the evaluator), kept under a key of the
checkpoint, the reference (both by content), NUM_SAMPLES and the sample flags: other evaluation settings
give a new evaluation, never the old one's numbers. Every evaluation input is checked before anything
runs. Written to RESULTS_DIR/NAME: table.md and table.csv (per setting: mean ± std over seeds, a
95 % interval, the difference from --baseline and Welch's t-test at α = 0.05), curves.png and
curves.csv (FID against step and training time, the mean over seeds with a ±1 std band).
"""
import argparse
import dataclasses
import hashlib
import json
import shlex
import sys
from pathlib import Path

import torch

import sample_ddp
import train
from errors import ArgumentParser, UserError, run_cli
from evaluations import evaluator
from evaluations.images import open_images
from evaluations.metrics import NEIGHBOURHOOD_SIZE
from models.checkpoint import DIGEST_KEY
from preprocessing import store
from training.checkpoints import checkpoint_path

from .grid import DEFAULT_RESULTS_DIR, check_recorded, load_study
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
    flag("--num-samples", type=int, metavar="N",
         help=f"images per evaluation, with --evaluate-ref (default: {NUM_SAMPLES})")
    flag("--sample-flags", metavar='"FLAGS"',
         help="extra sample_ddp.py flags for the evaluation, with --evaluate-ref, e.g. \"--cfg-scale 1 --num-steps "
              "250\"; the study sets --ckpt, --num-samples, --output and --seed itself (default: none)")
    return parser.parse_args(argv)


NUM_SAMPLES = 10_000  # images per evaluation
SAMPLE_OWNED = ("--ckpt", "--num-samples", "--output", "--output-dir", "--seed")  # sample_ddp.py flags the study sets
UNSET = "\0unset"  # a --ckpt no user gives: tells whether --sample-flags holds one


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What decides a run's evaluation besides its checkpoint: the reference (by content), the number of
    samples and the sampling flags as sample_ddp.py's parser reads them."""

    reference: str
    num_samples: int
    sample_flags: tuple[str, ...]
    sampling: dict  # sample_ddp.py's parsed arguments other than the ones the study sets
    reference_sha256: str | None = None  # filled in when the study evaluates (hashing a reference takes a while)

    def record(self, checkpoint_sha256) -> dict:
        return {"checkpoint_sha256": checkpoint_sha256, "reference_sha256": self.reference_sha256,
                "num_samples": self.num_samples, "sampling": self.sampling}


def check_evaluation(args):
    """The Evaluation of --evaluate-ref, --num-samples and --sample-flags, every one checked now (by
    sample_ddp.py's parser and the evaluator's own checks), before anything trains; None without
    --evaluate-ref."""
    if not args.evaluate_ref:
        given = [flag for flag, value in (("--num-samples", args.num_samples), ("--sample-flags", args.sample_flags))
                 if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} set the evaluation of --evaluate-ref, which is not given: "
                            "without it each run's result is its in-training FID")
        return None
    num_samples = NUM_SAMPLES if args.num_samples is None else args.num_samples
    if num_samples <= NEIGHBOURHOOD_SIZE:
        raise UserError(f"--num-samples {num_samples}: the evaluator's precision and recall need more than "
                        f"{NEIGHBOURHOOD_SIZE} samples")
    where = f"--sample-flags {args.sample_flags!r}"
    try:
        flags = tuple(shlex.split(args.sample_flags or ""))
    except ValueError as error:  # shlex: an unclosed quote
        raise UserError(f"{where}: {error}") from None
    try:
        parsed = sample_ddp.parse_args(["--ckpt", UNSET, *flags])
        sample_ddp.resolve_settings(argparse.Namespace(**{**vars(parsed), "num_samples": num_samples}))
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    owned = [flag for flag, given in zip(SAMPLE_OWNED, (
        parsed.ckpt != UNSET, parsed.num_samples is not None, parsed.output is not None,
        parsed.output_dir != sample_ddp.DEFAULT_OUTPUT_DIR, parsed.seed != 0)) if given]
    if owned:
        raise UserError(f"{where}: {', '.join(owned)} is set by the study itself (--num-samples is the study's own "
                        "flag; each run samples with its seed)")
    # The evaluator's own checks of its arguments and of the reference (images, statistics, weights).
    reference_args = evaluator.parse_args([args.evaluate_ref, "samples.npz", "--num-samples", str(num_samples)])
    reference_args.sample_batch = None
    evaluator.open_inputs(reference_args)
    sampling = {key: value for key, value in sorted(vars(parsed).items())
                if key not in ("ckpt", "num_samples", "output", "output_dir", "seed")}
    return Evaluation(args.evaluate_ref, num_samples, flags, sampling)


def content_sha256(path) -> str:
    """sha256 of a file, or of a folder's image files (the ones the evaluator reads) by name and content."""
    path = Path(path)
    if path.is_file():
        return store.sha256_file(path)
    digest = hashlib.sha256()
    for file in open_images(path).files:
        digest.update(f"{file.name}\0{store.sha256_file(file)}\n".encode())
    return digest.hexdigest()


def checkpoint_sha256(path) -> str:
    """A training checkpoint's identity by content: the digest it carries (sample_ddp.py verifies it before
    sampling), else the file's sha256."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    digest = state.get(DIGEST_KEY) if isinstance(state, dict) else None
    return digest if isinstance(digest, str) else store.sha256_file(path)


def final_checkpoint(run) -> Path:
    return checkpoint_path(run.run_dir / "checkpoints", run.max_steps)


def command(launcher, run) -> str:
    return f"{launcher} train.py {shlex.join(run.argv)}"


def evaluate(run, evaluation) -> Path:
    """The ADM metrics file of NUM_SAMPLES images from the run's final checkpoint. Its directory is keyed
    by everything that decides it (evaluation.json records what), so other settings never reuse it; an
    interrupted evaluation resumes there."""
    ckpt = final_checkpoint(run)
    record = evaluation.record(checkpoint_sha256(ckpt))
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    out = evaluation_dir(run, key)
    recorded = out / "evaluation.json"
    if recorded.is_file():
        saved = store.read_json(recorded)
        if {name: saved.get(name) for name in record} != json.loads(json.dumps(record)):
            raise UserError(f"{recorded} records another evaluation than its key says; delete {out} to evaluate anew")
    metrics = out / "metrics.json"
    if metrics.is_file():
        return metrics
    older = out.parent / "metrics.json"  # the layout before evaluations were keyed: nothing says what made it
    if older.is_file():
        print(f"note: {older} does not record its reference, sample count and flags, so it cannot stand for this "
              f"evaluation; {run.setting} seed {run.seed} is evaluated anew into {out} (the old files stay)")
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps({**record, "reference": evaluation.reference,
                                    "sample_flags": shlex.join(evaluation.sample_flags)}, indent=2) + "\n")
    samples = out / "samples.npz"
    sample_ddp.main([*evaluation.sample_flags, "--ckpt", str(ckpt), "--num-samples", str(evaluation.num_samples),
                     "--output", str(samples), "--seed", str(run.seed)])
    evaluator.main([evaluation.reference, str(samples), "--num-samples", str(evaluation.num_samples),
                    "--output-json", str(metrics)])
    return metrics


def report(study, runs, metrics_files=None, evaluation=None):
    results, notes = collect(runs, metrics_files)
    if evaluation is not None:
        notes.append(f"results: the evaluator's metrics of {evaluation.num_samples} samples from each run's final "
                     f"EMA (sample flags: {shlex.join(evaluation.sample_flags) or 'none'}) against "
                     f"{evaluation.reference} (sha256 {evaluation.reference_sha256[:12]})")
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
    evaluation = check_evaluation(args)
    check_recorded(runs, study.data_dir, training_fid=evaluation is None)  # runs made with other flags
    if args.dry_run or args.print_commands:
        for run in runs:
            if args.print_commands:
                if not run.done:
                    print(command(args.launcher, run))
                continue
            state = "done" if run.done else f"at step {run.finished_step()} of {run.max_steps}"
            print(f"{run.setting} seed {run.seed}: {state}\n  {command(args.launcher, run)}")
        return {"study": study, "runs": runs}
    if evaluation is not None:
        for run in runs:
            if run.done and not final_checkpoint(run).is_file():
                raise UserError(f"setting {run.setting!r} seed {run.seed}: no checkpoint of step {run.max_steps} to "
                                f"evaluate in {final_checkpoint(run).parent} (it trained to step "
                                f"{run.finished_step()}); give the --max-steps it trained to")
        evaluation = dataclasses.replace(evaluation, reference_sha256=content_sha256(evaluation.reference))
    if not args.report_only:
        for index, run in enumerate(runs, start=1):
            if run.done:
                print(f"[{index}/{len(runs)}] {run.setting} seed {run.seed}: done")
                continue
            print(f"[{index}/{len(runs)}] {run.setting} seed {run.seed}: {command(sys.executable, run)}", flush=True)
            train.main(list(run.argv))
    metrics_files = None
    if evaluation is not None:
        metrics_files = {(run.setting, run.seed): evaluate(run, evaluation) for run in runs if run.done}
    study.directory.mkdir(parents=True, exist_ok=True)
    (study.directory / "study.json").write_text(json.dumps({
        "name": study.name, "data_dir": study.data_dir, "seeds": list(study.seeds), "common": shlex.join(study.common),
        "settings": {key: shlex.join(flags) for key, flags in study.settings.items()}, "baseline": study.baseline,
    }, indent=2) + "\n")
    return {"study": study, "runs": runs, "rows": report(study, runs, metrics_files, evaluation)}


if __name__ == "__main__":
    run_cli(main)
