"""python -m studies: the grid, its resumption, the statistics against hand computations, the table and
curves of a tiny study run end to end."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import sample_ddp
import train
from errors import UserError, run_cli
from evaluations import evaluator
from studies import compare, load_study, summarize
from studies.__main__ import main as study
from studies.report import markdown_table, table_rows


def test_summary_matches_a_hand_computation():
    values = [30.0, 31.0, 32.5]
    mean = 93.5 / 3
    std = math.sqrt(((30 - mean) ** 2 + (31 - mean) ** 2 + (32.5 - mean) ** 2) / 2)
    summary = summarize(values)
    assert summary.mean == pytest.approx(31.1666666667, abs=1e-9)
    assert summary.std == pytest.approx(std, abs=1e-12) and std == pytest.approx(1.2583057, abs=1e-6)
    assert summary.ci_half_width == pytest.approx(4.302652730 * std / math.sqrt(3), abs=1e-8)  # t(0.975, 2)
    one = summarize([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and math.isnan(one.ci_half_width)


def test_welch_test_matches_its_closed_form():
    a, b = [29.0, 29.4, 29.9], [33.0, 32.1, 33.6, 32.8]
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std**2 / 3, sb.std**2 / 4
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch–Satterthwaite
    p = 2 * stats.t.sf(abs(t), df)
    comparison = compare(a, b)
    assert comparison.difference == pytest.approx(sa.mean - sb.mean)
    assert comparison.p_value == pytest.approx(p, rel=1e-10) and p < 0.01 and comparison.significant
    assert comparison.verdict().startswith("yes (p = ")
    close = compare([30.0, 31.0], [30.5, 30.2])
    assert close.significant is False and close.verdict().startswith("no (p = ")
    assert compare([30.0], [31.0, 32.0]).verdict() == "n/a (needs 2+ seeds on both sides)"
    assert compare([30.0, 30.0], [31.0, 31.0]).verdict() == "no spread to test"  # not p = 0 from a 0 variance


def test_table_in_the_papers_layout():
    results = {"baseline": {"fid10000": [33.0, 32.1, 33.6]}, "sra": {"fid10000": [29.0, 29.4, 29.9]}}
    rows = table_rows(results, ["baseline", "sra"], "baseline")
    text = markdown_table(rows, "baseline")
    lines = text.splitlines()
    assert lines[0].startswith("| setting | seeds | FID-10K mean ± std | 95 % interval | Δ vs baseline |")
    sra = summarize([29.0, 29.4, 29.9])
    assert f"| sra | 3 | {sra.mean:.2f} ± {sra.std:.2f} | [{sra.interval[0]:.2f}, {sra.interval[1]:.2f}] | " \
           f"{sra.mean - summarize([33.0, 32.1, 33.6]).mean:+.2f} | yes (p = " in text
    assert "| baseline | 3 |" in text and "| baseline |" in lines[2]


@pytest.mark.parametrize("kwargs, message", [
    ({"settings": ['a=--seed 3']}, "a: --seed is set by the study itself"),
    ({"settings": ["a=--preset debug"], "seeds": []}, "needs --seeds"),
    ({"settings": ["a=--preset debug"], "seeds": [0, 0]}, "repeats a seed"),
    ({"settings": ["a=--preset debug"], "baseline": "b"}, "--baseline 'b' is not one of the settings (a)"),
    ({"settings": ["a b=--preset debug"]}, "setting names must be directory names"),
    ({"settings": ["a"]}, 'expected NAME="train.py flags"'),
    ({"settings": []}, "needs at least one --setting"),
    ({"settings": ["a=--preset debug"], "name": "../x"}, "needs a --name"),
])
def test_grid_mistakes_are_named(kwargs, message):
    spec = {"name": "s", "data_dir": "d", "seeds": [0], **kwargs}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_study(None, spec["name"], spec["settings"], spec["seeds"], None, spec["data_dir"], spec.get("baseline"))


def test_a_settings_flag_mistake_is_reported_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        from errors import run_cli
        run_cli(study, ["--name", "s", "--data-dir", "d", "--seeds", "0", "--results-dir", str(tmp_path),
                        "--setting", "ok=--preset debug", "--setting", "bad=--t-max 2"])
    assert exit_info.value.code == 2
    assert "error: setting 'bad': --t-max 2.0: must be <= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_grid_file_and_commands_for_a_cluster(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"name": "g", "data_dir": "data/x", "seeds": [0, 1], "common": "--max-steps 10",
                                "settings": {"none": "--preset debug --guidance none", "sra": ["--preset", "debug"]},
                                "baseline": "none"}))
    result = study(["--grid", str(grid), "--results-dir", str(tmp_path / "r"), "--print-commands",
                    "--launcher", "accelerate launch --num_processes 8"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and len(result["runs"]) == 4
    assert lines[0] == (f"accelerate launch --num_processes 8 train.py --preset debug --guidance none --max-steps 10 "
                        f"--data-dir data/x --seed 0 --results-dir {tmp_path / 'r' / 'g' / 'none'} --run-name seed0")
    assert not (tmp_path / "r").exists()  # printing commands writes nothing


def test_a_tiny_study_resumes_and_reports(tmp_path, data_dir, monkeypatch, capsys):
    from evaluations import InceptionFeatures, save_statistics
    from evaluations.features import Activations

    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    pool, spatial = InceptionFeatures.load()(images)
    reference = tmp_path / "ref.npz"
    save_statistics(reference, Activations(pool.numpy(), spatial.numpy()).statistics())
    # The 2048×2048 sqrtm of a real FID takes a minute here; a stand-in that depends on each run's samples.
    monkeypatch.setattr("training.fid.fid_against_reference", lambda features, statistics: float(features.mean()))
    argv = ["--name", "tiny", "--data-dir", data_dir, "--seeds", "0", "1", "--results-dir", str(tmp_path / "r"),
            "--baseline", "none", "--setting", "none=--preset debug --guidance none", "--setting", "sra=--preset debug",
            "--common", "--max-steps 2 --sample-every 0 --tensorboard off --eval-every 2 --eval-ref "
                        f"{reference} --eval-samples 4 --eval-batch-size 2 --eval-steps 2"]
    real_main, calls = train.main, []

    def interrupted_after_two(run_argv):
        calls.append(run_argv)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_main(run_argv)

    monkeypatch.setattr(train, "main", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        study(argv)
    first = tmp_path / "r" / "tiny" / "none" / "seed0" / "checkpoints" / "step_0000002.pt"
    stamp = first.stat().st_mtime_ns
    calls.clear()
    result = study(argv)  # the same command: the two finished runs are skipped, the other two train
    assert len(calls) == 2 and first.stat().st_mtime_ns == stamp
    assert [c[c.index("--seed") + 1] for c in calls] == ["0", "1"] and all("--guidance" not in c for c in calls)
    values = {}
    for setting in ("none", "sra"):
        for seed in (0, 1):
            lines = (tmp_path / "r" / "tiny" / setting / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
            values.setdefault(setting, []).append(json.loads(lines[-1])["fid4"])
    rows = {row["setting"]: row for row in result["rows"]}
    for setting in ("none", "sra"):
        assert rows[setting]["mean"] == pytest.approx(sum(values[setting]) / 2)
        assert rows[setting]["std"] == pytest.approx(abs(values[setting][0] - values[setting][1]) / math.sqrt(2))
    assert rows["sra"]["vs_baseline"] == pytest.approx(rows["sra"]["mean"] - rows["none"]["mean"])
    out = tmp_path / "r" / "tiny"
    assert (out / "table.md").read_text().startswith("| setting | seeds | FID-4 mean ± std |")
    bands = (out / "curves.csv").read_text().splitlines()
    assert bands[0] == "setting,step,hours,metric,n,mean,std" and len(bands) == 3 and (out / "curves.png").is_file()
    dry = study([*argv, "--dry-run"])
    assert all(run.done for run in dry["runs"]) and "none seed 0: done" in capsys.readouterr().out


def _files(root):
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _reference(path, seed, count=6):
    """An image reference batch for the evaluator: `arr_0`, uint8 (count, 8, 8, 3)."""
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8))
    return str(path)


def test_a_run_trained_with_other_flags_is_refused_not_reused(tmp_path, data_dir, monkeypatch, capsys):
    from evaluations import InceptionFeatures, save_statistics
    from evaluations.features import Activations

    pool, spatial = InceptionFeatures.load()(torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8))
    reference = tmp_path / "ref.npz"
    save_statistics(reference, Activations(pool.numpy(), spatial.numpy()).statistics())
    monkeypatch.setattr("training.fid.fid_against_reference", lambda features, statistics: float(features.mean()))
    base = ["--name", "s", "--data-dir", data_dir, "--seeds", "0", "--results-dir", str(tmp_path / "r")]
    common = (f"--sample-every 0 --tensorboard off --eval-every 1 --eval-ref {reference} --eval-samples 2 "
              "--eval-batch-size 2 --eval-steps 2")
    study([*base, "--setting", "a=--preset debug --lr 1e-4", "--common", f"--max-steps 1 {common}"])
    before = _files(tmp_path / "r")
    capsys.readouterr()
    real_main, calls = train.main, []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or real_main(argv))
    for setting, extra, named in [
        ("a=--preset debug --lr 0.05 --guidance none", "", ("optim.lr: 0.0001 -> 0.05", "guidance.method: 'sra'")),
        ("a=--preset debug --lr 0.05", " --max-steps 2", ("optim.lr: 0.0001 -> 0.05",)),  # not resumed either
        ("a=--preset debug", " --eval-steps 3", ("--eval-steps 2 -> 3", "in-training FID")),  # its result's settings
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(study, [*base, "--setting", setting, "--common", f"--max-steps 1 {common}{extra}"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: setting 'a' seed 0: ") and err.count("\n") == 1
        assert all(name in err for name in named), err
        assert not calls and _files(tmp_path / "r") == before  # nothing trained, nothing rewritten
    # The reference counts by content: other statistics under the same path are not its FID's reference.
    original = reference.read_bytes()
    save_statistics(reference, Activations(pool.numpy()[:3], spatial.numpy()[:3]).statistics())
    with pytest.raises(SystemExit):
        run_cli(study, [*base, "--setting", "a=--preset debug --lr 1e-4", "--common", f"--max-steps 1 {common}"])
    assert "--eval-ref" in capsys.readouterr().err and not calls
    reference.write_bytes(original)
    # What train.py lets a resumed run change: a larger --max-steps continues it.
    result = study([*base, "--setting", "a=--preset debug --lr 1e-4", "--common", f"--max-steps 2 {common}"])
    assert len(calls) == 1 and result["runs"][0].done and result["rows"][0]["metric"] == "fid2"


def test_an_evaluation_is_reused_only_for_the_same_reference_samples_and_flags(tmp_path, data_dir, monkeypatch,
                                                                              capsys):
    # The 2048×2048 sqrtm of a real FID takes a minute here; a stand-in that depends on samples and reference.
    monkeypatch.setattr(evaluator, "frechet_distance", lambda sample, ref: float(sample.mu.mean() - ref.mu.mean()))
    ref_a, ref_b = _reference(tmp_path / "refA.npz", 0), _reference(tmp_path / "refB.npz", 1)
    real_sample, sampled = sample_ddp.main, []
    monkeypatch.setattr(sample_ddp, "main", lambda argv: sampled.append(argv) or real_sample(argv))
    base = ["--name", "s", "--data-dir", data_dir, "--seeds", "0", "--results-dir", str(tmp_path / "r"),
            "--setting", "a=--preset debug", "--common", "--max-steps 1 --sample-every 0 --tensorboard off"]

    def evaluated(ref, num_samples, flags):
        result = study([*base, "--evaluate-ref", ref, "--num-samples", str(num_samples), f"--sample-flags={flags}"])
        return {row["metric"]: row["mean"] for row in result["rows"]}["fid"]

    older = tmp_path / "r" / "s" / "a" / "seed0" / "eval" / "step_0000001" / "metrics.json"
    older.parent.mkdir(parents=True)
    older.write_text('{"fid": 1.0}')  # an evaluation in the unkeyed layout of earlier versions: not reused
    first = evaluated(ref_a, 4, "--num-steps 2")
    assert len(sampled) == 1 and first != 1.0
    assert f"note: {older} does not record its reference" in capsys.readouterr().out
    second = evaluated(ref_b, 5, "--num-steps 3")  # another reference, number and flags: evaluated anew
    assert len(sampled) == 2 and second != first
    evaluations = tmp_path / "r" / "s" / "a" / "seed0" / "eval"
    saved = [json.loads(path.read_text()) for path in evaluations.rglob("metrics.json") if path != older]
    assert sorted((m["reference"], m["num_samples"]) for m in saved) == [(ref_a, 4), (ref_b, 5)]
    assert "refB.npz (sha256 " in (tmp_path / "r" / "s" / "table.md").read_text()
    assert evaluated(ref_a, 4, "--num-steps=2") == first and len(sampled) == 2  # the same evaluation: reused
    _reference(tmp_path / "refA.npz", 2)  # the same path, other content: evaluated anew
    assert evaluated(ref_a, 4, "--num-steps 2") != first and len(sampled) == 3


@pytest.mark.parametrize("flags, message", [
    (["--evaluate-ref", "{tmp}/nope.npz"], "nope.npz: no such file"),
    (["--evaluate-ref", "{tmp}/stats.npz"], "it holds statistics only, the images are needed here"),
    (["--evaluate-ref", "{tmp}/ref.npz", "--num-samples", "3"], "--num-samples 3: the evaluator's precision and"),
    (["--evaluate-ref", "{tmp}/ref.npz", "--sample-flags", "--num-steps 0"], "--num-steps must be >= 1"),
    (["--evaluate-ref", "{tmp}/ref.npz", "--sample-flags", "--bogus 1"], "unrecognized arguments: --bogus 1"),
    (["--evaluate-ref", "{tmp}/ref.npz", "--sample-flags", "--num-samples 8"], "--num-samples is set by the study"),
    (["--sample-flags", "--num-steps 4"], "--sample-flags set the evaluation of --evaluate-ref, which is not given"),
])
def test_evaluation_inputs_are_checked_before_anything_trains(tmp_path, monkeypatch, capsys, flags, message):
    _reference(tmp_path / "ref.npz", 0)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048))
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained before the evaluation inputs were checked"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(study, ["--name", "s", "--data-dir", str(tmp_path / "data"), "--seeds", "0", "--results-dir",
                        str(tmp_path / "r"), "--setting", "a=--preset debug",
                        *(flag.format(tmp=tmp_path) for flag in flags)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err
    assert not (tmp_path / "r").exists()
