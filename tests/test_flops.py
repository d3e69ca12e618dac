"""models/flops.py: the analytic counts equal torch.utils.flop_counter's count of the models' own forward
and training passes, term by term and in total, and the closed form gives the published SiT-XL/2 figure."""
import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models
from models.flops import (
    BackboneShape,
    flops_of,
    forward_flop_terms,
    forward_flops,
    matmul_flops,
    training_step_flops,
)
from models.transformer import FREQUENCY_EMBEDDING_SIZE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 2
CONTEXT_LENGTH = 5  # text tokens of the MMDiT cases
# (name, input size): real registry shapes, small grids (T = 64, 16, 16 tokens)
CASES = [("SiT-S/2", 16), ("DiT-S/4", 16), ("MMDiT-D6/2", 8)]
# The modules (the end of FlopCounterMode's names) whose matmuls each term counts; attention is the
# batched matmuls (bmm) wherever they run.
TERM_MODULES = {
    "patch embedding": r"x_embedder",
    "timestep MLP": r"t_embedder",
    "context embedder": r"context_embedder",
    "adaLN": r"(joint_)?blocks\.\d+(\.\w+_block)?\.adaLN_modulation",
    "qkv": r"(joint_)?blocks\.\d+(\.\w+_block)?\.attn\.qkv",
    "proj": r"(joint_)?blocks\.\d+(\.\w+_block)?\.attn\.proj",
    "MLP": r"(joint_)?blocks\.\d+(\.\w+_block)?\.mlp",
    "final layer": r"final_layer",
}
# SiT-XL/2 at 256 px: T = 256 tokens of width D = 1152, 28 blocks (SPEC §1), 4 latent channels
XL_TOKENS, XL_WIDTH, XL_DEPTH = 256, 1152, 28
SIT_XL_GFLOP = 237  # the DiT paper's 118.6 Gflops of DiT-XL/2 (multiply-adds), twice, to the GFLOP
DIT_XL_GMAC = 118.6  # DiT paper, Table 4 and the release README: DiT-XL/2's forward Gflops at 256 px


def build(name, input_size, fused_attn=True):
    options = {"num_classes": 0} if models.family_of(name).condition == "text" else {"num_classes": 10}
    return models.create_model(name, input_size, 4, fused_attn=fused_attn, **options)


class Features(torch.nn.Module):
    """forward_features(…, depth) as a module's forward: FlopCounterMode names modules from the one called."""

    def __init__(self, model, depth):
        super().__init__()
        self.model, self.depth = model, depth

    def forward(self, x, t, y):
        return self.model.forward_features(x, t, y, self.depth)


def model_inputs(model):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, model.in_channels, model.input_size, model.input_size, generator=generator)
    t = torch.rand(BATCH, generator=generator)
    if getattr(model, "context_dim", None):
        y = torch.randn(BATCH, CONTEXT_LENGTH, model.context_dim, generator=generator)
    else:
        y = torch.randint(0, 10, (BATCH,), generator=generator)
    return x, t, y


def context_length(model):
    return CONTEXT_LENGTH if getattr(model, "context_dim", None) else None


def counted(run):
    """FlopCounterMode's counts of `run()`: the total, and each module's. The fused attention runs on the
    math backend, which computes it as two batched matmuls: the CPU's fused kernel has no formula in
    torch.utils.flop_counter and would count as 0."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops(), counter.get_flop_counts()


def measured_terms(counts):
    """FlopCounterMode's per-module counts gathered into models.flops.TERMS."""
    terms = {term: sum(sum(ops.values()) for module, ops in counts.items() if re.search(rf"\.{pattern}$", module))
             for term, pattern in TERM_MODULES.items()}
    terms["attention"] = counts["Global"].get(torch.ops.aten.bmm, 0)
    return terms


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("name, input_size", CASES)
def test_forward_equals_flop_counter(name, input_size, fused_attn):
    model = build(name, input_size, fused_attn).eval()
    x, t, y = model_inputs(model)
    with torch.no_grad():
        total, counts = counted(lambda: model(x, t, y))
    expected = forward_flop_terms(model, BATCH, context_length=context_length(model))
    assert measured_terms(counts) == expected
    assert total == sum(expected.values()) == forward_flops(model, BATCH, context_length=context_length(model))
    # Every term is part of the count: leaving any one out would break the equalities above.
    assert all(flops > 0 for term, flops in expected.items() if term != "context embedder" or context_length(model))


@pytest.mark.parametrize("name, input_size", CASES)
def test_partial_forward_equals_flop_counter(name, input_size):
    """forward_features(…, k): the embeddings and the first k blocks, no final layer; at k = depth for an
    MMDiT, with the last block's pre_only text stream."""
    model = build(name, input_size).eval()
    x, t, y = model_inputs(model)
    for depth in (1, model.depth // 2, model.depth):
        with torch.no_grad():
            total, counts = counted(lambda depth=depth: Features(model, depth)(x, t, y))
        expected = forward_flop_terms(model, BATCH, depth, context_length(model))
        assert expected["final layer"] == 0
        assert measured_terms(counts) == expected, depth
        assert total == forward_flops(model, BATCH, depth, context_length(model)), depth


def untaken_input_gradients(model):
    """Per batch: the input-gradient matmuls the backward skips because the inputs need none, those of the
    patch embedding (of the latents), the timestep MLP's first layer (of the sinusoidal features) and the
    context embedder (of the text contexts)."""
    d = model.hidden_size
    skipped = matmul_flops(model.num_patches, model.in_channels * model.patch_size**2, d)
    skipped += matmul_flops(1, FREQUENCY_EMBEDDING_SIZE, d)
    if getattr(model, "context_dim", None):
        skipped += matmul_flops(CONTEXT_LENGTH, model.context_dim, d)
    return BATCH * skipped


@pytest.mark.parametrize("name, input_size", CASES)
def test_training_pass_is_three_forwards_less_the_input_gradients(name, input_size):
    """Forward and backward of a loss w.r.t. the parameters: every forward matmul has two of the same size
    in the backward (the gradients w.r.t. its input and its weight), except the input gradients of layers
    whose inputs need none."""
    model = build(name, input_size).train()
    x, t, y = model_inputs(model)
    total, _ = counted(lambda: model(x, t, y).square().mean().backward())
    forward = forward_flops(model, BATCH, context_length=context_length(model))
    skipped = untaken_input_gradients(model)
    assert total == training_step_flops(forward) - skipped
    # The convention's overcount: at most 0.5% at these small widths and grids (the MMDiT's 768-wide contexts
    # into 192 channels), 0.0014% for SiT-XL/2 at 256 px (test_sit_xl_closed_form).
    assert 0 < skipped < 0.005 * training_step_flops(forward)


def test_sit_xl_closed_form():
    d, t = XL_WIDTH, XL_TOKENS
    block = 24 * t * d**2 + 4 * t**2 * d + 12 * d**2
    embeddings = 2 * t * 4 * 2**2 * d + 2 * FREQUENCY_EMBEDDING_SIZE * d + 2 * d**2
    final = 4 * d**2 + 2 * t * d * 2**2 * 4
    flops = flops_of("SiT-XL/2", 32)
    print(f"SiT-XL/2 at 256 px: {flops / 1e9:.2f} GFLOP per image forward, "
          f"{training_step_flops(flops) / 1e9:.1f} per training image")
    assert flops == XL_DEPTH * block + embeddings + final
    assert flops_of("SiT-XL/2", 32, depth=1) == embeddings + block
    assert flops_of("SiT-XL/2", 32, depth=2) - flops_of("SiT-XL/2", 32, depth=1) == block
    assert round(flops / 1e9) == SIT_XL_GFLOP
    skipped = 2 * t * 4 * 2**2 * d + 2 * FREQUENCY_EMBEDDING_SIZE * d  # input gradients the backward skips
    assert skipped / training_step_flops(flops) < 2e-5
    assert round(flops_of("DiT-XL/2", 32) / 2e9, 1) == DIT_XL_GMAC


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_count_from_the_name_equals_the_built_models(name):
    with torch.device("meta"):
        model = models.create_model(name, 32)
    length = 77 if models.family_of(name).condition == "text" else None
    assert BackboneShape.of_name(name, 32) == BackboneShape.of_model(model)
    assert flops_of(name, 32, context_length=length) == forward_flops(model, context_length=length)


def test_shape_overrides_as_create_model():
    options = {"depth": 3, "hidden_size": 96, "num_heads": 3, "context_dim": 16, "learn_sigma": True}
    with torch.device("meta"):
        model = models.create_model("MMDiT-D6/4", 16, 8, num_classes=0, **options)
    assert BackboneShape.of_name("MMDiT-D6/4", 16, 8, **options) == BackboneShape.of_model(model)


def test_what_the_count_needs():
    with pytest.raises(ValueError, match="context_length"):
        flops_of("MMDiT-D6/2", 32)
    with pytest.raises(ValueError, match="no text context"):
        flops_of("SiT-S/2", 32, context_length=77)
    with pytest.raises(ValueError, match="depth must be in"):
        flops_of("SiT-S/2", 32, depth=13)
    with pytest.raises(ValueError, match="not divisible"):
        flops_of("SiT-S/4", 30)
