"""MMDiT (models/mmdit.py) against REPA's `models/mmdit.py`, the MS-COCO text-to-image model.

The reference below is this test's own transcription of REPA's forward math in plain torch, written from
REPA's formulas and taking a state dict under REPA's key names: PatchEmbed convolution plus the sin-cos
table cropped from REPA's 16×16 (`pos_embed_max_size`), the timestep embedder (cos first, 256 frequencies,
max period 10000), `context_embedder`, joint blocks attending over [context, image] (`split_qkv`'s
(B, L, 3, heads, head_dim) layout, adaLN `x·(1 + scale) + shift`, gates, the last block's context stream
`pre_only`) and the final layer. REPA's own module was compared once by hand (bench/check_mmdit_against_repa.py,
BENCHMARKS.md); REPA's file needs einops and is not part of this project.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import models
from errors import UserError
from models.transformer import TokenGroups
from tests.helpers import randomize_

TOLERANCE = 1e-5  # max abs difference, float32
REPA_POS_EMBED_MAX_SIZE = 16  # REPA hard-codes the 16×16 table (256 px, patch 2)
REPA_CONTEXT_DIM = 768  # REPA hard-codes context_embedder Linear(768, hidden)
WEIGHT_STD = 0.1  # large enough that every block, the context and the time change the prediction


# --- REPA's forward, transcribed ------------------------------------------------------------------

def sincos_1d(dim, positions):
    """(M,) float64 positions -> (M, dim): [sin(p·ω), cos(p·ω)], ω_k = 10000^(−k / (dim/2))."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_table(dim, grid):
    """REPA's get_2d_sincos_pos_embed: token r·grid + c holds [1-D(c), 1-D(r)] (np.meshgrid(w, h) puts
    the column coordinate first)."""
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


def cropped_pos_embed(dim, h, w, max_size):
    """REPA's cropped_pos_embed: the centred h×w window of its max_size×max_size table, (h·w, dim)."""
    table = sincos_table(dim, max_size).reshape(max_size, max_size, dim)
    top, left = (max_size - h) // 2, (max_size - w) // 2
    return table[top:top + h, left:left + w].reshape(h * w, dim)


def timestep_features(t, dim=256, max_period=10_000, sin_first=False):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half).float()
    args = t.float()[:, None] * freqs[None]
    parts = [args.sin(), args.cos()] if sin_first else [args.cos(), args.sin()]
    return torch.cat(parts, dim=-1)


def linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def layer_norm(x, sd=None, name=None):
    """eps 1e-6 everywhere in REPA's MMDiT; affine only for qk-norm."""
    weight = sd[f"{name}.weight"] if sd is not None and f"{name}.weight" in sd else None
    bias = sd[f"{name}.bias"] if sd is not None and f"{name}.bias" in sd else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps=1e-6)


def repa_modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def stream_qkv(sd, prefix, x, c, heads, mutations):
    """A DismantledBlock's pre_attention: q, k, v (B, L, heads, head_dim) and its modulation chunks."""
    chunks = 2 if f"{prefix}.mlp.fc1.weight" not in sd else 6
    modulation = linear(sd, f"{prefix}.adaLN_modulation.1", F.silu(c)).chunk(chunks, dim=1)
    shift, scale = modulation[:2]
    qkv = linear(sd, f"{prefix}.attn.qkv", repa_modulate(layer_norm(x), shift, scale))
    b, length, width = qkv.shape
    if "heads_before_qkv" in mutations:  # the wrong split: (B, L, heads, 3, head_dim)
        q, k, v = qkv.reshape(b, length, heads, 3, width // 3 // heads).unbind(3)
    else:  # REPA's split_qkv: (B, L, 3, heads, head_dim)
        q, k, v = qkv.reshape(b, length, 3, heads, width // 3 // heads).unbind(2)
    if f"{prefix}.attn.ln_q.weight" in sd:
        q, k = layer_norm(q, sd, f"{prefix}.attn.ln_q"), layer_norm(k, sd, f"{prefix}.attn.ln_k")
    return (q, k, v), modulation[2:]


def stream_post(sd, prefix, x, attended, modulation, mutations):
    gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    x = x + gate_msa[:, None] * linear(sd, f"{prefix}.attn.proj", attended)
    hidden = linear(sd, f"{prefix}.mlp.fc1", repa_modulate(layer_norm(x), shift_mlp, scale_mlp))
    hidden = F.gelu(hidden, approximate="none" if "exact_gelu" in mutations else "tanh")
    return x + gate_mlp[:, None] * linear(sd, f"{prefix}.mlp.fc2", hidden)


def joint_attention(q, k, v):
    """Explicit softmax attention over (B, L, heads, head_dim) -> (B, L, heads·head_dim)."""
    q, k, v = (tensor.transpose(1, 2) for tensor in (q, k, v))
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2)
    return out.reshape(*out.shape[:2], -1)


def repa_forward(sd, x, t, context, heads, feature_depth, pos_embed_max_size=REPA_POS_EMBED_MAX_SIZE,
                 mutations=()):
    """REPA's MMDiT.forward from a state dict: (prediction (N, C_out, H, W), image tokens after block
    `feature_depth`, the raw x stream REPA hands to its projectors). `mutations` are deliberate deviations
    that show the comparison can fail."""
    patch = sd["x_embedder.proj.weight"].shape[-1]
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    if "no_pos_embed" not in mutations:
        tokens = tokens + cropped_pos_embed(tokens.shape[-1], h, w, pos_embed_max_size)
    freq = timestep_features(t, sin_first="sin_first" in mutations)
    c = linear(sd, "t_embedder.mlp.2", F.silu(linear(sd, "t_embedder.mlp.0", freq)))
    context = linear(sd, "context_embedder", context)
    depth = len({key.split(".")[1] for key in sd if key.startswith("joint_blocks.")})
    features = None
    for index in range(depth):
        prefix = f"joint_blocks.{index}"
        if f"skip_block_{index}" not in mutations:
            context_qkv, context_mod = stream_qkv(sd, f"{prefix}.context_block", context, c, heads, mutations)
            x_qkv, x_mod = stream_qkv(sd, f"{prefix}.x_block", tokens, c, heads, mutations)
            # [context, image]; attention itself is blind to the order, the split after it is not.
            attended = joint_attention(*(torch.cat(pair, dim=1) for pair in zip(context_qkv, x_qkv)))
            length = context.shape[1]
            if "split_image_first" in mutations:  # reading the outputs back as if the image came first
                x_out, context_out = attended[:, :-length], attended[:, -length:]
            else:
                context_out, x_out = attended[:, :length], attended[:, length:]
            tokens_next = stream_post(sd, f"{prefix}.x_block", tokens, x_out, x_mod, mutations)
            if context_mod:  # not pre_only
                context = stream_post(sd, f"{prefix}.context_block", context, context_out, context_mod, mutations)
            tokens = tokens_next
        if index + 1 == feature_depth:
            features = tokens
    shift, scale = linear(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = linear(sd, "final_layer.linear", repa_modulate(layer_norm(tokens), shift, scale))
    channels = out.shape[-1] // (patch * patch)
    out = out.reshape(out.shape[0], h, w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], channels, h * patch, w * patch), features


def repa_state_keys(depth, qk_norm=False):
    """The state-dict keys REPA's MMDiT(depth=depth) creates, projectors excluded (no y_embedder: built
    without adm_in_channels; no register; qkv with bias; `Mlp.act` is a module without parameters)."""
    keys = ["pos_embed"]
    keys += [f"{name}.{kind}" for name in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2",
                                            "context_embedder", "final_layer.linear",
                                            "final_layer.adaLN_modulation.1") for kind in ("weight", "bias")]
    for index in range(depth):
        for stream in ("context_block", "x_block"):
            pre_only = stream == "context_block" and index == depth - 1
            layers = ["attn.qkv", "adaLN_modulation.1"]
            if not pre_only:
                layers += ["attn.proj", "mlp.fc1", "mlp.fc2"]
            if qk_norm:
                layers += ["attn.ln_q", "attn.ln_k"]
            keys += [f"joint_blocks.{index}.{stream}.{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    return keys


# --- fixtures ----------------------------------------------------------------------------------------

def small_mmdit(input_size=32, name="MMDiT-D6/2", depth=3, hidden_size=96, num_heads=3, context_dim=16, seed=0,
                std=WEIGHT_STD, **options):
    model = models.create_model(name, input_size=input_size, depth=depth, hidden_size=hidden_size,
                                num_heads=num_heads, context_dim=context_dim, **options)
    return randomize_(model, seed, std=std).eval()


def mmdit_inputs(model, n=2, length=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=generator)
    t = torch.rand(n, generator=generator)
    context = torch.randn(n, length, model.context_dim, generator=generator)
    return x, t, context


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- parity with REPA's math -------------------------------------------------------------------------

PARITY_CASES = {
    # REPA's own shape rule (width 32·depth, depth heads) and its 768-wide contexts, grid 16 (256 px):
    # the crop of the 16×16 table is the identity.
    "grid16-p2-ctx768": dict(name="MMDiT-D6/2", input_size=32, context_dim=REPA_CONTEXT_DIM),
    # Patch 4 at grid 16, with qk-norm (REPA's qk_norm="ln").
    "grid16-p4-qknorm": dict(name="MMDiT-D6/4", input_size=64, qk_norm=True),
    # Grid 8 with a learned variance: REPA's math with a table of the input's own grid (REPA itself
    # runs grid 16 only; this is where the model's docstring says it generalizes).
    "grid8-learn-sigma": dict(name="MMDiT-D6/2", input_size=16, learn_sigma=True),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_prediction_and_block_tokens_match_repas_forward(case):
    options = PARITY_CASES[case]
    model = small_mmdit(**options)
    x, t, context = mmdit_inputs(model)
    sd = model.state_dict()
    grid = model.input_size // model.patch_size
    max_size = REPA_POS_EMBED_MAX_SIZE if grid == REPA_POS_EMBED_MAX_SIZE else grid
    with torch.no_grad():
        for depth in range(1, model.depth + 1):
            prediction, features = model.forward_with_features(x, t, context, depth)
            expected, expected_features = repa_forward(sd, x, t, context, 3, depth, max_size)
            assert prediction.shape == expected.shape == (2, model.out_channels, model.input_size, model.input_size)
            assert features.shape == expected_features.shape == (2, grid * grid, model.hidden_size)
            assert max_diff(prediction, expected) <= TOLERANCE, case
            assert max_diff(features, expected_features) <= TOLERANCE, (case, depth)


def test_parity_comparison_can_fail():
    """Every deviation from REPA's formulas, and dropping any one block, moves the prediction far beyond
    the tolerance at these weights: the parity test would catch it."""
    model = small_mmdit(context_dim=REPA_CONTEXT_DIM)
    x, t, context = mmdit_inputs(model)
    sd = model.state_dict()
    mutations = ["split_image_first", "sin_first", "heads_before_qkv", "exact_gelu", "no_pos_embed",
                 *(f"skip_block_{index}" for index in range(model.depth))]
    with torch.no_grad():
        prediction = model(x, t, context)
        # A table cropped off-centre (REPA's crop of a larger table at a smaller grid) differs too.
        shifted, _ = repa_forward(sd, x, t, context, 3, 1, pos_embed_max_size=18)
        assert max_diff(prediction, shifted) > 100 * TOLERANCE
        for mutation in mutations:
            deviated, _ = repa_forward(sd, x, t, context, 3, 1, mutations=(mutation,))
            assert max_diff(prediction, deviated) > 20 * TOLERANCE, mutation  # exact GELU: 6e-4


def test_position_table_is_repas_buffer():
    model = small_mmdit(context_dim=REPA_CONTEXT_DIM)
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" not in dict(model.named_parameters())
    assert model.pos_embed.shape == (1, 256, 96)
    torch.testing.assert_close(model.pos_embed[0], sincos_table(96, 16), rtol=0, atol=1e-6)
    # randomize_ leaves buffers alone: the table stays fixed whatever the weights.
    assert torch.equal(model.pos_embed, small_mmdit(context_dim=REPA_CONTEXT_DIM, seed=5).pos_embed)


# --- key names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2, 3, 6])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_state_dict_keys_are_repas(depth, qk_norm):
    model = models.create_model("MMDiT-D6/2", input_size=8, depth=depth, hidden_size=32 * depth, num_heads=depth,
                                context_dim=16, qk_norm=qk_norm)
    expected = repa_state_keys(depth, qk_norm)
    assert len(expected) == len(set(expected))
    assert sorted(model.state_dict()) == sorted(expected)
    last = f"joint_blocks.{depth - 1}.context_block"
    assert sorted(key for key in model.state_dict() if key.startswith(last)) == sorted(
        f"{last}.{layer}.{kind}" for layer in ["attn.qkv", "adaLN_modulation.1"]
        + (["attn.ln_q", "attn.ln_k"] if qk_norm else []) for kind in ("weight", "bias"))
    # Shapes as REPA's constructor makes them (width D = 32·depth).
    width = 32 * depth
    sd = model.state_dict()
    assert sd[f"{last}.adaLN_modulation.1.weight"].shape == (2 * width, width)
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (6 * width, width)
    assert sd["joint_blocks.0.x_block.attn.qkv.bias"].shape == (3 * width,)
    if qk_norm:
        assert sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape == (32,)  # per head of 32 channels


# --- a REPA training file ----------------------------------------------------------------------------

def repa_projector_state(hidden_size, projector_dim, z_dim, seed):
    """REPA's projectors.0 = build_mlp(hidden, projector_dim, z_dim): Linear, SiLU, Linear, SiLU, Linear."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {0: (projector_dim, hidden_size), 2: (projector_dim, projector_dim), 4: (z_dim, projector_dim)}
    state = {}
    for index, (rows, cols) in shapes.items():
        state[f"projectors.0.{index}.weight"] = torch.randn(rows, cols, generator=generator) * 0.02
        state[f"projectors.0.{index}.bias"] = torch.randn(rows, generator=generator) * 0.02
    return state


def test_repa_training_file_loads(tmp_path):
    # REPA's MS-COCO shape rule at depth 6 (registered as MMDiT-D6), 256 px latents, 768-wide contexts;
    # the projector is narrower than REPA's 2048 to keep the file small (its keys are what matters).
    ema = randomize_(models.create_model("MMDiT-D6/2", input_size=32), seed=2, std=WEIGHT_STD).eval()
    online = randomize_(models.create_model("MMDiT-D6/2", input_size=32), seed=3, std=WEIGHT_STD)
    projectors = repa_projector_state(192, 64, 768, seed=4)
    args = argparse.Namespace(exp_name="mmdit-repa", output_dir="exps", encoder_depth=8, fused_attn=True,
                              qk_norm=False, resolution=256, batch_size=256, enc_type="dinov2-vit-b",
                              proj_coeff=0.5, path_type="linear", prediction="v", cfg_prob=0.1, weighting="uniform",
                              learning_rate=1e-4, mixed_precision="fp16", report_to="wandb", legacy=False)
    path = tmp_path / "0400000.pt"
    torch.save({"model": {**online.state_dict(), **projectors}, "ema": {**ema.state_dict(), **projectors},
                "opt": {}, "args": args, "steps": 10}, path)
    loaded = models.load_checkpoint(path)
    assert loaded.name == "MMDiT-D6/2" and isinstance(loaded.model, models.MMDiT)
    assert loaded.time_convention == models.DATA_AT_0 and loaded.source == "ema"
    assert set(loaded.extras) == {"projectors"}
    assert set(loaded.extras["projectors"]) == {key.split(".", 1)[1] for key in projectors}
    assert all(torch.equal(loaded.extras["projectors"][key.split(".", 1)[1]], value)
               for key, value in projectors.items())
    x, t, context = mmdit_inputs(loaded.model, length=5)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, context), ema(x, t, context))
    # The family is told by the keys: a bare state dict (no args) loads the same way, and a name of
    # another family or size contradicts the file.
    torch.save({**ema.state_dict(), **projectors}, tmp_path / "ema.pt")
    bare = models.load_checkpoint(tmp_path / "ema.pt")
    assert (bare.name, bare.time_convention, bare.source) == ("MMDiT-D6/2", models.DATA_AT_0, "state_dict")
    assert models.load_checkpoint(tmp_path / "ema.pt", "MMDiT-D6/2").name == "MMDiT-D6/2"
    for name in ("SiT-S/2", "MMDiT-D12/2", "MMDiT-D6/4"):
        with pytest.raises(UserError):
            models.load_checkpoint(tmp_path / "ema.pt", name)


# --- the backbone contract ---------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forward_features_and_forward_with_features(depth):
    model = small_mmdit()
    x, t, context = mmdit_inputs(model)
    captured = {}
    def capture(module, args, output):  # returns None: a hook's return value would replace the output
        captured["x"] = output[1]

    hook = model.joint_blocks[depth - 1].register_forward_hook(capture)
    with torch.no_grad():
        full = model(x, t, context)
        hook.remove()
        features = model.forward_features(x, t, context, depth)
        prediction, features_one_pass = model.forward_with_features(x, t, context, depth)
    assert features.shape == (2, model.num_patches, model.hidden_size)
    assert torch.equal(features, captured["x"])  # the image stream after block `depth`
    assert torch.equal(features_one_pass, features)
    assert torch.equal(prediction, full)


def test_forward_features_runs_only_the_first_blocks():
    model = small_mmdit()
    x, t, context = mmdit_inputs(model)
    with torch.no_grad():
        features = model.forward_features(x, t, context, 1)
        calls = []
        for index, block in enumerate(model.joint_blocks):
            block.register_forward_hook(lambda m, i, o, index=index: calls.append(index))
        model.forward_features(x, t, context, 1)
        assert calls == [0]
        # Blocks after the first may hold anything: the features do not see them, the prediction does.
        for block in model.joint_blocks[1:]:
            for param in block.parameters():
                param.fill_(float("nan"))
        assert torch.equal(model.forward_features(x, t, context, 1), features)
        assert torch.isnan(model(x, t, context)).all()
    for depth in (0, 4):
        with pytest.raises(ValueError, match="feature depth"):
            model.forward_features(x, t, context, depth)
        with pytest.raises(ValueError, match="feature depth"):
            model.forward_with_features(x, t, context, depth)


def test_the_prediction_depends_on_the_context_and_time():
    model = small_mmdit()
    x, t, context = mmdit_inputs(model)
    other = torch.randn(context.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        prediction = model(x, t, context)
        assert torch.equal(model(x, t, context.clone()), prediction)  # same context, same prediction
        assert max_diff(model(x, t, other), prediction) > 100 * TOLERANCE
        assert max_diff(model(x, t.flip(0), context), prediction) > 100 * TOLERANCE
        # Each sample sees its own context only.
        mixed = model(x, t, torch.stack([context[0], other[1]]))
        assert torch.allclose(mixed[0], prediction[0], rtol=0, atol=TOLERANCE)
        assert max_diff(mixed[1], prediction[1]) > 100 * TOLERANCE
        # Text tokens carry no position: the context is a set to the image stream, and any length goes.
        assert max_diff(model(x, t, context[:, torch.randperm(context.shape[1])]), prediction) <= TOLERANCE
        assert model(x, t, context[:, :1]).shape == prediction.shape


def test_the_null_context_is_just_another_context():
    """Guidance and caption dropout hand the model the empty caption's context as data: the model has no
    null embedding of its own, computes a null context with REPA's math like any other, and drops nothing
    itself (train mode equals eval mode)."""
    model = small_mmdit(context_dim=REPA_CONTEXT_DIM)
    x, t, context = mmdit_inputs(model)
    null = torch.zeros_like(context)
    assert not any("null" in key or "uncond" in key or "y_embedder" in key for key in model.state_dict())
    with torch.no_grad():
        expected, _ = repa_forward(model.state_dict(), x, t, null, 3, 1)
        assert max_diff(model(x, t, null), expected) <= TOLERANCE
        # A guidance batch [conditional, null] gives each half as a call of its own would.
        doubled = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]))
        torch.testing.assert_close(doubled, torch.cat([model(x, t, context), model(x, t, null)]),
                                   rtol=0, atol=TOLERANCE)
        eval_out = model(x, t, context)
        model.train()
        assert torch.equal(model(x, t, context), eval_out)


def test_fused_attention_matches_explicit_attention():
    fused = small_mmdit(context_dim=REPA_CONTEXT_DIM, qk_norm=True)
    explicit = models.create_model("MMDiT-D6/2", input_size=32, depth=3, hidden_size=96, num_heads=3,
                                   context_dim=REPA_CONTEXT_DIM, qk_norm=True, fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict(), strict=True)
    assert all(block.fused_attn for block in fused.joint_blocks)
    assert not any(block.fused_attn for block in explicit.joint_blocks)
    x, t, context = mmdit_inputs(fused)
    with torch.no_grad():
        prediction, features = fused.forward_with_features(x, t, context, 2)
        explicit_prediction, explicit_features = explicit.forward_with_features(x, t, context, 2)
    assert max_diff(explicit_prediction, prediction) <= TOLERANCE
    assert max_diff(explicit_features, features) <= TOLERANCE


def test_learn_sigma_doubles_output_channels():
    plain = small_mmdit()
    sigma = small_mmdit(learn_sigma=True)
    assert (plain.out_channels, sigma.out_channels) == (4, 8)
    assert not plain.learn_sigma and sigma.learn_sigma
    assert sigma.final_layer.linear.out_features == 2 * 2 * 8
    x, t, context = mmdit_inputs(sigma)
    with torch.no_grad():
        assert plain(x, t, context).shape == (2, 4, 32, 32)
        assert sigma(x, t, context).shape == (2, 8, 32, 32)


def test_inputs_it_does_not_take_are_errors():
    model = small_mmdit()
    x, t, context = mmdit_inputs(model)
    per_token = t[:, None].expand(-1, model.num_patches)
    groups = TokenGroups(torch.zeros(2, model.num_patches, dtype=torch.long))
    for call in (lambda: model(x, per_token, context),
                 lambda: model.forward_features(x, per_token, context, 1),
                 lambda: model(x, t[:1, None], context)):
        with pytest.raises(ValueError, match="one time per image"):
            call()
    for call in (lambda: model(x, t, context, groups=groups),
                 lambda: model(x, t[:, None], context, groups=groups),
                 lambda: model.forward_with_features(x, t, context, 1, groups=groups)):
        with pytest.raises(ValueError, match="no token groups"):
            call()
    wrong_width = torch.randn(2, 7, 768)
    for bad in (wrong_width, context[:, 0], context[None]):
        with pytest.raises(ValueError, match=r"text context must be \(N, L, 16\)"):
            model(x, t, bad)
    with pytest.raises(ValueError, match=r"\(N, L, 16\)"):
        model.forward_features(x, t, wrong_width, 1)


# --- parameter counts --------------------------------------------------------------------------------

def mmdit_parameter_count(depth, patch=2, in_channels=4, context_dim=768, learn_sigma=False):
    """REPA's MMDiT by its layers: width D = 32·depth; pos_embed is a buffer."""
    d = 32 * depth
    out_channels = 2 * in_channels if learn_sigma else in_channels
    stream = (3 * d * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
    pre_only_stream = (3 * d * d + 3 * d) + (d * 2 * d + 2 * d)
    blocks = (depth - 1) * 2 * stream + stream + pre_only_stream
    patch_embed = in_channels * patch * patch * d + d
    t_embedder = (256 * d + d) + (d * d + d)
    context_embedder = context_dim * d + d
    final_layer = (d * 2 * d + 2 * d) + (d * patch * patch * out_channels + patch * patch * out_channels)
    return blocks + patch_embed + t_embedder + context_embedder + final_layer


@pytest.mark.parametrize("name, depth, expected", [
    ("MMDiT-D6/2", 6, 7_830_544),
    ("MMDiT-D12/2", 12, 62_768_656),
    ("MMDiT-D24/2", 24, 505_070_608),  # REPA's MS-COCO model without its projectors
])
def test_parameter_counts(name, depth, expected):
    assert mmdit_parameter_count(depth) == expected
    with torch.device("meta"):
        model = models.create_model(name, input_size=32, in_channels=4, context_dim=768)
    assert (model.depth, model.hidden_size) == (depth, 32 * depth)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(b.numel() for b in model.buffers()) == 256 * 32 * depth  # pos_embed only
