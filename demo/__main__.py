"""python -m demo [--output-dir results/demo] [--steps N] [--samples N] ...   (what `make demo` runs)

The whole pipeline on the built-in shapes dataset (demo/dataset.py), on CPU: data → preprocessing →
reference statistics → train the baseline → train SRA → sample both → evaluate both → classify both's
samples → probe both → report.md. It took 9.5 min wall (17.6 min CPU) on 2 cores at load 1.5-2.0; a
busy machine takes longer (README, "Time"). Every stage but the classifier (demo/classifier.py, a few
seconds) calls one of the project's entry points with the arguments of the command it prints (python -m
preprocessing, train.py --preset demo, sample_ddp.py, python -m evaluations.evaluator, python -m analysis),
so the demo is the README's workflow at toy size. The two runs share the seed, the data order and the budget; only
--guidance differs. Each stage's wall time, CPU time and load average go to stages.json and the report.

Rerunning the same command reuses every finished stage and resumes an interrupted training run from
its last checkpoint; the output says which.
"""
import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import configs
import models
import sample_ddp
import train
from analysis.__main__ import main as analyze
from demo import classifier, dataset, report
from demo.paths import RUNS, DemoPaths
from errors import ArgumentParser, UserError, check_output_dir, run_cli
from evaluations import evaluator
from evaluations.inception import default_weights_path, verify_weights_file
from preprocessing.__main__ import main as preprocess
from training.checkpoints import list_checkpoints

PRESET = configs.PRESETS["demo"]
DEFAULT_OUTPUT_DIR = "results/demo"  # results/ is git-ignored
IMAGES_PER_CLASS = 100  # 1,000 training images
REFERENCE_IMAGES = PRESET["eval_samples"]  # held-out images behind FID, as many as samples
SEED = 0  # training seed of both runs, and the sampling seed
MIN_REFERENCE_IMAGES = 4  # the evaluator's precision/recall needs more than k = 3 reference images
SAMPLER = "sde"  # the flow objective's default, the one train.py's FID uses: the FIDs compare
SAMPLE_BATCH_SIZE = 100  # sample_ddp.py images per batch (memory and speed only)
INCEPTION_BATCH_SIZE = 50  # evaluator images per Inception forward (memory and speed only)
PROBE_TIMES = (0.0, 0.25, 0.5)  # noise levels, 0 = clean (the paper's Figure 7 probes several)
PROBE_WEIGHTS = "ema"  # the weights that are sampled (in the SRA run, also its teacher)
# The paper's probe trains 80 epochs at batch 4096 on ImageNet; 900 features need smaller batches.
PROBE_EPOCHS = 40
PROBE_BATCH_SIZE = 256
# Checkpoints kept per run: the newest, which resumes an interrupted run and is the one sampled and probed.
KEEP_LAST = 1


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m demo", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
         help="everything the demo writes goes here (default: %(default)s)")
    flag("--steps", type=int, default=PRESET["max_steps"], metavar="N",
         help="training steps of each run (default: %(default)s)")
    flag("--batch-size", type=int, default=PRESET["global_batch_size"], metavar="N",
         help="images per training step (default: %(default)s)")
    flag("--fid-every", type=int, metavar="N",
         help="FID during training every N steps; 0: only the final FID (default: half of --steps)")
    flag("--samples", type=int, default=PRESET["eval_samples"], metavar="N",
         help="N of every FID-N, samples per run (default: %(default)s)")
    flag("--reference-images", type=int, default=REFERENCE_IMAGES, metavar="N",
         help=f"held-out images behind FID, a multiple of {dataset.NUM_CLASSES} (default: %(default)s)")
    flag("--images-per-class", type=int, default=IMAGES_PER_CLASS, metavar="N",
         help="training images per class (default: %(default)s)")
    flag("--sampling-steps", type=int, default=PRESET["eval_steps"], metavar="N",
         help="SDE steps of every sample (default: %(default)s)")
    flag("--probe-epochs", type=int, default=PROBE_EPOCHS, metavar="N",
         help="linear-probe training epochs (default: %(default)s)")
    flag("--seed", type=int, default=SEED,
         help="training seed of both runs, and the sampling seed (default: %(default)s)")
    return parser.parse_args(argv)


def resolve_settings(args) -> dict:
    """Everything that decides the demo's outputs, checked before any work."""
    settings = {
        "images_per_class": args.images_per_class, "resolution": dataset.RESOLUTION,
        "dataset_seed": dataset.DEFAULT_SEED, "steps": args.steps, "batch_size": args.batch_size,
        "fid_every": args.steps // 2 if args.fid_every is None else args.fid_every,
        "samples": args.samples, "reference_images": args.reference_images,
        "sampling_steps": args.sampling_steps, "probe_epochs": args.probe_epochs, "seed": args.seed,
    }
    minimums = {"steps": 1, "batch_size": 1, "fid_every": 0, "samples": 2, "sampling_steps": 1,
                "probe_epochs": 1, "seed": 0, "reference_images": MIN_REFERENCE_IMAGES,
                "images_per_class": 2}  # the probe holds out 10% of the images: 2 or more
    for key, minimum in minimums.items():
        if settings[key] < minimum:
            flag = f"--{key.replace('_', '-')}"
            raise UserError(f"{flag} must be at least {minimum}, got {settings[key]}")
    if settings["reference_images"] % dataset.NUM_CLASSES:
        raise UserError(f"--reference-images must be a multiple of {dataset.NUM_CLASSES} "
                         f"(the same number per class), got {settings['reference_images']}")
    return settings


def claim_output_dir(paths: DemoPaths, settings: dict) -> None:
    """Record the settings in a new output directory, or check that an existing one used the same."""
    check_output_dir(paths.root, "--output-dir")
    if paths.settings.is_file():
        saved = json.loads(paths.settings.read_text())
        changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)} -> {settings.get(key)}" for key in changed)
            raise UserError(f"{paths.root} holds a demo made with other settings ({details}); "
                             "pass another --output-dir, or delete it to start over")
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.settings.write_text(json.dumps(settings, indent=2) + "\n")


def cpu_seconds():
    """CPU time of this process (all its threads) and of its finished child processes, in seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Stages:
    """Numbered stage headers, and each stage's wall time, CPU time and load average kept in stages.json,
    so that a rerun which reuses a stage still reports what it cost and under which load."""

    def __init__(self, path: Path, count: int):
        self.path, self.count, self.index = path, count, 0
        saved = json.loads(path.read_text()) if path.is_file() else {}
        # stages.json of an older demo held the wall seconds alone
        self.records = {name: record if isinstance(record, dict) else {"wall_s": record}
                        for name, record in saved.items()}
        self.reused = []

    def start(self, title):
        self.index += 1
        print(f"\n[{self.index}/{self.count}] {title}", flush=True)

    def reuse(self, name, what):
        self.reused.append(name)
        print(f"  reusing {what}", flush=True)

    @contextlib.contextmanager
    def work(self, name, resumed=False):
        """Time the block; a resumed stage adds to what its earlier parts took, and keeps their loads."""
        load_start, wall_start, cpu_start = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
        yield
        wall, cpu, load_end = time.perf_counter() - wall_start, cpu_seconds() - cpu_start, os.getloadavg()[0]
        earlier = self.records.get(name, {}) if resumed else {}
        earlier_cpu = earlier.get("cpu_s", None if earlier else 0.0)  # None: an older demo did not measure it
        self.records[name] = {
            "wall_s": earlier.get("wall_s", 0.0) + wall,
            "cpu_s": None if earlier_cpu is None else earlier_cpu + cpu,
            # the 1-minute load average at the start and the end of each part of the stage
            "load_1min": [*earlier.get("load_1min", []), [load_start, load_end]],
        }
        self.path.write_text(json.dumps(self.records, indent=2) + "\n")
        print(f"  {name}: {report.format_duration(wall)} wall, {report.format_duration(cpu)} CPU; "
              f"load average {load_start:.1f} at the start, {load_end:.1f} at the end", flush=True)


def call(command, entry_point, argv):
    """Print the equivalent shell command, then run the entry point's main in this process."""
    print(f"  $ {command} {shlex.join(argv)}", flush=True)
    return entry_point(argv)


# --- stages ------------------------------------------------------------------------------------

def make_images(paths: DemoPaths, settings, stages):
    stages.start(f"data: {dataset.NUM_CLASSES} classes × {settings['images_per_class']} shapes images "
                 f"({settings['resolution']}×{settings['resolution']}, demo/dataset.py)")
    if paths.images.is_dir():
        return stages.reuse("data", paths.images)
    partial = paths.images.with_name(paths.images.name + ".partial")  # renamed when complete
    shutil.rmtree(partial, ignore_errors=True)
    total = dataset.NUM_CLASSES * settings["images_per_class"]
    with stages.work("data"), tqdm(total=total, desc="drawing", unit="img") as progress:
        dataset.write_image_folder(partial, settings["images_per_class"], settings["dataset_seed"],
                                   settings["resolution"], progress=lambda _: progress.update())
        partial.rename(paths.images)


def preprocess_images(paths: DemoPaths, settings, stages):
    stages.start("preprocessing: the image folder into the training format (pixel space, --vae none)")
    if paths.dataset_index.is_file():
        return stages.reuse("preprocessing", paths.dataset)
    argv = ["--input", str(paths.images), "--output", str(paths.dataset), "--vae", "none",
            "--resolution", str(settings["resolution"]), "--num-workers", "0"]
    with stages.work("preprocessing"):
        call("python -m preprocessing", preprocess, argv)


def make_reference(paths: DemoPaths, settings, stages):
    stages.start(f"reference: {settings['reference_images']} held-out images and their Inception statistics")
    if paths.reference_images.is_file():
        stages.reuse("reference images", paths.reference_images)
    else:
        with stages.work("reference images"):
            # Images the training folder does not hold: indices after the training ones, per class.
            images, labels = dataset.draw_many(settings["reference_images"] // dataset.NUM_CLASSES,
                                               settings["dataset_seed"], settings["resolution"],
                                               start=settings["images_per_class"])
            save_npz_atomic(paths.reference_images, arr_0=images, labels=labels)
    if len(segment_ends(settings["steps"], settings["fid_every"])) == 1:
        print("  no FID during training (--fid-every), so train.py needs no statistics file")
    elif paths.reference_stats.is_file():
        stages.reuse("reference statistics", paths.reference_stats)
    else:
        argv = [str(paths.reference_images), "--save-ref-stats", str(paths.reference_stats),
                "--batch-size", str(INCEPTION_BATCH_SIZE)]
        with stages.work("reference statistics"):
            call("python -m evaluations.evaluator", evaluator.main, argv)


def save_npz_atomic(path: Path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as file:
        np.savez(file, **arrays)
    os.replace(partial, path)


def segment_ends(steps, fid_every):
    """train.py evaluates FID at every multiple of --eval-every and at --max-steps; training in
    segments that each end at one evaluation leaves the final FID to sample_ddp.py + the evaluator."""
    return [*(range(fid_every, steps, fid_every) if fid_every else ()), steps]


def train_argv(paths: DemoPaths, settings, run, end):
    argv = ["--preset", "demo", "--guidance", RUNS[run], "--data-dir", str(paths.dataset),
            "--results-dir", str(paths.runs), "--run-name", run, "--seed", str(settings["seed"]),
            "--max-steps", str(end), "--global-batch-size", str(settings["batch_size"]),
            "--keep-last", str(KEEP_LAST)]
    if end < settings["steps"]:
        argv += ["--eval-every", str(end), "--eval-ref", str(paths.reference_stats),
                 "--eval-samples", str(settings["samples"]), "--eval-steps", str(settings["sampling_steps"])]
    return argv


def last_step(paths: DemoPaths, run):
    found = list_checkpoints(paths.run_dir(run) / "checkpoints")
    return found[-1][0] if found else 0


def train_run(paths: DemoPaths, settings, stages, run):
    stages.start(f"train {run}: {PRESET['model']} with --guidance {RUNS[run]}, {settings['steps']} steps")
    if last_step(paths, run) >= settings["steps"]:
        return stages.reuse(f"train {run}", f"{paths.run_dir(run)} (step {settings['steps']} reached)")
    for end in segment_ends(settings["steps"], settings["fid_every"]):
        done = last_step(paths, run)
        if done >= end:
            continue
        fid_note = f", then FID-{settings['samples']}" if end < settings["steps"] else ""
        action = f"resuming from step {done}" if done else "training"
        print(f"  {action} up to step {end}{fid_note}", flush=True)
        with stages.work(f"train {run}", resumed=done > 0):
            call("python train.py", train.main, train_argv(paths, settings, run, end))


def sample_run(paths: DemoPaths, settings, stages, run):
    stages.start(f"sample {run}: {settings['samples']} images, EMA weights of step {settings['steps']}")
    if paths.sample_npz(run).is_file():
        return stages.reuse(f"sample {run}", paths.sample_npz(run))
    argv = ["--ckpt", str(paths.checkpoint(run, settings["steps"])), "--vae", "none",
            "--sampler", SAMPLER, "--num-steps", str(settings["sampling_steps"]),
            "--num-samples", str(settings["samples"]), "--per-proc-batch-size", str(SAMPLE_BATCH_SIZE),
            "--seed", str(settings["seed"]), "--output", str(paths.sample_npz(run))]
    with stages.work(f"sample {run}"):
        call("python sample_ddp.py", sample_ddp.main, argv)


def evaluate_run(paths: DemoPaths, settings, stages, run):
    stages.start(f"evaluate {run}: FID-{settings['samples']} against the reference images")
    if paths.sample_metrics(run).is_file():
        return stages.reuse(f"evaluate {run}", paths.sample_metrics(run))
    argv = [str(paths.reference_images), str(paths.sample_npz(run)),
            "--num-samples", str(settings["samples"]), "--batch-size", str(INCEPTION_BATCH_SIZE),
            "--output-json", str(paths.sample_metrics(run))]
    with stages.work(f"evaluate {run}"):
        call("python -m evaluations.evaluator", evaluator.main, argv)


def classify_samples(paths: DemoPaths, settings, stages):
    stages.start("classify: the share of each run's samples a classifier of real images assigns to their class")
    if paths.classifier.is_file():
        return stages.reuse("classify", paths.classifier)
    with stages.work("classify"):
        samples = {}
        for run in RUNS:
            with np.load(paths.sample_npz(run)) as npz:
                samples[run] = (npz["arr_0"], npz["labels"])
        result = classifier.score(settings, samples)
        for kind, what in classifier.VIEWS.items():
            shares = ", ".join(f"{run} {report.format_share(result['runs'][run][kind])}" for run in RUNS)
            print(f"  {what}: held-out real images {report.format_share(result['held_out'][kind])}; "
                  f"samples: {shares}", flush=True)
        partial = paths.classifier.with_name(f".{paths.classifier.name}.partial")  # a finished stage is whole
        partial.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(partial, paths.classifier)


def probe_runs(paths: DemoPaths, settings, stages):
    stages.start("probe: linear probes of both runs' features per block and noise level")
    if (paths.probe / "probe.json").is_file():
        return stages.reuse("probe", paths.probe)
    depth = models.SIZES[models.parse_model_name(PRESET["model"])[1]][0]
    argv = [item for run in RUNS for item in ("--ckpt", f"{run}={paths.checkpoint(run, settings['steps'])}")]
    argv += ["--data-dir", str(paths.dataset), "--weights", PROBE_WEIGHTS,
             "--blocks", *map(str, range(depth + 1)), "--times", *map(str, PROBE_TIMES),
             "--epochs", str(settings["probe_epochs"]), "--probe-batch-size", str(PROBE_BATCH_SIZE),
             "--seed", str(settings["seed"]), "--output-dir", str(paths.probe)]
    with stages.work("probe"):
        call("python -m analysis", analyze, argv)


STAGES_PER_RUN = ("train", "sample", "evaluate")
SHARED_STAGES = ("data", "preprocessing", "reference", "classify", "probe", "report")


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    settings = resolve_settings(args)
    verify_weights_file(default_weights_path())  # the Inception weights, before any work
    paths = DemoPaths(args.output_dir)
    claim_output_dir(paths, settings)
    load_at_start = os.getloadavg()
    stages = Stages(paths.stage_times, count=len(SHARED_STAGES) + len(STAGES_PER_RUN) * len(RUNS))

    make_images(paths, settings, stages)
    preprocess_images(paths, settings, stages)
    make_reference(paths, settings, stages)
    for run in RUNS:
        train_run(paths, settings, stages, run)
    for run in RUNS:
        sample_run(paths, settings, stages, run)
        evaluate_run(paths, settings, stages, run)
    classify_samples(paths, settings, stages)
    probe_runs(paths, settings, stages)

    stages.start("report")
    elapsed = time.perf_counter() - start
    report_path = report.write_report(paths, settings, stages.records, elapsed, stages.reused,
                                      (load_at_start, os.getloadavg()))
    reused = f" (reused from an earlier run: {', '.join(stages.reused)})" if stages.reused else ""
    print(f"\ndemo finished in {report.format_duration(elapsed)}{reused}")
    print(f"report: {report_path}")
    return report_path


if __name__ == "__main__":
    run_cli(main)
