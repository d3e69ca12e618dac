"""`python -m demo` end to end at a tiny size (the README's smoke command), and the built-in dataset."""
import contextlib
import hashlib
import io
import json
import math
import shutil

import numpy as np
import pytest

from demo import dataset
from demo.__main__ import main as run_demo
from demo.__main__ import segment_ends
from demo.report import GRID_GAP, GRID_SCALE, class_grid
from demo.study import main as demo_study
from errors import UserError
from evaluations import evaluator, features
from evaluations.metrics import FIDStatistics, frechet_distance

# The README's smoke run: every stage of `make demo` with 30 training images, 4 steps and FID-8.
SMOKE = ["--steps", "4", "--samples", "8", "--reference-images", "10", "--images-per-class", "3"]
RUNS = ("baseline", "sra")


def frechet_distance_eigh(sample, reference):
    """The Fréchet distance with tr sqrt(S1 S2) = Σ sqrt(eig(S1^½ S2 S1^½)) (similar matrices for
    covariances), from symmetric eigendecompositions: ~2 s at 2048 dimensions, where scipy's sqrtm
    takes 20–80 s on 2 busy cores. The test below checks it against the evaluator's form."""
    values, vectors = np.linalg.eigh(sample.sigma)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # S1^½
    product = np.linalg.eigvalsh(root @ reference.sigma @ root)
    diff = sample.mu.astype(np.float64) - reference.mu
    trace_root = np.sqrt(np.clip(product, 0, None)).sum()
    return float(diff @ diff + np.trace(sample.sigma) + np.trace(reference.sigma) - 2 * trace_root)


def run_quietly(argv):
    """(the demo's return value, what it printed on stdout and stderr: progress bars go to stderr)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        result = run_demo(argv)
    return result, printed.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run, once for the module: (output directory, report path, printed output)."""
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluator, "frechet_distance", frechet_distance_eigh)  # the evaluator's FID and sFID
        patch.setattr(features, "frechet_distance", frechet_distance_eigh)  # train.py's FID-K
        report, printed = run_quietly([*SMOKE, "--output-dir", str(output_dir)])
    return output_dir, report, printed


def test_eigh_frechet_distance_equals_the_evaluators():
    rng = np.random.default_rng(0)
    sample = FIDStatistics.from_features(rng.standard_normal((40, 16)).astype(np.float32))
    reference = FIDStatistics.from_features(rng.standard_normal((50, 16)).astype(np.float32) + 0.3)
    expected = frechet_distance(sample, reference)
    assert frechet_distance_eigh(sample, reference) == pytest.approx(expected, rel=1e-6)  # sqrtm: ~1e-8


def test_smoke_run_writes_every_artefact(smoke):
    output_dir, report, printed = smoke
    assert report == output_dir / "report.md"
    assert printed.rstrip().splitlines()[-1] == f"report: {report}"
    for name in ("report.md", "loss.png", "fid.png", "samples_reference.png", "samples_baseline.png",
                 "samples_sra.png", "probe/probe.json", "probe/compare.png", "probe/pca.png", "reference/stats.npz",
                 "classifier.json"):
        assert (output_dir / name).stat().st_size > 0, name
    text = report.read_text()
    for run in RUNS:
        # only the checkpoint later stages use: the final one (step 2 resumed the run, then was pruned)
        assert [path.name for path in (output_dir / "runs" / run / "checkpoints").glob("*.pt")] == ["step_0000004.pt"]
        with np.load(output_dir / "samples" / f"{run}.npz") as samples:
            assert samples["arr_0"].shape == (8, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
        metrics = json.loads((output_dir / "samples" / f"{run}_metrics.json").read_text())
        assert metrics["num_samples"] == 8 and metrics["num_reference"] == 10
        assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0 and math.isfinite(metrics["sfid"])
        assert f"{metrics['fid']:.2f}" in text
        metrics_file = output_dir / "runs" / run / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        (fid_line,) = [line for line in lines if "fid8" in line]  # train.py's FID-8 at half the steps
        assert fid_line["step"] == 2 and math.isfinite(fid_line["fid8"])
        assert [line["step"] for line in lines if "loss" in line] == [2, 4]  # each train.py call's last step
    assert "FID-8" in text and "## Representation probe" in text
    assert "![PCA of block tokens](probe/pca.png)" in text and "first three principal components" in text


def test_report_shows_the_class_shares_with_their_standard_errors(smoke):
    output_dir, report, _ = smoke
    text = report.read_text()
    classes = json.loads((output_dir / "classifier.json").read_text())
    for run, label in (("baseline", "baseline"), ("sra", "SRA")):
        for kind in ("rgb", "shape"):
            result = classes["runs"][run][kind]
            assert result["n"] == 8
            assert result["stderr"] == pytest.approx(math.sqrt(result["share"] * (1 - result["share"]) / 8))
        shares = [f"{100 * result['share']:.1f}% ± {100 * result['stderr']:.1f}% (n = 8)"
                  for result in (classes["runs"][run]["rgb"], classes["runs"][run]["shape"])]
        assert f"| {label} samples | {shares[0]} | {shares[1]} |" in text
    assert classes["held_out_images"] == 500 and "held-out real images" in text


def test_stages_record_wall_time_cpu_time_and_their_own_load(smoke):
    output_dir, report, printed = smoke
    stages = json.loads((output_dir / "stages.json").read_text())
    assert {"train baseline", "train sra", "classify", "probe"} <= set(stages)
    for name, record in stages.items():
        assert record["wall_s"] >= 0 and record["cpu_s"] >= 0, name
        assert all(len(part) == 2 for part in record["load_1min"]), name
    assert len(stages["train sra"]["load_1min"]) == 2  # trained in two parts: up to the FID, then resumed
    text = report.read_text()
    assert "| run | wall time | CPU time | wall s/step | CPU s/step | img/s: median window, fastest window |" in text
    assert "| stage | wall time | CPU time | load average (1 min) at start → end |" in text


def test_progress_bars_show_only_the_loss_terms_a_run_has(smoke):
    printed = smoke[2]
    baseline = printed.split("] train baseline:")[1].split("] train sra:")[0]  # from stage header to header
    sra = printed.split("] train sra:")[1].split("] sample baseline:")[0]
    assert "loss=" in baseline and "align=" not in baseline
    assert "loss=" in sra and "align=" in sra


def test_sampling_prints_its_settings_once_as_one_line(smoke):
    printed = smoke[2]
    assert printed.count("settings: SiT-T/4, ema weights") == 2  # one line per run
    assert '"ckpt_sha256"' not in printed


def test_runs_differ_only_in_guidance(smoke):
    output_dir = smoke[0]
    baseline, sra = (json.loads((output_dir / "runs" / run / "config.json").read_text()) for run in RUNS)
    differing = {key for key in baseline if baseline[key] != sra[key]}
    assert differing == {"run", "guidance"}
    assert {k for k in baseline["run"] if baseline["run"][k] != sra["run"][k]} == {"run_name"}
    assert baseline["guidance"] == {"method": "none"}
    assert (sra["guidance"]["student_depth"], sra["guidance"]["teacher_depth"]) == (2, 5)  # 6 blocks: ¼ and ¾
    final = {run: json.loads((output_dir / "runs" / run / "metrics.jsonl").read_text().splitlines()[-1])
             for run in RUNS}
    assert "align" not in final["baseline"] and final["sra"]["align"] > 0


def test_rerun_reuses_every_stage(smoke):
    output_dir, report, _ = smoke
    times = (output_dir / "stages.json").read_text()
    again, printed = run_quietly([*SMOKE, "--output-dir", str(output_dir)])
    assert again == report
    assert "$ python" not in printed  # no entry point ran
    assert printed.count("  reusing ") == 12  # data, preprocessing, 2 reference files, 2 × 3 per run, classify, probe
    assert (output_dir / "stages.json").read_text() == times


def test_the_seed_study_tabulates_every_seeds_results(smoke, tmp_path):
    """demo.study over two seeds whose demos are finished: seed 0 is the smoke run, seed 1 a copy of it
    that says seed 1 (its stages are all reused), so the table's arithmetic can be checked by hand."""
    output_dir = smoke[0]
    root = tmp_path / "study"
    for seed in (0, 1):
        shutil.copytree(output_dir, root / f"seed{seed}")
    settings_file = root / "seed1" / "demo.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "seed": 1}))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rows = demo_study(["--seeds", "0", "1", "--output-dir", str(root), *SMOKE])
    by_key = {(row["setting"], row["metric"]): row for row in rows}
    classes = json.loads((output_dir / "classifier.json").read_text())
    for run in RUNS:
        fid = json.loads((output_dir / "samples" / f"{run}_metrics.json").read_text())["fid"]
        assert by_key[(run, "fid8")]["mean"] == pytest.approx(fid) and by_key[(run, "fid8")]["n"] == 2
        share = by_key[(run, "class share, shape (%)")]
        assert share["mean"] == pytest.approx(100 * classes["runs"][run]["shape"]["share"]) and share["std"] == 0
    assert by_key[("sra", "fid8")]["verdict"] == "no spread to test"  # two equal seeds: nothing to test
    table = (root / "table.md").read_text()
    assert "| sra | 2 |" in table and "Welch" in table and "- seed 1: baseline fid8" in table
    with pytest.raises(UserError, match="--seed: set by the study"):
        demo_study(["--seed", "3"])


def test_other_settings_in_the_same_directory_are_refused(smoke):
    output_dir = smoke[0]
    with pytest.raises(UserError, match=r"other settings \(fid_every: 2 -> 3, steps: 4 -> 6\)"):
        run_demo([*SMOKE, "--steps", "6", "--output-dir", str(output_dir)])


def test_bad_flags_are_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="--reference-images must be a multiple of 10"):
        run_demo([*SMOKE, "--reference-images", "15", "--output-dir", str(tmp_path / "a")])
    with pytest.raises(UserError, match="--images-per-class must be at least 2"):
        run_demo([*SMOKE, "--images-per-class", "1", "--output-dir", str(tmp_path / "b")])
    assert not any(tmp_path.iterdir())


def test_training_segments_end_at_each_fid_step():
    assert segment_ends(600, 300) == [300, 600]
    assert segment_ends(5, 2) == [2, 4, 5]
    assert segment_ends(600, 0) == [600]
    assert segment_ends(4, 4) == [4]


def test_class_grid_puts_each_class_on_its_row():
    labels = np.array([3, 0, 3, 3])
    images = np.stack([np.full((2, 2, 3), 10 * (i + 1), dtype=np.uint8) for i in range(4)])
    grid = class_grid(images, labels, per_class=2)
    cell = 2 * GRID_SCALE + GRID_GAP
    assert grid.shape == (dataset.NUM_CLASSES * cell, 2 * cell, 3)
    assert (grid[0, 0] == 20).all() and (grid[0, cell] == 128).all()  # class 0: image 1, then gray
    assert (grid[3 * cell, 0] == 10).all() and (grid[3 * cell, cell] == 30).all()  # class 3: images 0, 2
    assert (grid[cell, 0] == 128).all()  # class 1 has none


# --- the built-in dataset ------------------------------------------------------------------------

def folder_digest(root):
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.png"))}


def test_dataset_is_deterministic_to_the_byte(tmp_path):
    assert dataset.write_image_folder(tmp_path / "a", 3) == 30
    dataset.write_image_folder(tmp_path / "b", 3)
    first = folder_digest(tmp_path / "a")
    assert len(first) == 30 and first == folder_digest(tmp_path / "b")
    # Image i of a class does not depend on how many the folder holds.
    dataset.write_image_folder(tmp_path / "c", 2)
    assert folder_digest(tmp_path / "c").items() <= first.items()


def test_draw_many_is_class_major_and_matches_draw():
    images, labels = dataset.draw_many(2, start=5)
    assert images.shape == (20, dataset.RESOLUTION, dataset.RESOLUTION, 3) and images.dtype == np.uint8
    assert labels.tolist() == [label for label in range(10) for _ in range(2)]
    assert np.array_equal(images[7], dataset.draw(3, 6))
    assert not np.array_equal(dataset.draw(3, 6, seed=1), dataset.draw(3, 6))


def test_class_folders_sort_in_label_order():
    # The preprocessing labels are the sorted subfolder indices.
    assert sorted(dataset.CLASS_NAMES) == list(dataset.CLASS_NAMES)
    assert len(set(dataset.CLASS_NAMES)) == dataset.NUM_CLASSES == 10


def test_each_class_has_its_own_hue():
    """The pixel of highest HSV value (the shape; backgrounds are darker) has hue k/10 ± the jitter."""
    import colorsys

    for label in range(dataset.NUM_CLASSES):
        image = dataset.draw(label, 0, resolution=32).reshape(-1, 3) / 255
        brightest = image[image.max(axis=1).argmax()]
        hue = colorsys.rgb_to_hsv(*brightest)[0]
        distance = min(abs(hue - label / 10), 1 - abs(hue - label / 10))
        assert distance <= dataset.HUE_JITTER + 0.01, (label, hue)


def test_bad_class_index_and_count_are_refused(tmp_path):
    with pytest.raises(ValueError, match="class index 10"):
        dataset.draw(10, 0)
    with pytest.raises(ValueError, match="at least 1"):
        dataset.write_image_folder(tmp_path, 0)
