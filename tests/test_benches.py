"""The GPU benchmark scripts at toy size on the CPU: every option the device run uses works, and the numbers
they write follow from their definitions (FLOPs, rates, 50K times), so a device call is spent measuring."""
import importlib.util
import json
from pathlib import Path

import pytest

import sra
from models.flops import flops_of, forward_flops, training_step_flops

ROOT = Path(__file__).resolve().parents[1]


def bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_step_bench_counts_flops_and_sweeps_batches(tmp_path):
    out = tmp_path / "steps.jsonl"
    bench("bench_train_step").main(["--model", "SiT-S/2", "--input-size", "8", "--batch-sizes", "2", "3",
                                    "--warmup", "1", "--steps", "1", "--rounds", "1", "--channels-last",
                                    "--variants", "none", "sra", "sra-fp8", "--out", str(out)])
    rows = lines(out)
    assert [(r["batch_size"], r["variant"]) for r in rows] == [
        (b, v) for b in (2, 3) for v in ("none", "sra", "sra-fp8")]
    for r in rows:
        forward = flops_of("SiT-S/2", 8)
        assert r["model_flops_per_step"] == r["batch_size"] * training_step_flops(forward)  # same for every variant
        assert r["mfu"] is None and r["channels_last"] is True  # no peak is known for a CPU
        if r["variant"] != "none":  # SRA's teacher: 9 of 12 blocks forward, no final layer
            assert r["method_flops_per_step"]["teacher"] == r["batch_size"] * flops_of("SiT-S/2", 8, depth=9)
    assert sra.method.fp8_unsupported.__module__ == "models.fp8"  # the bench's CPU bypass did not leak


def test_sampling_bench_extrapolates_from_the_measured_rate(tmp_path):
    out = tmp_path / "sampling.jsonl"
    bench("bench_sampling").main(["--model", "SiT-S/2", "--input-size", "8", "--batch-size", "2", "--steps", "3",
                                  "--num-batches", "1", "--variants", "ours", "release", "--out", str(out)])
    rows = {r["variant"]: r for r in lines(out)}
    assert set(rows) == {"ours", "release"}
    for r in rows.values():
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
        assert r["sampling_s"] == pytest.approx(50_000 / r["images_per_s"])
        assert r["decode_s"] is None and r["end_to_end_s"] == r["sampling_s"]  # no --decode
    assert rows["release"]["attention"] == "explicit" and rows["release"]["precision"] == "fp32"


def test_teacher_precision_check_reports_every_pair(tmp_path):
    out = tmp_path / "precision.jsonl"
    bench("check_teacher_precision").main(["--model", "SiT-S/2", "--input-size", "8", "--batch-size", "2",
                                           "--out", str(out)])
    (result,) = lines(out)
    pairs = {r["pair"]: r for r in result["pairs"]}
    assert set(pairs) == {"bf16 vs fp32", "fp8 vs fp32", "fp8 vs bf16"}
    for r in pairs.values():
        assert 0.99 < r["cosine_mean"] <= 1.0 and r["cosine_min"] <= r["cosine_mean"]
        assert 0.0 < r["relative_l2"] < 0.05
    assert pairs["fp8 vs fp32"]["relative_l2"] > pairs["bf16 vs fp32"]["relative_l2"]  # FP8 is the coarser
    assert sra.method.fp8_unsupported.__module__ == "models.fp8"


def test_forward_flops_of_a_built_model_equal_the_count_from_its_name():
    import models

    model = models.create_model("SiT-S/2", 8, 4, 1000)
    assert forward_flops(model, 3, 9) == 3 * flops_of("SiT-S/2", 8, depth=9)
