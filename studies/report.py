"""A study's results: one value per run and metric, the table over seeds, and the curves with bands."""
import csv
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.curves import FID_KEY, metric_name, read_curves
from errors import UserError

from .stats import ALPHA, CONFIDENCE, compare, summarize

EVALUATOR_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")  # evaluations.evaluator's
LOWER_IS_BETTER = {"fid", "sfid"}
SECONDS_PER_HOUR = 3600
DPI = 120


def evaluation_dir(run, key) -> Path:
    """Where the evaluation `key` (a digest of everything that decides it: the checkpoint, the reference,
    the number of samples and the sampling flags) of the run's final checkpoint is kept."""
    return run.run_dir / "eval" / f"step_{run.max_steps:07d}" / key


def run_values(run, metrics_file=None) -> dict:
    """{metric: value} for a finished run: the evaluator's metrics in `metrics_file` when the study
    evaluates (--evaluate-ref), else the in-training FID logged at its last step; {} when there is none yet."""
    if metrics_file is not None:
        if not Path(metrics_file).is_file():
            return {}
        saved = json.loads(Path(metrics_file).read_text())
        return {key: saved[key] for key in EVALUATOR_METRICS if saved.get(key) is not None}
    metrics = run.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return {}
    values = {}
    for text in metrics.read_text().splitlines():
        line = json.loads(text) if text.strip() else {}
        if line.get("step") == run.max_steps:
            values.update({key: value for key, value in line.items() if FID_KEY.match(key)})
    return values


def collect(runs, metrics_files=None) -> tuple[dict, list[str]]:
    """({setting: {metric: [value per seed]}}, notes on runs without results). `metrics_files`
    ({(setting, seed): path}, with --evaluate-ref): the evaluator's metrics of each evaluated run; the
    in-training FID is used only without it."""
    table, notes = {}, []
    for run in runs:
        if metrics_files is None:
            values = run_values(run)
        else:
            metrics_file = metrics_files.get((run.setting, run.seed))
            values = run_values(run, metrics_file) if metrics_file is not None else {}
        if not values:
            why = ("unfinished" if not run.done else "not evaluated" if metrics_files is not None
                   else "no FID logged: train with --eval-every")
            notes.append(f"{run.setting} seed {run.seed}: no result at step {run.max_steps} yet ({why})")
        for metric, value in values.items():
            table.setdefault(run.setting, {}).setdefault(metric, []).append(value)
    return table, notes


def _fmt(value, digits=2):
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_rows(results: dict, settings, baseline=None) -> list[dict]:
    """One row per (setting, metric): n, mean, std, 95 % interval, difference from the baseline, test."""
    rows = []
    for setting in settings:
        for metric, values in results.get(setting, {}).items():
            summary = summarize(values)
            row = {"setting": setting, "metric": metric, "n": summary.n, "mean": summary.mean, "std": summary.std,
                   "ci_low": summary.interval[0], "ci_high": summary.interval[1], "values": values,
                   "vs_baseline": None, "p_value": None, "verdict": ""}
            if baseline is not None and setting != baseline and metric in results.get(baseline, {}):
                comparison = compare(values, results[baseline][metric])
                row.update(vs_baseline=comparison.difference, p_value=comparison.p_value,
                           verdict=comparison.verdict())
            elif setting == baseline:
                row["verdict"] = "baseline"
            rows.append(row)
    return rows


def markdown_table(rows, baseline=None) -> str:
    """The paper's layout: a row per setting, a column block per metric (mean ± std, 95 % interval)."""
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    by_key = {(row["setting"], row["metric"]): row for row in rows}
    head = ["setting", "seeds"]
    for metric in metrics:
        label = metric_name(metric) if FID_KEY.match(metric) else metric
        head += [f"{label} mean ± std", f"{int(CONFIDENCE * 100)} % interval"]
        if baseline is not None:
            head += [f"Δ vs {baseline}", f"differs? (Welch, α = {ALPHA})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in settings:
        cells = [setting, str(max(by_key[(setting, m)]["n"] for m in metrics if (setting, m) in by_key))]
        for metric in metrics:
            row = by_key.get((setting, metric))
            if row is None:
                cells += ["—", "—"] + (["—", "—"] if baseline is not None else [])
                continue
            cells += [f"{_fmt(row['mean'])} ± {_fmt(row['std'])}", f"[{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]"]
            if baseline is not None:
                delta = row["vs_baseline"]
                cells += ["—" if delta is None else f"{delta:+.2f}", row["verdict"] or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table_csv(rows, path):
    columns = ("setting", "metric", "n", "mean", "std", "ci_low", "ci_high", "vs_baseline", "p_value", "verdict",
               "values")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row[k] for k in columns}, "values": " ".join(f"{v:.6g}" for v in row["values"])})


def curve_bands(runs, metric=None) -> list[dict]:
    """Per setting and FID step: the mean and std over the seeds that logged it, and the mean training hours."""
    with_fid = [run for run in runs if (run.run_dir / "metrics.jsonl").is_file()
                and '"fid' in (run.run_dir / "metrics.jsonl").read_text()]
    if not with_fid:
        return []
    try:
        points = read_curves([run.run_dir for run in with_fid], metric,
                             labels=[f"{run.setting}/seed{run.seed}" for run in with_fid])
    except UserError:
        return []  # no FID lines (yet): the table says so
    grouped = {}
    for run, point_run in ((run, str(run.run_dir)) for run in with_fid):
        for point in points:
            if point["run"] == point_run:
                grouped.setdefault((run.setting, point["step"]), []).append(point)
    bands = []
    for (setting, step), group in grouped.items():
        summary = summarize([p["value"] for p in group])
        hours = sum(p["train_time_s"] for p in group) / len(group) / SECONDS_PER_HOUR
        bands.append({"setting": setting, "step": step, "hours": hours, "metric": group[0]["metric"], "n": summary.n,
                      "mean": summary.mean, "std": summary.std})
    return sorted(bands, key=lambda b: (list(dict.fromkeys(r.setting for r in runs)).index(b["setting"]), b["step"]))


def plot_bands(bands, path):
    """FID against step and against training hours: the mean over seeds, ± one std shaded."""
    figure = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for setting in dict.fromkeys(b["setting"] for b in bands):
        points = [b for b in bands if b["setting"] == setting]
        mean = [b["mean"] for b in points]
        spread = [0.0 if math.isnan(b["std"]) else b["std"] for b in points]
        for ax, x in zip(axes, ([b["step"] for b in points], [b["hours"] for b in points])):
            line, = ax.plot(x, mean, marker="o", label=f"{setting} (n = {max(b['n'] for b in points)})")
            ax.fill_between(x, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                            color=line.get_color(), alpha=0.2)
    label = metric_name(bands[0]["metric"])
    axes[0].set(xlabel="training step", ylabel=f"{label} (mean ± std over seeds)")
    axes[1].set(xlabel="training time (hours, mean over seeds)", ylabel=label)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)


def write_bands_csv(bands, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("setting", "step", "hours", "metric", "n", "mean", "std"))
        writer.writeheader()
        writer.writerows(bands)
