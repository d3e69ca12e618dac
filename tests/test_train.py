"""End-to-end runs of train.py on a tiny generated pixel dataset (CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import train
from errors import UserError
from training.checkpoints import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "debug", "--num-workers", "0", "--tensorboard", "off"]


def run(tmp_path, data_dir, *extra):
    return train.main([*FAST, "--data-dir", data_dir, "--results-dir", str(tmp_path), *extra])


def test_debug_run_writes_checkpoint_metrics_and_grid(tmp_path, data_dir):
    result = run(tmp_path, data_dir, "--max-steps", "4", "--ckpt-every", "2", "--log-every", "2",
                 "--sample-every", "4", "--tensorboard", "on")
    run_dir = tmp_path / "debug"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002.pt", "step_0000004.pt"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert all(np.isfinite(line["loss"]) and line["align"] > 0 for line in lines)
    assert (run_dir / "samples_0000004.png").stat().st_size > 0
    assert any((run_dir / "tensorboard").iterdir())
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["guidance"]["student_depth"] == 2 and saved["guidance"]["teacher_depth"] == 5
    assert saved["data"]["input_size"] == 8 and saved == result["record"]
    state = read_checkpoint(run_dir / "checkpoints" / "step_0000004.pt")  # verifies the checksum
    assert state["step"] == 4 and state["head"] is not None and state["config"] == saved
    assert state["meta"]["objective"] == {"kind": "flow", "path": "linear", "prediction": "velocity",
                                          "time_sampling": "uniform"}
    assert torch.equal(state["ema"]["pos_embed"], result["ema"].model.pos_embed)


def test_resumed_run_is_bit_identical(tmp_path, data_dir):
    common = ["--ckpt-every", "2", "--sample-every", "0", "--log-every", "1"]
    straight = run(tmp_path / "a", data_dir, "--max-steps", "5", *common)
    run(tmp_path / "b", data_dir, "--max-steps", "3", *common)
    resumed = run(tmp_path / "b", data_dir, "--max-steps", "5", *common)  # same command, longer
    for a, b in [(straight["student"], resumed["student"]), (straight["ema"].model, resumed["ema"].model)]:
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), name
    metrics_b = [json.loads(x)["step"] for x in (tmp_path / "b/debug/metrics.jsonl").read_text().splitlines()]
    assert metrics_b == [1, 2, 3, 4, 5]  # the lines after the step-2 checkpoint were rewritten once


def test_dit_and_baseline_runs(tmp_path, data_dir):
    result = run(tmp_path, data_dir, "--model", "DiT-T/2", "--max-steps", "2", "--sample-every", "2",
                 "--run-name", "dit")
    assert result["student"].backbone.out_channels == 6  # learned variance range
    assert (tmp_path / "dit" / "samples_0000002.png").exists()
    baseline = run(tmp_path, data_dir, "--guidance", "none", "--max-steps", "2", "--sample-every", "0",
                   "--run-name", "base")
    assert baseline["student"].head is None
    assert torch.load(tmp_path / "base/checkpoints/step_0000002.pt", weights_only=True)["head"] is None
    lines = [json.loads(x) for x in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    assert "align" not in lines[-1]  # the baseline has no alignment term to show


def test_dit_without_learned_sigma_trains_against_a_matching_objective(tmp_path, data_dir):
    result = run(tmp_path, data_dir, "--model", "DiT-T/2", "--learn-sigma", "off", "--max-steps", "2",
                 "--sample-every", "0", "--run-name", "dit4")
    backbone = result["student"].backbone
    assert backbone.out_channels == backbone.in_channels == 3  # no variance channels (pixel data: RGB)
    state = read_checkpoint(tmp_path / "dit4/checkpoints/step_0000002.pt")
    assert state["meta"]["objective"] == {"kind": "ddpm", "num_timesteps": 1000, "beta_schedule": "linear",
                                          "learn_sigma": False}


def test_dry_run_and_config_errors(tmp_path, data_dir, capsys):
    result = run(tmp_path, data_dir, "--dry-run")
    assert json.loads((tmp_path / "debug" / "config.json").read_text()) == result["record"]
    assert not (tmp_path / "debug" / "checkpoints").exists()
    for argv, message in [
        (["--global-batch-size", "10", "--grad-accum-steps", "4"], "--global-batch-size 10 is not divisible"),
        (["--teacher-depth", "9"], "--teacher-depth 9 is outside SiT-T/2's blocks 1..6"),
        (["--t-max", "1.5"], "--t-max 1.5: must be <= 1"),
    ]:
        with pytest.raises(UserError, match=message):
            run(tmp_path / "refused", data_dir, *argv)
    assert not (tmp_path / "refused").exists()  # every check ran before anything was written
    with pytest.raises(UserError, match="--data-dir is required"):
        train.main(["--preset", "debug"])
    run(tmp_path, data_dir, "--max-steps", "1", "--sample-every", "0", "--run-name", "x")
    with pytest.raises(UserError, match=r"different config \(optim.lr: 0.0001 -> 0.001\)"):
        run(tmp_path, data_dir, "--max-steps", "2", "--sample-every", "0", "--run-name", "x", "--lr", "1e-3")


def test_two_processes_hold_identical_parameters(tmp_path, data_dir):
    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "out = train.main(sys.argv[2:])\n"
        "state = {**out['student'].state_dict(), **{'ema.' + k: v for k, v in out['ema'].state_dict().items()}}\n"
        "torch.save(state, f'{sys.argv[1]}/rank{os.environ[\"RANK\"]}.pt')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(script), str(tmp_path), *FAST, "--data-dir", data_dir, "--results-dir", str(tmp_path),
         "--max-steps", "3", "--sample-every", "0"],
        check=True, env=env, cwd=ROOT, timeout=300,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert not torch.equal(rank0["head.linear2.weight"], torch.zeros_like(rank0["head.linear2.weight"]))


def test_fid_during_training(tmp_path, data_dir, monkeypatch):
    from evaluations import InceptionFeatures, save_statistics
    from evaluations.features import Activations

    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    pool, spatial = InceptionFeatures.load()(images)
    reference = tmp_path / "ref.npz"
    save_statistics(reference, Activations(pool.numpy(), spatial.numpy()).statistics())
    with pytest.raises(ValueError, match="--eval-every needs --eval-ref"):
        run(tmp_path, data_dir, "--eval-every", "2")
    # The Fréchet arithmetic is tested in test_evaluations; its 2048×2048 sqrtm takes a minute on
    # 2 cores, so this test checks what reaches it.
    seen = []

    def spy(features, statistics):
        seen.append((features, statistics))
        return 12.5

    monkeypatch.setattr("training.fid.fid_against_reference", spy)
    run(tmp_path, data_dir, "--max-steps", "2", "--sample-every", "0", "--eval-every", "2", "--eval-ref",
        str(reference), "--eval-samples", "4", "--eval-batch-size", "2", "--eval-steps", "2")
    (features, statistics), = seen
    assert features.shape == (4, 2048) and torch.isfinite(features).all()
    assert np.array_equal(statistics.pool.mu, pool.numpy().mean(axis=0))
    lines = [json.loads(x) for x in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and lines[-1]["fid4"] == 12.5
    assert lines[-1]["train_time_s"] == lines[-2]["train_time_s"] > 0  # training time only, logged with FID
    # The reference is part of the run by content: moved, it resumes; other statistics are refused.
    from training.fid import reference_sha256
    from training.setup import check_resumable, reference_identity

    record = json.loads((tmp_path / "debug" / "config.json").read_text())
    assert record["identity"]["eval_ref_statistics_sha256"] == reference_sha256(reference)
    other = tmp_path / "other.npz"
    save_statistics(other, Activations(pool.numpy()[:5], spatial.numpy()[:5]).statistics())
    with pytest.raises(UserError, match=r"--eval-ref .*other.npz has other content than the file this run's FID"):
        run(tmp_path, data_dir, "--max-steps", "3", "--sample-every", "0", "--eval-every", "2", "--eval-ref",
            str(other), "--eval-samples", "4", "--eval-batch-size", "2", "--eval-steps", "2")
    moved = tmp_path / "moved.npz"
    reference.rename(moved)
    run(tmp_path, data_dir, "--max-steps", "3", "--sample-every", "0")  # no evaluation: the identity stays
    with pytest.raises(UserError, match="has other content"):
        run(tmp_path, data_dir, "--max-steps", "4", "--sample-every", "0", "--eval-every", "2", "--eval-ref",
            str(other), "--eval-samples", "4", "--eval-batch-size", "2", "--eval-steps", "2")
    run(tmp_path, data_dir, "--max-steps", "4", "--sample-every", "0", "--eval-every", "2", "--eval-ref",
        str(moved), "--eval-samples", "4", "--eval-batch-size", "2", "--eval-steps", "2")
    assert len(seen) == 2  # step 4's FID, against the same statistics
    # A run recorded before references were known by content: the file its record names is hashed now.
    older = {**record, "identity": {}, "output": {**record["output"], "eval_ref": str(moved)}}
    assert reference_identity(older)["identity"] == record["identity"]
    with pytest.raises(UserError, match="has other content"):
        check_resumable(reference_identity(older), {**record, "identity": {
            "eval_ref_statistics_sha256": reference_sha256(other)}})
    gone = {**older, "output": {**older["output"], "eval_ref": str(tmp_path / "gone.npz")}}
    assert reference_identity(gone) == gone  # nothing to hash: such a run resumes as before


def test_repa_end_to_end_records_its_encoder(tmp_path, data_dir):
    from repa import weights_sha256
    from tests.helpers import tiny_dinov2, tiny_dinov2_dir

    folder = tiny_dinov2_dir(tmp_path / "encoder", seed=1, grid=4)  # SiT-T/2 at 8×8: 4×4 tokens
    common = ["--guidance", "repa", "--repa-encoder", f"local-dir:{folder}", "--sample-every", "0",
              "--run-name", "repa"]
    run(tmp_path, data_dir, *common, "--max-steps", "2")
    record = json.loads((tmp_path / "repa" / "config.json").read_text())
    assert record["guidance"]["method"] == "repa" and record["guidance"]["student_depth"] == 2
    assert record["identity"] == {"repa_encoder_sha256": weights_sha256(tiny_dinov2(seed=1, grid=4))}
    state = read_checkpoint(tmp_path / "repa/checkpoints/step_0000002.pt")
    assert set(state["head"]) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert state["head"]["4.weight"].shape == (32, 2048)  # to the encoder's width
    lines = [json.loads(x) for x in (tmp_path / "repa" / "metrics.jsonl").read_text().splitlines()]
    assert -1 <= lines[-1]["align"] <= 1  # REPA's −cos per token
    tiny_dinov2_dir(folder, seed=2, grid=4)  # other weights under the same name
    with pytest.raises(UserError, match="identity.repa_encoder_sha256"):
        run(tmp_path, data_dir, *common, "--max-steps", "3")


def flip_byte_in_largest_tensor(path):
    """Flip one byte inside the largest tensor record of a torch.save zip (its CRC is not checked)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda item: item.file_size)
    data = bytearray(path.read_bytes())
    name_length = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    offset = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupt_checkpoints_are_detected_and_never_lost(tmp_path, data_dir, capsys):
    common = ["--ckpt-every", "2", "--sample-every", "0", "--log-every", "2", "--keep-last", "1"]
    run(tmp_path, data_dir, *common, "--max-steps", "4", "--milestone-every", "2")  # keeps steps 2 and 4
    checkpoints = tmp_path / "debug" / "checkpoints"
    flip_byte_in_largest_tensor(checkpoints / "step_0000004.pt")
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_checkpoint(checkpoints / "step_0000004.pt")
    # Sampling and analysis (models.load_checkpoint) refuse it too, instead of sampling damaged weights.
    with pytest.raises(UserError, match=r"step_0000004.pt: the file is damaged \(checksum mismatch"):
        models.load_checkpoint(checkpoints / "step_0000004.pt")
    assert models.load_checkpoint(checkpoints / "step_0000002.pt").name == "SiT-T/2"
    # A rerun falls back to step 2, says so, and keeps the corrupt file it passed over.
    run(tmp_path, data_dir, *common, "--max-steps", "3")
    assert "skipping unreadable checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000003.pt", "step_0000004.pt"]
    assert read_checkpoint(checkpoints / "step_0000003.pt")["step"] == 3  # pruning kept the newest loadable
    # When no checkpoint can be read, a rerun refuses to start over and writes nothing.
    flip_byte_in_largest_tensor(checkpoints / "step_0000003.pt")
    config_before = (tmp_path / "debug" / "config.json").read_text()
    with pytest.raises(UserError, match=r"none of the 2 checkpoints .* can be read .*--restart"):
        run(tmp_path, data_dir, *common, "--max-steps", "2", "--lr", "1e-3")
    assert (tmp_path / "debug" / "config.json").read_text() == config_before
    run(tmp_path, data_dir, *common, "--max-steps", "2", "--lr", "1e-3", "--restart", "on")
    assert read_checkpoint(checkpoints / "step_0000002.pt")["step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000002.pt", "step_0000003.pt",
                                                             "step_0000004.pt"]


def test_a_finished_run_says_so(tmp_path, data_dir, capsys):
    trained = run(tmp_path, data_dir, "--max-steps", "2", "--sample-every", "0")
    capsys.readouterr()
    result = run(tmp_path, data_dir, "--max-steps", "1", "--sample-every", "0")
    assert "is at step 2, which is not before --max-steps 1: nothing to train" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(result["ema"].model.state_dict().values(),
                                                 trained["ema"].model.state_dict().values()))


@pytest.mark.parametrize("bad_steps, limit, stops", [({2, 3}, 2, True), ({1, 3}, 2, False), ({2, 3, 4}, 3, True)])
def test_nonfinite_streaks_are_counted_exactly(tmp_path, data_dir, monkeypatch, bad_steps, limit, stops):
    from guidance.loss import TrainingLoss

    original, calls = TrainingLoss.__call__, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        terms = original(self, *args, **kwargs)
        if len(calls) in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(TrainingLoss, "__call__", poisoned)
    argv = ["--max-steps", "6", "--log-every", "5", "--max-nonfinite-steps", str(limit), "--sample-every", "0"]
    if not stops:
        run(tmp_path, data_dir, *argv)
        lines = [json.loads(x) for x in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["nonfinite_total"] == 2 and lines[-1]["nonfinite_run"] == 0
        return
    first, last = min(bad_steps), max(bad_steps)
    with pytest.raises(RuntimeError, match=rf"{limit} consecutive steps had non-finite gradients "
                                           rf"\(steps {first}–{last}.* Dataset indices of process 0"):
        run(tmp_path, data_dir, *argv)
    assert len(calls) < last + limit  # stopped within limit − 1 steps of the streak reaching the limit


def test_user_errors_are_one_line_with_exit_status_2(tmp_path, data_dir):
    # The real entry point in a process of its own, for a flag and for a missing input; every other mistake
    # is run in process through the same errors.run_cli (tests/test_user_errors.py).
    for argv in (["--lr", "-1e-3"], []):
        data = ["--data-dir", data_dir] if argv else []
        done = subprocess.run([sys.executable, "train.py", *FAST, *data, "--results-dir", str(tmp_path), *argv],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_nonfinite_guard_continues_a_streak_across_a_resume():
    from training.guard import NonFiniteGuard

    guard = NonFiniteGuard(limit=3, log_every=100, device="cpu", start_step=5,
                           counters={"nonfinite_total": 4.0, "nonfinite_run": 2.0})
    guard.record(6, torch.tensor(False))
    assert guard.check() == (3, [4, 5, 6])
    assert (float(guard.total), float(guard.run)) == (5.0, 3.0)
    guard.record(7, torch.tensor(True))
    assert guard.check() is None and float(guard.run) == 0


def test_wandb_logs_offline(tmp_path, data_dir, monkeypatch):
    pytest.importorskip("wandb")  # in requirements.txt; a bare GPU machine may lack it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, data_dir, "--max-steps", "2", "--log-every", "1", "--sample-every", "0", "--wandb", "on")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's log, ready for `wandb sync`


def test_compile_mode_reaches_torch_compile(monkeypatch):
    import types

    from configs.cli import resolve
    from training.setup import compile_run

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: calls.append(mode) or fn)
    teacher = types.SimpleNamespace(model=types.SimpleNamespace(forward_features=None))
    parts = types.SimpleNamespace(trained=None, teacher=teacher)
    compile_run(parts, resolve("debug", {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}))
    assert calls == ["max-autotune-no-cudagraphs"] * 2  # the student and the teacher's partial forward
    compile_run(parts, resolve("debug", {}))
    assert len(calls) == 2  # --compile off: nothing is compiled
    with pytest.raises(UserError, match="--compile-mode reduce-overhead applies with --compile on"):
        resolve("debug", {"compile_mode": "reduce-overhead"})
