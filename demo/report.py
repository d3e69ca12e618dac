"""The demo's report: report.md with loss.png, fid.png and the sample grids, from the files the
stages left in the output directory (train.py's metrics.jsonl and config.json, the evaluator's JSON,
the samples' .npz, classifier.json, analysis' probe.json and pca.png, stages.json). Rewritten on every
run; it reads, never recomputes."""
import json
import math
import os
import platform
import statistics

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import models
from demo import dataset
from demo.paths import RUNS, DemoPaths

RUN_LABELS = {"baseline": "baseline", "sra": "SRA"}
RUN_COLORS = {"baseline": "tab:blue", "sra": "tab:orange"}
FID_MARKERS = {"train.py": "o", "sample_ddp.py + evaluator": "s"}  # who measured a point
GRID_PER_CLASS = 8  # samples per class row of a grid
GRID_SCALE = 4  # screen pixels per image pixel: 16-pixel images are tiny otherwise
GRID_GAP = 2  # pixels between images, after scaling
FIGURE_INCHES = (10, 3.6)
DPI = 120
CLASSIFIER_VIEWS = ("rgb", "shape")  # demo/classifier.py's VIEWS, in the order of the report's columns
LOAD_CHANGE = 0.5  # a change of the 1-minute load average that the report points out


# --- reading -----------------------------------------------------------------------------------

def read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir):
    """train.py's metrics.jsonl: (loss lines, FID lines {step, fid<K>})."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line], [line for line in lines if "loss" not in line]


def fid_points(fid_lines, final_step, final_metrics):
    """[(step, FID, source)]: train.py's FID-K during training, then the evaluator's at the end."""
    points = [(line["step"], value, "train.py") for line in fid_lines
              for key, value in line.items() if key.startswith("fid")]
    if final_metrics is not None:
        points.append((final_step, final_metrics["fid"], "sample_ddp.py + evaluator"))  # FID_MARKERS keys
    return points


# --- figures -----------------------------------------------------------------------------------

def _figure(panels):
    figure = Figure(figsize=(FIGURE_INCHES[0] * panels / 2, FIGURE_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def plot_losses(loss_lines, path):
    """Generative loss of both runs (left) and SRA's alignment loss (right; the baseline has none)."""
    figure, (gen_axes, align_axes) = _figure(2)
    for run, lines in loss_lines.items():
        steps = [line["step"] for line in lines]
        style = {"color": RUN_COLORS[run], "label": RUN_LABELS[run]}
        gen_axes.plot(steps, [line["gen_loss"] for line in lines], **style)
        if RUNS[run] != "none":
            align_axes.plot(steps, [line["align"] for line in lines], **style)
    gen_axes.set_title("generative loss (flow matching MSE)")
    align_axes.set_title("alignment loss (smooth-L1, before the weight λ)")
    for axes in (gen_axes, align_axes):
        axes.set_xlabel("step")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path)


def plot_fid(points, samples, path):
    """FID against step for every run; the marker says which entry point measured it."""
    figure, (axes,) = _figure(1)
    for run, run_points in points.items():
        axes.plot([step for step, _, _ in run_points], [fid for _, fid, _ in run_points],
                  color=RUN_COLORS[run], label=RUN_LABELS[run])
        for step, fid, source in run_points:
            axes.plot(step, fid, marker=FID_MARKERS[source], color=RUN_COLORS[run])
    for source, marker in FID_MARKERS.items():  # legend entries for the markers alone
        axes.plot([], [], marker=marker, linestyle="none", color="gray", label=source)
    axes.set_title(f"FID-{samples} (lower is better)")
    axes.set_xlabel("step")
    axes.set_ylabel(f"FID-{samples}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path)


def class_grid(images, labels, per_class=GRID_PER_CLASS):
    """One row per class holding its first `per_class` images (gray where a class has fewer):
    uint8 (N, H, W, 3), (N,) -> one uint8 picture, scaled by GRID_SCALE."""
    height, width = images.shape[1:3]
    cell_h, cell_w = height * GRID_SCALE + GRID_GAP, width * GRID_SCALE + GRID_GAP
    grid = np.full((dataset.NUM_CLASSES * cell_h, per_class * cell_w, 3), 255, dtype=np.uint8)
    for label in range(dataset.NUM_CLASSES):
        chosen = images[labels == label][:per_class]
        for column in range(per_class):
            image = chosen[column] if column < len(chosen) else np.full_like(images[0], 128)
            scaled = image.repeat(GRID_SCALE, axis=0).repeat(GRID_SCALE, axis=1)
            top, left = label * cell_h, column * cell_w
            grid[top:top + height * GRID_SCALE, left:left + width * GRID_SCALE] = scaled
    return grid


def save_grid(npz_path, path):
    with np.load(npz_path) as npz:
        Image.fromarray(class_grid(npz["arr_0"], npz["labels"])).save(path)


# --- report.md ---------------------------------------------------------------------------------

def format_duration(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _number(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def _duration(seconds):
    return "—" if seconds is None else format_duration(seconds)


def setup_section(settings, record):
    """record: the SRA run's config.json (sections, see configs/schema.py)."""
    data, objective, optim, sra = record["data"], record["objective"], record["optim"], record["guidance"]
    name = record["model"]["model"]
    model = models.create_model(name, data["input_size"], data["in_channels"], data["num_classes"])
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    images_seen = settings["steps"] * settings["batch_size"]
    train_images = settings["images_per_class"] * dataset.NUM_CLASSES
    return [
        "## Setup", "",
        "| | |", "|---|---|",
        f"| data | built-in shapes (demo/dataset.py): {dataset.NUM_CLASSES} classes, {train_images} training "
        f"images of {settings['resolution']}×{settings['resolution']} px, pixel space |",
        f"| model | {name}: {model.depth} blocks, width {model.hidden_size}, "
        f"{model.num_patches} tokens, {params / 1e6:.2f} M parameters |",
        f"| objective | flow matching ({objective['path']} path, {objective['prediction']} prediction, "
        f"{objective['time_sampling']} t) |",
        f"| training | {settings['steps']} steps × batch {settings['batch_size']} = {images_seen:,} images "
        f"(≈ {images_seen / train_images:.1f} epochs), AdamW lr {optim['lr']:g}, EMA {optim['ema_decay']}, "
        f"seed {settings['seed']} for both runs |",
        f"| SRA | student block {sra['student_depth']} → EMA-teacher block {sra['teacher_depth']}, "
        f"Δ ~ U(0, {sra['t_max']}), "
        f"{sra['align_distance']} (β {sra['smooth_l1_beta']}), λ {sra['align_weight']} |",
        f"| sampling | SDE, {settings['sampling_steps']} steps, no guidance, seed {settings['seed']} |",
        f"| FID | FID-{settings['samples']}: {settings['samples']} samples per run against "
        f"{settings['reference_images']} held-out images of the dataset, ADM Inception (evaluations/) |",
        "",
    ]


def results_section(settings, loss_lines, evaluations, classes):
    """classes: classifier.json (demo/classifier.py), or None before that stage has run."""
    rows = [
        "## Results", "",
        f"| run | steps | final generative loss | final alignment loss | FID-{settings['samples']} | sFID "
        "| precision | recall | samples in their class: colour and shape | samples in their class: shape alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, lines in loss_lines.items():
        last = lines[-1]
        metrics = evaluations[run] or {}
        align = _number(last["align"], 4) if RUNS[run] != "none" else "—"
        shares = [format_share(classes["runs"][run][kind]) if classes else "—" for kind in CLASSIFIER_VIEWS]
        rows.append(
            f"| {RUN_LABELS[run]} | {last['step']} | {last['gen_loss']:.4f} | {align} "
            f"| {_number(metrics.get('fid'))} | {_number(metrics.get('sfid'))} "
            f"| {_number(metrics.get('precision'), 3)} | {_number(metrics.get('recall'), 3)} "
            f"| {' | '.join(shares)} |"
        )
    rows += [
        "",
        f"The final losses are those of the last log window. FID-{settings['samples']} from "
        f"{settings['samples']} samples sits far above FID-50K and moves by a few points between seeds: "
        "compare the two runs with each other, never with a paper. The class shares are explained below.",
        "",
        "![loss curves](loss.png)",
        "",
    ]
    return rows


def format_share(result):
    """classifier.share's {share, stderr, n} as '87.3% ± 2.7% (n = 150)'."""
    return f"{100 * result['share']:.1f}% ± {100 * result['stderr']:.1f}% (n = {result['n']})"


def classifier_section(classes):
    if classes is None:
        return ["## Samples in their class", "", "The classify stage has not finished.", ""]
    views = classes["views"]
    rows = [
        "## Samples in their class", "",
        f"A small CNN trained on the {classes['train_images']} training images (demo/classifier.py, "
        f"{classes['steps']} Adam steps on one CPU thread) names the class of each sample; the share it assigns "
        "to the class the sample was drawn for, ± its binomial standard error √(p(1−p)/n), measures how "
        "recognizable the samples are. Every class has its own hue, so a second classifier sees only "
        "each pixel's brightness (max of R, G, B, the same for every hue) and must recognize the shape. "
        f"Chance is {100 * classes['chance']:.0f}%. The first row is each classifier's own accuracy on "
        f"{classes['held_out_images']} held-out real images (used neither for training nor for FID).", "",
        f"| images | {views['rgb']} | {views['shape']} |", "|---|---|---|",
        f"| held-out real images | {format_share(classes['held_out']['rgb'])} "
        f"| {format_share(classes['held_out']['shape'])} |",
    ]
    for run in RUNS:
        rows.append(f"| {RUN_LABELS[run]} samples | {format_share(classes['runs'][run]['rgb'])} "
                    f"| {format_share(classes['runs'][run]['shape'])} |")
    rows += ["", *difference_lines(classes, views)]
    names = [shape for shape, _ in dataset.CLASSES]
    rows += ["", f"Per class, {views['shape']} (%; — where a run drew no sample of the class):", "",
             "| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for run in RUNS:
        cells = ["—" if value is None else f"{100 * value:.0f}"
                 for value in classes["runs"][run]["shape"]["per_class"]]
        rows.append(f"| {RUN_LABELS[run]} | " + " | ".join(cells) + " |")
    return rows + [""]


SAMPLING_NOISE_Z = 1.96  # a difference beyond 1.96 standard errors: outside the 95 % band of sampling noise


def difference_lines(classes, views):
    """SRA − baseline per classifier against the sampling noise of the two shares (a two-proportion
    z-test). This noise is the samples' only; a second training seed moves the shares too (make study)."""
    lines = []
    for view_name in ("rgb", "shape"):
        sra, base = classes["runs"]["sra"][view_name], classes["runs"]["baseline"][view_name]
        diff = sra["share"] - base["share"]
        stderr = math.hypot(sra["stderr"], base["stderr"])
        within = stderr == 0 or abs(diff) <= SAMPLING_NOISE_Z * stderr
        verdict = ("within the sampling noise" if within else "larger than the sampling noise")
        lines.append(f"- {views[view_name]}: SRA − baseline = {100 * diff:+.1f} points, standard error "
                     f"{100 * stderr:.1f}: {verdict} (|difference| {'≤' if within else '>'} 1.96 standard errors).")
    lines.append("- These errors count the samples' noise only. Training with another seed moves the shares "
                 "too; `make study` (python -m demo.study) measures that spread over seeds and tests the "
                 "difference against it.")
    return lines


def fid_section(points, has_figure):
    rows = ["### FID during training", ""]
    for run, run_points in points.items():
        listed = ", ".join(f"step {step}: {fid:.2f}" for step, fid, _ in run_points)
        rows.append(f"- {RUN_LABELS[run]}: {listed}")
    rows.append("")
    if has_figure:
        rows += ["![FID against step](fid.png)", ""]
    else:
        rows += ["FID was evaluated once per run (--fid-every 0), so there is no fid.png.", ""]
    return rows


def samples_section(settings):
    names = ", ".join(dataset.CLASS_NAMES)
    return [
        "## Samples", "",
        f"One row per class ({names}); each row holds the first {GRID_PER_CLASS} of the "
        f"{settings['samples']} samples with that label (gray: fewer were drawn).", "",
        "| held-out data | baseline | SRA |", "|---|---|---|",
        "| ![reference](samples_reference.png) | ![baseline](samples_baseline.png) "
        "| ![SRA](samples_sra.png) |",
        "",
    ]


def probe_section(probe, has_pca):
    if probe is None:
        return ["## Representation probe", "", "The probe stage has not finished.", ""]
    rows_by_key = {(r["checkpoint"], r["block"], r["t"]): r["top1"] for r in probe["results"]}
    times, blocks = probe["settings"]["times"], probe["settings"]["blocks"]
    header = "| block | " + " | ".join(f"t = {t:g}: baseline | t = {t:g}: SRA" for t in times) + " |"
    rows = [
        "## Representation probe", "",
        "Linear-probe top-1 (%) on held-out images (python -m analysis: EMA weights, tokens mean-pooled, "
        f"null class, {probe['settings']['val_fraction']:.0%} of the dataset held out; t is the noise "
        "level, 0 = clean; block 0 is the embedded input).", "",
        header, "|---" * (1 + 2 * len(times)) + "|",
    ]
    for block in blocks:
        cells = [f"{100 * rows_by_key[(run, block, t)]:.0f}" for t in times for run in RUNS]
        rows.append(f"| {block} | " + " | ".join(cells) + " |")
    n = probe["results"][0]["val_samples"]
    widest = 100 * math.sqrt(0.25 / n)  # the binomial standard error at p = 0.5, its largest
    rows += ["", f"Each cell is a share of n = {n} held-out images, so its binomial standard error "
             f"√(p(1−p)/n) is at most {widest:.0f} points; a difference between the two runs at one cell is "
             f"beyond this sampling noise only above 1.96·√2 standard errors (up to {1.96 * math.sqrt(2) * widest:.0f} "
             "points at p = 0.5). It says nothing of the spread between training seeds (make study).",
             "", "![probe comparison](probe/compare.png)", ""]
    if has_pca:
        rows += [
            "PCA of the block tokens (the paper's Figure 2, left), EMA weights: each row is one held-out image "
            "at one noise level; the first column is the model's input x_t, then one picture per block, "
            "one square per token, coloured by the first three principal components of that block's tokens "
            "(red, green, blue). Tokens of similar colour have similar features; a picture whose colours follow "
            "the shape means the block separates the shape from the background.", "",
            "![PCA of block tokens](probe/pca.png)", "",
        ]
    return rows


def _load_text(parts):
    return "; ".join(f"{start:.1f} → {end:.1f}" for start, end in parts) if parts else "—"


def training_cost_section(settings, stage_records, loss_lines):
    rows = [
        "## Training cost", "",
        "| run | wall time | CPU time | wall s/step | CPU s/step | img/s: median window, fastest window "
        "| load average (1 min) at start → end |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, lines in loss_lines.items():
        record = stage_records.get(f"train {run}", {})
        wall, cpu = record.get("wall_s"), record.get("cpu_s")
        speeds = [line["img_per_s"] for line in lines]
        rows.append(
            f"| {RUN_LABELS[run]} | {_duration(wall)} | {_duration(cpu)} "
            f"| {_number(None if wall is None else wall / settings['steps'])} "
            f"| {_number(None if cpu is None else cpu / settings['steps'])} "
            f"| {statistics.median(speeds):.0f}, {max(speeds):.0f} | {_load_text(record.get('load_1min'))} |"
        )
    loads = [value for run in RUNS for part in stage_records.get(f"train {run}", {}).get("load_1min", [])
             for value in part]
    spread = max(loads) - min(loads) if loads else 0.0
    if spread >= LOAD_CHANGE:
        verdict = (f"The load average changed by {spread:.1f} during the two runs, so neither their wall times nor "
                   "their CPU times compare fairly; the fastest windows come closest.")
    else:
        verdict = f"The load average stayed within {LOAD_CHANGE} during both runs."
    rows += [
        "",
        "Times are each run's whole train.py stage: start-up, checkpoints, sample grids and the FID during "
        "training included (the first run also pays the process's one-time start-up costs); per step is "
        "divided by the steps. img/s is train.py's own, over its log windows of training alone: the median "
        "window, and the fastest, the one least slowed by other programs. Wall time and img/s depend on what "
        "else runs on the machine, and so does CPU time (this process's, all threads): torch's threads keep "
        "their cores busy while they wait for each other, and they wait longer when other programs take the "
        f"cores, so a busy machine inflates CPU time too. {verdict} An SRA step does more work than a "
        "baseline step: the EMA teacher's partial forward.",
        "",
    ]
    return rows


def timing_section(stage_records, elapsed, reused, loads):
    walls = [record["wall_s"] for record in stage_records.values()]
    cpus = [record.get("cpu_s") for record in stage_records.values()]
    cpu_total = _duration(sum(cpus)) if None not in cpus else "—"
    rows = [
        "## Time per stage", "",
        f"Stages together: {format_duration(sum(walls))} wall, {cpu_total} CPU; "
        f"this invocation: {format_duration(elapsed)}"
        + (f" (reused: {', '.join(reused)})" if reused else "") + ".",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}. Each stage's load average is the one measured when it ran; "
        f"this invocation started at {'/'.join(f'{x:.1f}' for x in loads[0])} and ended at "
        f"{'/'.join(f'{x:.1f}' for x in loads[1])} (1/5/15 min). A busy machine makes every stage slower.", "",
        "| stage | wall time | CPU time | load average (1 min) at start → end |", "|---|---|---|---|",
    ]
    rows += [f"| {name} | {_duration(record['wall_s'])} | {_duration(record.get('cpu_s'))} "
             f"| {_load_text(record.get('load_1min'))} |" for name, record in stage_records.items()]
    return rows + [""]


def write_report(paths: DemoPaths, settings, stage_records, elapsed, reused, loads):
    """Figures and report.md in paths.root; returns the report's path."""
    loss_lines, points, evaluations = {}, {}, {}
    for run in RUNS:
        loss_lines[run], fid_lines = read_metrics(paths.run_dir(run))
        evaluations[run] = read_json(paths.sample_metrics(run))
        points[run] = fid_points(fid_lines, settings["steps"], evaluations[run])
        save_grid(paths.sample_npz(run), paths.figure(f"samples_{run}.png"))
    save_grid(paths.reference_images, paths.figure("samples_reference.png"))
    plot_losses(loss_lines, paths.figure("loss.png"))
    has_fid_figure = any(len(run_points) > 1 for run_points in points.values())
    if has_fid_figure:
        plot_fid(points, settings["samples"], paths.figure("fid.png"))
    config = read_json(paths.run_dir("sra") / "config.json")
    classes = read_json(paths.classifier)

    lines = [
        "# SRA demo: baseline vs SRA on the built-in shapes", "",
        "The whole pipeline at toy size (python -m demo): data → preprocessing → reference statistics → "
        "train.py (baseline, then SRA, same seed and budget) → sample_ddp.py → evaluations.evaluator → "
        "a classifier of real images (demo/classifier.py) → python -m analysis → this report.", "",
        *setup_section(settings, config),
        *results_section(settings, loss_lines, evaluations, classes),
        *training_cost_section(settings, stage_records, loss_lines),
        *fid_section(points, has_fid_figure),
        *samples_section(settings),
        *classifier_section(classes),
        *probe_section(read_json(paths.probe / "probe.json"), (paths.probe / "pca.png").is_file()),
        *timing_section(stage_records, elapsed, reused, loads),
    ]
    paths.report.write_text("\n".join(lines))
    return paths.report
