"""FID curves of train.py runs (python -m analysis.curves): the rows read from metrics.jsonl, logged and
derived training times, labels, the figure and CSV, and each user mistake as one line with exit status 2."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from analysis.curves import main, make_curves, plot_curves, read_curves
from errors import EXIT_USER_ERROR, UserError, run_cli
from training.metrics import MetricsLogger

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, lines, config=None) -> str:
    """A run directory as train.py leaves it: config.json (nested, unless given) and metrics.jsonl."""
    run_dir.mkdir(parents=True)
    config = config if config is not None else {
        "preset": None, "model": {"model": "SiT-B/2"}, "optim": {"global_batch_size": 256},
        "guidance": {"method": "sra"}}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(run_dir)


def training_line(step, **values):
    return {"step": step, "loss": 0.5, "gen_loss": 0.4, "img_per_s": 100.0, **values}


# Logged clock (train.py now): FID lines carry train_time_s.
LOGGED_LINES = [
    training_line(100, step_time_s=0.1, train_time_s=10.0),
    training_line(200, step_time_s=0.105, train_time_s=20.5),
    {"step": 200, "fid10000": 40.0, "train_time_s": 20.5},
    training_line(300, step_time_s=0.105, train_time_s=31.0),
    {"step": 300, "fid10000": 33.5, "train_time_s": 31.0},
]
# An older run: no train_time_s anywhere. Derived: 100·0.5 = 50 at step 100, + 100·0.25 = 75 at step 200,
# + 100·0.5 = 125 at step 300; the FID at step 350 reads the clock of step 300 (125), as train.py's would;
# + 100·0.75 = 200 at step 400.
DERIVED_LINES = [
    training_line(100, step_time_s=0.5),
    training_line(200, step_time_s=0.25),
    {"step": 200, "fid10000": 50.0},
    training_line(300, step_time_s=0.5),
    {"step": 350, "fid10000": 45.0},
    training_line(400, step_time_s=0.75),
    {"step": 400, "fid10000": 40.0},
]


@pytest.fixture
def runs(tmp_path):
    sra = write_run(tmp_path / "results" / "sra-run", LOGGED_LINES)
    baseline = write_run(tmp_path / "results" / "baseline", DERIVED_LINES,
                         {"model": {"model": "DiT-XL/2"}, "guidance": {"method": "none"}})
    return sra, baseline


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cli_error(argv, capsys) -> str:
    """The one stderr line of the command run through errors.run_cli (in-process), after exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_csv_rows_with_logged_and_derived_times(runs, tmp_path):
    sra, baseline = runs
    output = tmp_path / "figures" / "fid.png"
    main([sra, baseline, "--output", str(output)])
    common = {"metric": "fid10000"}
    sra_row = {"run": sra, "label": "sra-run (sra, SiT-B/2)", "method": "sra", "model": "SiT-B/2",
               "time_source": "logged", **common}
    base_row = {"run": baseline, "label": "baseline (none, DiT-XL/2)", "method": "none", "model": "DiT-XL/2",
                "time_source": "derived", **common}
    assert read_csv(tmp_path / "figures" / "fid.csv") == [
        {**sra_row, "step": "200", "train_time_s": "20.5", "value": "40.0"},
        {**sra_row, "step": "300", "train_time_s": "31.0", "value": "33.5"},
        {**base_row, "step": "200", "train_time_s": "75.0", "value": "50.0"},
        {**base_row, "step": "350", "train_time_s": "125.0", "value": "45.0"},
        {**base_row, "step": "400", "train_time_s": "200.0", "value": "40.0"},
    ]
    data = output.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(output) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 100


def test_one_missing_train_time_derives_the_whole_run(tmp_path):
    lines = [{**line, "train_time_s": 999.0} for line in DERIVED_LINES]
    del lines[0]["train_time_s"]
    run = write_run(tmp_path / "mixed", lines)
    assert [(row["train_time_s"], row["time_source"]) for row in read_curves([run])] == [
        (75.0, "derived"), (125.0, "derived"), (200.0, "derived")]


def test_labels_from_the_command_line_and_from_old_flat_configs(runs, tmp_path):
    sra, baseline = runs
    assert {row["label"] for row in read_curves([sra, baseline], labels=["SRA", "DiT"])} == {"SRA", "DiT"}
    flat = write_run(tmp_path / "old", DERIVED_LINES, {"model": "SiT-L/2", "sra": "on", "max_steps": 400})
    no_config = write_run(tmp_path / "bare", DERIVED_LINES)
    (Path(no_config) / "config.json").unlink()
    rows = read_curves([flat, no_config])
    assert [row["label"] for row in rows[::3]] == ["old (sra, SiT-L/2)", "bare (unknown, unknown)"]


def test_lines_rewritten_by_a_resume_are_read_once(tmp_path):
    """train.py's own logger: the run reaches step 300 (FID there), then resumes from its checkpoint at 200."""
    run_dir = tmp_path / "resumed"
    write_run(run_dir, [])
    first = MetricsLogger(run_dir, {}, "resumed", tensorboard=False)
    for step, seconds in ((100, 10.0), (200, 20.0), (300, 30.0)):
        first.log(step, training_line(step, step_time_s=0.1, train_time_s=seconds))
        first.log(step, {"fid10000": 100.0 - step / 10, "train_time_s": seconds})
    resumed = MetricsLogger(run_dir, {}, "resumed", resume_step=200, tensorboard=False)
    for step, seconds in ((300, 32.0), (400, 42.0)):
        resumed.log(step, training_line(step, step_time_s=0.12, train_time_s=seconds))
        resumed.log(step, {"fid10000": 80.0 - step / 10, "train_time_s": seconds})
    rows = read_curves([str(run_dir)])
    assert [(row["step"], row["train_time_s"], row["value"]) for row in rows] == [
        (100, 10.0, 90.0), (200, 20.0, 80.0), (300, 32.0, 50.0), (400, 42.0, 40.0)]


def test_runs_with_different_fid_metrics_need_metric(runs, tmp_path, capsys):
    sra, _ = runs
    both = write_run(tmp_path / "both", [
        training_line(100, step_time_s=0.1, train_time_s=10.0),
        {"step": 100, "fid10000": 30.0, "fid50000": 29.0, "train_time_s": 10.0}])
    message = cli_error([sra, both, "--output", str(tmp_path / "out.png")], capsys)
    assert message == (f"error: the runs log more than one FID metric ({sra}: fid10000; {both}: fid10000, "
                       "fid50000); choose one with --metric")
    message = cli_error([sra, both, "--metric", "fid50000", "--output", str(tmp_path / "out.png")], capsys)
    assert message.startswith(f"error: --metric fid50000: {sra} logged none (the runs have ")
    assert not (tmp_path / "out.png").exists()
    rows = read_curves([sra, both], metric="fid10000")
    assert [(row["run"], row["value"]) for row in rows] == [(sra, 40.0), (sra, 33.5), (both, 30.0)]
    assert [row["value"] for row in read_curves([both], metric="fid50000")] == [29.0]


def test_log_scale_once_fid_spans_more_than_a_factor_3(tmp_path):
    rows = [{"run": "a", "label": "a", "step": step, "train_time_s": 3600.0 * step, "time_source": "logged",
             "metric": "fid50000", "value": value} for step, value in ((1, 90.0), (2, 31.0))]
    linear = plot_curves(rows, tmp_path / "linear.png")
    assert linear.axes[0].get_yscale() == "linear" and linear.axes[0].get_ylabel() == "FID-50K"
    rows[1]["value"] = 29.0
    logarithmic = plot_curves(rows, tmp_path / "log.png")
    assert [axes.get_yscale() for axes in logarithmic.axes] == ["log", "log"]
    assert logarithmic.axes[0].get_ylabel() == "FID-50K (log scale)"


def test_default_output_is_results_curves_png(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_curves(runs)
    assert (tmp_path / "results" / "curves.png").stat().st_size > 0
    assert len(read_csv(tmp_path / "results" / "curves.csv")) == 5


def test_user_mistakes_are_one_line(runs, tmp_path, capsys):
    sra, _ = runs
    output = ["--output", str(tmp_path / "out.png")]
    (tmp_path / "empty").mkdir()
    assert cli_error([str(tmp_path / "empty"), *output], capsys) == (
        f"error: {tmp_path / 'empty'} has no metrics.jsonl: not a train.py run directory")
    no_fid = write_run(tmp_path / "no_fid", [training_line(100, step_time_s=0.1)])
    assert cli_error([no_fid, *output], capsys).startswith(
        f"error: {no_fid}/metrics.jsonl has no FID lines (fid<K>); train with --eval-every")
    broken = write_run(tmp_path / "broken", LOGGED_LINES)
    with open(Path(broken) / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 400, "fid10000": 3\n')
    assert cli_error([broken, *output], capsys).startswith(f"error: {broken}/metrics.jsonl line 6: malformed JSON")
    not_a_number = write_run(tmp_path / "not_a_number", [*LOGGED_LINES, {"step": 400, "fid10000": "n/a"}])
    assert cli_error([not_a_number, *output], capsys) == (
        f"error: {not_a_number}/metrics.jsonl line 6: fid10000 is not a number")
    joined = write_run(tmp_path / "joined", LOGGED_LINES + LOGGED_LINES)
    assert cli_error([joined, *output], capsys).startswith(
        f"error: {joined}/metrics.jsonl line 6: step 100 comes after step 300")
    no_step_time = write_run(tmp_path / "no_step_time", [training_line(100), {"step": 100, "fid10000": 3.0}])
    assert cli_error([no_step_time, *output], capsys).startswith(
        f"error: {no_step_time}/metrics.jsonl line 1: a training line without step_time_s")
    assert cli_error([sra, "--labels", "a", "b", *output], capsys) == "error: --labels gives 2 labels for 1 runs"
    assert cli_error([sra, sra, *output], capsys) == f"error: run directories given more than once: {sra}, {sra}"
    assert cli_error([sra, "--output", str(tmp_path / "out.pdf")], capsys).startswith(
        f"error: --output {tmp_path / 'out.pdf'}: the figure is a PNG")
    assert not (tmp_path / "out.png").exists()
    assert cli_error(["--metric"], capsys) == "error: argument --metric: expected one argument (see --help)"
    with pytest.raises(UserError, match="no run directories given"):
        read_curves([])


def test_command_exits_2_with_one_line_for_a_missing_run(tmp_path):
    command = [sys.executable, "-m", "analysis.curves", "results/nope", "--output", "out.png"]
    result = subprocess.run(command, check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == "error: results/nope: no such run directory\n"
    assert result.stdout == "" and not (tmp_path / "out.png").exists()
