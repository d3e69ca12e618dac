"""python -m analysis.curves RUN_DIR [RUN_DIR ...] [--output results/curves.png] [--labels A B ...] [--metric fid10000]

FID against training time and against training step for your own train.py runs (the paper's Figures 4
and 6): one PNG with two panels, and a CSV beside it (same stem) with one row per (run, FID point).

The FID points are the lines `train.py --eval-every` wrote to RUN_DIR/metrics.jsonl, {"step", "fid<K>",
"train_time_s"}. The time is train.py's own clock: training only (no checkpoints, sample grids or FID
evaluation), kept across resumes. A run from before train.py logged it gets the sum over its training
lines of (step - previous step) x step_time_s instead, marked "derived" in the CSV's time_source column.
A mistake (a missing run, a malformed line, runs with different FID metrics) ends the command with one
line, `error: ...`, and exit status 2.
"""
import argparse
import csv
import json
import math
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from errors import ArgumentParser, UserError, run_cli

DEFAULT_OUTPUT = Path("results") / "curves.png"
FID_KEY = re.compile(r"^fid(\d+)$")  # train.py's FID lines: fid<K>, K = the number of samples
LOG_SCALE_SPAN = 3  # a log FID axis once its largest value is more than this factor above the smallest
CSV_COLUMNS = ("run", "label", "method", "model", "step", "train_time_s", "time_source", "metric", "value")
UNKNOWN = "unknown"  # what config.json does not say
SECONDS_PER_HOUR = 3600
PANEL_INCHES = (5.0, 3.8)  # width, height of one panel
DPI = 120
MARKERS = ("o", "s", "^", "D", "v", "P")  # cycled with the colours, so overlapping runs stay apart


def read_metrics(run_dir: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each line of run_dir/metrics.jsonl. Steps never decrease: a resumed run
    rewrites the lines after its checkpoint, and an FID line follows the training line of its step."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: not a train.py run directory")
    lines, previous_step = [], 0
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: malformed JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(line, dict) or not isinstance(line.get("step"), int):
            raise UserError(f"{path} line {number}: not a JSON object with an integer step")
        not_numbers = [key for key in line if FID_KEY.match(key) and not isinstance(line[key], (int, float))]
        if not_numbers:
            raise UserError(f"{path} line {number}: {', '.join(not_numbers)} is not a number")
        if line["step"] < previous_step:
            raise UserError(f"{path} line {number}: step {line['step']} comes after step {previous_step}; "
                            "train.py writes increasing steps, so the file was edited or joined from two runs")
        previous_step = line["step"]
        lines.append((number, line))
    return lines


def fid_metrics(lines) -> list[str]:
    """The FID keys of a run's lines, by sample count: ["fid10000", "fid50000"]."""
    keys = {key for _, line in lines for key in line if FID_KEY.match(key)}
    return sorted(keys, key=lambda key: int(FID_KEY.match(key)[1]))


def choose_metric(metrics_per_run: dict, metric=None) -> str:
    """`metric` if every run has it, else the one FID key all runs share; refused when there is none."""
    found = "; ".join(f"{run}: {', '.join(keys)}" for run, keys in metrics_per_run.items())
    if metric is not None:
        if not FID_KEY.match(metric):
            raise UserError(f"--metric {metric!r} is not an FID key fid<K> (the runs have {found})")
        lacking = [run for run, keys in metrics_per_run.items() if metric not in keys]
        if lacking:
            raise UserError(f"--metric {metric}: {', '.join(lacking)} logged none (the runs have {found})")
        return metric
    every_key = {key for keys in metrics_per_run.values() for key in keys}
    if len(every_key) > 1:
        raise UserError(f"the runs log more than one FID metric ({found}); choose one with --metric")
    return every_key.pop()


def fid_times(lines, metric, path) -> tuple[list[float], str]:
    """The training seconds at each `metric` line, and whether train.py logged them or they are derived."""
    timed = [line for _, line in lines if "loss" in line or metric in line]
    # One clock per run: a run with the logged clock missing from any line is derived throughout.
    if all("train_time_s" in line for line in timed):
        return [line["train_time_s"] for line in timed if metric in line], "logged"
    # train.py adds a log window's seconds to its clock at each training line, so an FID line reads the
    # clock as the last training line at or before its step left it.
    elapsed, previous_step, times = 0.0, 0, []
    for number, line in lines:
        if metric in line:
            times.append(elapsed)
        elif "loss" in line:
            if "step_time_s" not in line:
                raise UserError(f"{path} line {number}: a training line without step_time_s in a run that did not "
                                "log train_time_s on every line; the training time cannot be derived")
            elapsed += (line["step"] - previous_step) * line["step_time_s"]
            previous_step = line["step"]
    return times, "derived"


def run_description(run_dir: Path) -> tuple[str, str]:
    """(guidance method, model) as run_dir/config.json records them: nested as train.py writes it now, or
    flat as before guidance methods (model at the top, sra "on"/"off"). UNKNOWN where it does not say."""
    path = run_dir / "config.json"
    if not path.is_file():
        return UNKNOWN, UNKNOWN
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} line {error.lineno}: malformed JSON ({error.msg})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    model, guidance = config.get("model"), config.get("guidance")
    if isinstance(model, dict):
        method = guidance.get("method", UNKNOWN) if isinstance(guidance, dict) else UNKNOWN
        return method, model.get("model", UNKNOWN)
    return {"on": "sra", "off": "none"}.get(config.get("sra"), UNKNOWN), model or UNKNOWN


def read_curves(run_dirs, metric=None, labels=None) -> list[dict]:
    """One row (CSV_COLUMNS) per (run, FID point), runs in the order given, steps increasing.

    metric: the FID key to read, e.g. "fid10000"; needed only when the runs log more than one.
    labels: one per run; default "<run directory name> (<method>, <model>)"."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if not run_dirs:
        raise UserError("no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"--labels gives {len(labels)} labels for {len(run_dirs)} runs")
    resolved = [run_dir.resolve() for run_dir in run_dirs]
    repeated = [str(run_dir) for run_dir, path in zip(run_dirs, resolved) if resolved.count(path) > 1]
    if repeated:
        raise UserError(f"run directories given more than once: {', '.join(repeated)}")
    lines_per_run = {str(run_dir): read_metrics(run_dir) for run_dir in run_dirs}
    metrics_per_run = {run: fid_metrics(lines) for run, lines in lines_per_run.items()}
    for run, keys in metrics_per_run.items():
        if not keys:
            raise UserError(f"{Path(run) / 'metrics.jsonl'} has no FID lines (fid<K>); train with "
                            "--eval-every N --eval-ref REF to log them")
    metric = choose_metric(metrics_per_run, metric)

    rows = []
    for index, (run_dir, path) in enumerate(zip(run_dirs, resolved)):
        lines = lines_per_run[str(run_dir)]
        method, model = run_description(run_dir)
        label = labels[index] if labels is not None else f"{path.name} ({method}, {model})"
        times, time_source = fid_times(lines, metric, run_dir / "metrics.jsonl")
        fid_lines = [line for _, line in lines if metric in line]
        rows += [{"run": str(run_dir), "label": label, "method": method, "model": model, "step": line["step"],
                  "train_time_s": seconds, "time_source": time_source, "metric": metric, "value": line[metric]}
                 for line, seconds in zip(fid_lines, times)]
    return rows


def metric_name(metric: str) -> str:
    """fid10000 -> FID-10K, fid150 -> FID-150."""
    samples = int(FID_KEY.match(metric)[1])
    return f"FID-{samples // 1000}K" if samples % 1000 == 0 else f"FID-{samples}"


def plot_curves(rows, path) -> Figure:
    """The PNG: FID against training hours (left) and against step (right), one line per run. Returns
    the figure, already saved."""
    figure = Figure(figsize=(2 * PANEL_INCHES[0], PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    time_axes, step_axes = figure.subplots(1, 2, sharey=True)
    runs = list(dict.fromkeys(row["run"] for row in rows))
    for index, run in enumerate(runs):
        points = [row for row in rows if row["run"] == run]
        style = {"marker": MARKERS[index % len(MARKERS)], "color": f"C{index % 10}", "label": points[0]["label"]}
        values = [point["value"] for point in points]
        time_axes.plot([point["train_time_s"] / SECONDS_PER_HOUR for point in points], values, **style)
        step_axes.plot([point["step"] for point in points], values, **style)

    name = metric_name(rows[0]["metric"])
    values = [row["value"] for row in rows if math.isfinite(row["value"])]
    log_scale = bool(values) and min(values) > 0 and max(values) > LOG_SCALE_SPAN * min(values)
    if log_scale:
        time_axes.set_yscale("log")  # the axes share y, so both panels
    time_axes.set_ylabel(f"{name} (log scale)" if log_scale else name)
    derived = len({row["run"] for row in rows if row["time_source"] == "derived"})
    note = f"\n({derived} of {len(runs)} runs: derived from step_time_s)" if derived else ""
    time_axes.set_xlabel(f"training wall-clock hours{note}")
    step_axes.set_xlabel("training step")
    for axes in (time_axes, step_axes):
        axes.grid(alpha=0.3, which="both")
    step_axes.legend(fontsize="small")
    figure.suptitle(f"{name} during training")
    figure.savefig(path)
    return figure


def write_csv(rows, path):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def make_curves(run_dirs, output=DEFAULT_OUTPUT, metric=None, labels=None) -> list[dict]:
    """read_curves, then the PNG at `output` and the CSV beside it (same stem); returns the rows."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise UserError(f"--output {output}: the figure is a PNG; give a path ending in .png")
    rows = read_curves(run_dirs, metric, labels)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--output {output}: cannot create {output.parent} ({error.strerror})") from None
    plot_curves(rows, output)
    write_csv(rows, output.with_suffix(".csv"))
    return rows


def parse_args(argv):
    parser = ArgumentParser(prog="python -m analysis.curves", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="train.py run directory (results/<run>)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="the PNG; the CSV goes beside it with the same stem (default: %(default)s)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="legend entry per run (default: <run directory name> (<method>, <model>))")
    parser.add_argument("--metric", metavar="fid<K>",
                        help="the FID key to plot, e.g. fid10000; needed when the runs log more than one "
                             "(default: the one FID key all runs log)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = make_curves(args.run_dirs, args.output, args.metric, args.labels)
    print(f"wrote {args.output} and {args.output.with_suffix('.csv')} ({len(rows)} FID points, {rows[0]['metric']})")
    return rows


if __name__ == "__main__":
    run_cli(main)
