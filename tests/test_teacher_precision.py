"""--teacher-precision: FP8 linear layers with row-wise scales (models/fp8.py) and SRA's teacher forward in
bf16, fp16 or FP8. torch._scaled_mm runs on the CPU too, so the FP8 arithmetic is tested here; the run-time
capability check refuses FP8 training anywhere but on a Hopper-class GPU."""
import pytest
import torch
import torch.nn.functional as F

import models
import sra
from errors import UserError
from guidance import AlignmentInputs, GuidanceContext
from models import fp8
from objectives.registry import objective_for_model
from tests.helpers import tiny_model
from training.ema import EMA

E4M3_RELATIVE_ERROR = 2.0**-4  # 3 mantissa bits: round-to-nearest is within half a unit in the last place


def test_row_quantization_maps_each_rows_maximum_to_448_within_e4m3_rounding():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 64)[:, None]
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))  # every row uses the full range
    relative = ((q.float() * scale - x).abs() / x.abs())[x.abs() > scale * 2.0**-6]  # e4m3's normal range
    assert relative.max() <= E4M3_RELATIVE_ERROR
    zero_q, zero_scale = fp8.quantize_rows(torch.zeros(2, 16))
    assert torch.equal(zero_q.float(), torch.zeros(2, 16)) and torch.isfinite(zero_scale).all()


def test_fp8_linear_is_the_product_of_the_dequantized_operands():
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in [(5, 7, 64), (96, 64), (96,)])
    out = fp8.fp8_linear(x, weight, bias, out_dtype=torch.float32)
    q_x, s_x = fp8.quantize_rows(x.reshape(-1, 64))
    q_w, s_w = fp8.quantize_rows(weight)
    expected = ((q_x.float() * s_x) @ (q_w.float() * s_w).T + bias).reshape(5, 7, 96)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    exact = F.linear(x, weight, bias)
    assert F.cosine_similarity(out.reshape(-1, 96), exact.reshape(-1, 96)).min() > 0.999
    assert fp8.fp8_linear(x, weight).dtype == torch.bfloat16


def test_only_the_blocks_token_linears_switch_and_they_switch_back():
    model = tiny_model("SiT-S/2")
    layers = fp8.token_linears(model)
    names = {name for name, module in model.named_modules() if any(module is layer for layer in layers)}
    assert names == {f"blocks.{i}.{part}" for i in range(3) for part in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                          "mlp.fc2")}
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    before = model(x, t, y)
    with fp8.fp8_linears(layers):
        inside = model(x, t, y)
    assert torch.equal(model(x, t, y), before)  # restored: sampling the same EMA stays full precision
    assert not torch.equal(inside, before)
    mmdit = models.create_model("MMDiT-D6/2", 8, 4, num_classes=0, depth=3, hidden_size=32, num_heads=2)
    assert all("adaLN" not in name for name, m in mmdit.joint_blocks.named_modules() if m in fp8.token_linears(mmdit))
    assert len(fp8.token_linears(mmdit)) == 3 * 2 * 4 - 3  # two streams; the last text stream has qkv only


def test_capability_check_names_the_device():
    assert "this run is on the CPU" in fp8.fp8_unsupported(torch.device("cpu"))


def make_sra(precision, monkeypatch=None, name="SiT-S/2"):
    if monkeypatch is not None:  # pretend the CPU is a Hopper GPU: its _scaled_mm computes the same numbers
        monkeypatch.setattr(sra.method, "fp8_unsupported", lambda device: None)
    backbone = tiny_model(name)
    ema = EMA(backbone)
    objective = objective_for_model(name)
    config = sra.SRAConfig(student_depth=1, teacher_depth=3, teacher_precision=precision)
    return sra.SRA(config, GuidanceContext(objective, ema.model, backbone, torch.device("cpu"))), ema, objective


def teacher_target(method, objective, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    eps = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.rand(4, generator=generator)
    y = torch.randint(0, 10, (4,), generator=generator)
    torch.manual_seed(seed)  # the same Δ for every precision
    return method.target(AlignmentInputs(x0, eps, t, y, None)), (x0, eps, t, y)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_teacher_runs_under_its_own_autocast(precision, dtype):
    method, ema, objective = make_sra(precision)
    features, (x0, eps, t, y) = teacher_target(method, objective)
    torch.manual_seed(3)
    t_teacher = method.teacher_time(t, 4, "cpu")
    inputs = (objective.noisy(x0, eps, t_teacher), objective.model_time(t_teacher), y, 3)
    with torch.autocast("cpu", dtype=dtype):
        expected = ema.model.forward_features(*inputs)
    assert torch.equal(features, expected)
    assert not torch.equal(features, ema.model.forward_features(*inputs))  # not the fp32 forward


def test_fp8_teacher_is_close_to_bf16_and_leaves_the_ema_in_full_precision(monkeypatch):
    method, ema, objective = make_sra("fp8", monkeypatch)
    with torch.no_grad():  # the tiny model's adaLN starts at zero; open its gates so every block acts
        for block in ema.model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.2)
    fp8_features, _ = teacher_target(method, objective)
    method.config = sra.SRAConfig(student_depth=1, teacher_depth=3, teacher_precision="bf16")
    bf16_features, _ = teacher_target(method, objective)
    assert not torch.equal(fp8_features, bf16_features)
    cosine = F.cosine_similarity(fp8_features.float(), bf16_features.float(), dim=-1)
    assert cosine.min() > 0.99
    assert all(layer.forward.__func__ is torch.nn.Linear.forward for layer in fp8.token_linears(ema.model))
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())


def test_fp8_refused_without_fp8_hardware():
    with pytest.raises(UserError, match="--teacher-precision fp8: FP8 matrix multiplies need an NVIDIA GPU"):
        make_sra("fp8")


def test_fp8_training_run_on_a_pretend_hopper(tmp_path, data_dir, monkeypatch):
    import train

    monkeypatch.setattr(sra.method, "fp8_unsupported", lambda device: None)
    argv = ["--preset", "debug", "--num-workers", "0", "--tensorboard", "off", "--data-dir", data_dir,
            "--results-dir", str(tmp_path), "--max-steps", "2", "--sample-every", "0", "--log-every", "1",
            "--model", "SiT-S/2", "--teacher-precision", "fp8"]
    result = train.main(argv)
    assert result["record"]["guidance"]["teacher_precision"] == "fp8"
    import json

    lines = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["align"] > 0 for line in lines)
