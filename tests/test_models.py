import argparse

import pytest
import torch

import models
import sampling
from errors import UserError
from models.checkpoint import CHECKPOINT_FORMAT
from models.transformer import Attention
from tests.helpers import RunsCode, project_meta, randomize_, release_with_payload, tiny_model

PUBLIC_KEY_PATTERNS = (
    "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
    "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
    "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
)


def inputs(n=3, size=8, channels=4, num_classes=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=generator)
    t = torch.rand(n, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return x, t, y


@pytest.mark.parametrize("name", [name for name in models.MODEL_NAMES if models.family_of(name).condition == "class"])
def test_every_registry_name_builds_and_runs(name):
    family, size, patch = models.parse_model_name(name)
    depth, hidden, heads = models.model_shape(name)
    with torch.device("meta"):  # the full-size model, without paying for its initialization
        full = models.create_model(name)
    assert (len(full.blocks), full.hidden_size, full.patch_size) == (depth, hidden, patch)
    # A 2-block model of the same width and patch runs forward at a tiny input (randomized: a fresh
    # adaLN-Zero model outputs exact zeros, which are finite whatever the blocks compute).
    model = randomize_(models.create_model(name, input_size=16, num_classes=10, depth=2)).eval()
    x, t, y = inputs(size=16)
    out = model(x, t * 999 if family == "DiT" else t, y)
    assert out.shape == (3, 8 if family == "DiT" else 4, 16, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("DiT-XL/2", {}, 675_129_632),
        ("DiT-B/2", {}, 130_512_416),
        ("DiT-XL/2", {"learn_sigma": False}, 675_111_184),
    ],
)
def test_parameter_counts_match_public_release(name, options, expected):
    with torch.device("meta"):
        model = models.create_model(name, **options)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_public_key_names():
    keys = set(tiny_model().state_dict())
    assert set(PUBLIC_KEY_PATTERNS) <= keys
    assert all(k.split(".")[0] in {"x_embedder", "t_embedder", "y_embedder", "pos_embed", "blocks", "final_layer"}
               for k in keys)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forward_features_equals_full_pass_hidden_state(depth):
    model = tiny_model().eval()
    x, t, y = inputs()
    captured = {}
    hook = model.blocks[depth - 1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    full = model(x, t, y)
    hook.remove()
    features = model.forward_features(x, t, y, depth)
    assert features.shape == (3, model.num_patches, model.hidden_size)
    assert torch.equal(features, captured["h"])
    pred, features_one_pass = model.forward_with_features(x, t, y, depth)
    assert torch.equal(pred, full)
    assert torch.equal(features_one_pass, features)


def test_forward_features_runs_only_the_first_blocks():
    model = tiny_model().eval()
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, i, o, index=index: calls.append(index))
    model.forward_features(*inputs(), depth=2)
    assert calls == [0, 1]
    with pytest.raises(ValueError, match="feature depth"):
        model.forward_features(*inputs(), depth=4)


def test_output_channels_and_learn_sigma():
    assert tiny_model("DiT-S/2").out_channels == 8
    assert tiny_model("SiT-S/2").out_channels == 4
    assert tiny_model("SiT-S/2", learn_sigma=True).out_channels == 8


def test_fused_attention_matches_explicit_attention():
    """One attention layer with weights large enough that its attention is far from uniform; inside
    a randomize_d model (std 0.02) the logits are so small that even averaging the values would pass."""
    fused = randomize_(Attention(32, num_heads=2, fused_attn=True), seed=3, std=0.3)
    explicit = Attention(32, num_heads=2, fused_attn=False)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    out = fused(x)
    torch.testing.assert_close(explicit(x), out, rtol=1e-5, atol=1e-5)
    # The comparison can fail: uniform attention (the mean of the values) is far from it.
    n, tokens, _ = x.shape
    v = fused.qkv(x).reshape(n, tokens, 3, 2, 16)[:, :, 2]  # (N, T, H, Dh)
    uniform = fused.proj(v.mean(1, keepdim=True).expand_as(v).reshape(n, tokens, 32))
    assert (out - uniform).abs().max() > 0.1
    # And the model passes the flag to every block.
    assert not any(block.attn.fused_attn for block in tiny_model(fused_attn=False).blocks)


def test_qk_norm_adds_public_keys():
    keys = tiny_model(qk_norm=True).state_dict()
    assert "blocks.0.attn.q_norm.weight" in keys and "blocks.0.attn.k_norm.bias" in keys


def test_initialization_is_deterministic_under_a_fixed_seed():
    """create_model draws its initial weights from the global torch seed and nothing else. The weights
    are compared, not outputs: a fresh adaLN-Zero model outputs zeros whatever its other weights."""
    def initial_weights(seed):
        torch.manual_seed(seed)
        return models.create_model("SiT-S/2", input_size=8, num_classes=10, depth=2).state_dict()

    first, second, other = initial_weights(123), initial_weights(123), initial_weights(124)
    assert all(torch.equal(first[key], second[key]) for key in first)
    # Every randomly initialized tensor changes with the seed, so the equality above is not that of
    # constants; the zero-initialized ones (adaLN-Zero, biases) and the fixed pos_embed do not.
    seeded = {key for key in first if not torch.equal(first[key], other[key])}
    assert seeded == {key for key, value in first.items() if key.endswith("weight") and value.abs().sum() > 0}
    assert {"x_embedder.proj.weight", "y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight",
            "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.weight"} <= seeded


def test_sincos_position_embedding_layout():
    model = tiny_model()
    pos = model.pos_embed[0]  # (T, D): first half encodes the column (w), second half the row (h)
    half = model.hidden_size // 2
    grid = model.input_size // model.patch_size
    assert torch.equal(pos[0, :half], pos[grid, :half])  # same column, next row
    assert torch.equal(pos[0, half:], pos[1, half:])  # same row, next column
    assert not pos.requires_grad

    # The values (a constant embedding would pass the checks above): token (row r, column c) holds
    # [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)], ω_k = 10000^(−k / (D/4)) (DiT release).
    omega = 1.0 / 10_000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))

    def sincos(position):
        return torch.cat([torch.sin(position * omega), torch.cos(position * omega)]).float()

    row, column = 2, 3
    torch.testing.assert_close(pos[row * grid + column], torch.cat([sincos(column), sincos(row)]))


def test_drop_labels():
    y = torch.arange(10)
    assert torch.equal(models.drop_labels(y, 0.0, 10), y)
    assert torch.equal(models.drop_labels(y, 1.0, 10), torch.full_like(y, 10))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(models.drop_labels(y, 0.5, 10, g1), models.drop_labels(y, 0.5, 10, g2))
    # Equal draws from equal generators hold for any function of the generator, dropping nothing
    # included: at 0.5 a large batch loses about half its labels, and another seed loses others.
    labels = torch.arange(2000) % 10
    dropped = models.drop_labels(labels, 0.5, 10, torch.Generator().manual_seed(0)) == 10
    assert 900 < dropped.sum() < 1100
    assert not torch.equal(dropped, models.drop_labels(labels, 0.5, 10, torch.Generator().manual_seed(1)) == 10)


# --- checkpoints ---------------------------------------------------------------------------------

def assert_same_weights(model, state_dict):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


def test_bare_state_dict_round_trips_strict(tmp_path):
    # A tiny width has no registry size, so build the name from the registry size the test sets.
    model = randomize_(models.create_model("SiT-S/2", input_size=8, num_classes=10, depth=12))
    path = tmp_path / "release.pt"
    torch.save(model.state_dict(), path)
    loaded = models.load_checkpoint(path, "SiT-S/2")
    assert loaded.source == "state_dict" and loaded.name == "SiT-S/2"
    assert loaded.time_convention == models.DATA_AT_1  # a bare SiT file: the SiT release's convention
    assert_same_weights(loaded.model, model.state_dict())
    x, t, y = inputs()
    assert torch.equal(loaded.model(x, t, y), model.eval()(x, t, y))


def test_wrapped_training_file_prefers_ema(tmp_path):
    model = randomize_(models.create_model("DiT-S/4", input_size=8, num_classes=10, depth=12), seed=1)
    online = {k: v + 1 for k, v in model.state_dict().items()}
    path = tmp_path / "train.pt"
    torch.save({
        "model": {"module." + k: v for k, v in online.items()},
        "ema": {"module._orig_mod." + k: v for k, v in model.state_dict().items()},
        "opt": {}, "steps": 7,
    }, path)
    loaded = models.load_checkpoint(path, "DiT-S/4")
    assert loaded.source == "ema" and loaded.time_convention == models.DISCRETE_STEPS
    assert_same_weights(loaded.model, model.state_dict())
    assert models.load_checkpoint(path, "DiT-S/4", prefer="model").source == "model"


def test_sra_and_repa_extras_are_split_off(tmp_path):
    model = randomize_(models.create_model("SiT-S/2", input_size=8, num_classes=10, depth=12))
    head = {"ap_head.linear1.weight": torch.randn(768, 384), "ap_head.linear2.weight": torch.randn(384, 768)}
    torch.save({"ema": {**model.state_dict(), **head}}, tmp_path / "sra.pt")
    loaded = models.load_checkpoint(tmp_path / "sra.pt", "SiT-S/2")
    assert set(loaded.extras["ap_head"]) == {"linear1.weight", "linear2.weight"}
    assert loaded.time_convention == models.DATA_AT_0
    projectors = {"projectors.0.0.weight": torch.randn(2, 2)}
    torch.save({**model.state_dict(), **projectors}, tmp_path / "repa.pt")
    loaded = models.load_checkpoint(tmp_path / "repa.pt")  # REPA is SiT-only: the family is inferred
    assert loaded.name == "SiT-S/2" and loaded.time_convention == models.DATA_AT_0
    assert "projectors" in loaded.extras


def test_unknown_and_mismatched_keys_fail_clearly(tmp_path):
    model = models.create_model("SiT-S/2", input_size=8, num_classes=10, depth=12)
    state = {**model.state_dict(), "blocks.0.extra_gate.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.extra_gate\.weight"):
        models.load_checkpoint(tmp_path / "bad.pt", "SiT-S/2")
    state = dict(model.state_dict())
    del state["blocks.3.mlp.fc2.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.3\.mlp\.fc2\.bias"):
        models.load_checkpoint(tmp_path / "missing.pt", "SiT-S/2")
    with pytest.raises(ValueError, match="SiT-B/2 has depth 12, width 768"):
        torch.save(model.state_dict(), tmp_path / "s.pt")
        models.load_checkpoint(tmp_path / "s.pt", "SiT-B/2")
    with pytest.raises(UserError, match="cannot tell whether"):
        models.load_checkpoint(tmp_path / "s.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        models.load_checkpoint(tmp_path / "absent.pt")


def test_project_checkpoint_loads_without_flags(tmp_path):
    model = tiny_model("SiT-S/2", seed=3)
    ema = tiny_model("SiT-S/2", seed=4)
    torch.save({
        "format": CHECKPOINT_FORMAT,
        "meta": models.checkpoint_metadata(model, models.DATA_AT_0),
        "model": model.state_dict(), "ema": ema.state_dict(),
    }, tmp_path / "ours.pt")
    loaded = models.load_checkpoint(tmp_path / "ours.pt")
    assert loaded.name == "SiT-S/2" and loaded.time_convention == models.DATA_AT_0
    assert_same_weights(loaded.model, ema.state_dict())


def release_model(name="SiT-T/2", seed=0):
    """A backbone of the smallest registered size (releases load by registered name) at 8×8."""
    return randomize_(models.create_model(name, input_size=8, num_classes=10), seed)


def release_namespace(**fields):
    """An `args` Namespace as the REPA/SRA train.py scripts pickle it: strings, ints, floats, bools,
    None and lists."""
    return argparse.Namespace(
        model="SiT-XL/2", output_dir="exps", exp_name="sit-xl2", resolution=256, batch_size=256,
        learning_rate=1e-4, adam_beta1=0.9, allow_tf32=True, fused_attn=False, resume_step=0, report_to=None,
        enc_type="dinov2-vit-b", proj_coeff=0.5, path_type="linear", cfg_prob=0.1, block_pair=[8, 20],
        **fields,
    )


@pytest.mark.parametrize("payload, refused", [
    ("shell", r"posix\.system"),  # os.system, the classic payload
    ("python", r"builtins\.exec"),  # which torch's message names without its module
])
def test_release_with_a_code_payload_is_refused_without_running_it(tmp_path, payload, refused):
    model = release_model()
    marker = tmp_path / "payload-ran"
    runs_code = (RunsCode(command=f"touch '{marker}'") if payload == "shell"
                 else RunsCode(source=f"open({str(marker)!r}, 'w').close()"))
    path = release_with_payload(tmp_path / "release.pt", model.state_dict(), runs_code)
    for load in (lambda: models.load_checkpoint(path, "SiT-T/2"), lambda: sampling.training_info(path)):
        with pytest.raises(UserError, match=rf"release\.pt was not loaded: it pickles {refused}.*would run code"):
            load()
        assert not marker.exists()
    # The payload is real: an unrestricted unpickler runs it (what the loader used to fall back to).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_release_namespace_args_load_and_decide_the_time_convention(tmp_path):
    """The public training files' pickled argparse.Namespace loads with the weights-only unpickler; its
    `encoder_depth` (REPA/SRA scripts) marks t = 0 as data, its absence the SiT release's t = 1."""
    model = release_model()
    repa = release_with_payload(tmp_path / "repa.pt", model.state_dict(), release_namespace(encoder_depth=8))
    loaded = models.load_checkpoint(repa, "SiT-T/2")
    assert loaded.source == "ema" and loaded.time_convention == models.DATA_AT_0
    assert_same_weights(loaded.model, model.state_dict())
    assert sampling.training_info(repa) == {"objective": None, "vae": None, "data_dir": None, "condition": None}
    sit = release_with_payload(tmp_path / "sit.pt", model.state_dict(), release_namespace())
    assert models.load_checkpoint(sit, "SiT-T/2").time_convention == models.DATA_AT_1
    # A Namespace may carry plain values only: anything else is refused by its type.
    odd = release_with_payload(tmp_path / "odd.pt", model.state_dict(), release_namespace(data_dir=tmp_path))
    with pytest.raises(UserError, match=r"it pickles pathlib\.\w*Path"):
        models.load_checkpoint(odd, "SiT-T/2")


def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path):
    model = release_model()
    torch.save(model.state_dict(), tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    integer_weights = {**model.state_dict(), "blocks.0.mlp.fc1.weight": torch.zeros(768, 192, dtype=torch.long)}
    cases = {
        "truncated.pt": (whole[: len(whole) // 2], "not a readable checkpoint"),
        "garbage.pt": (bytes(range(256)) * 4, "not a readable checkpoint"),
        "empty.pt": (b"", "not a readable checkpoint"),
        "text.pt": (b"hello\n", "not a readable checkpoint"),
        "list.pt": ([1, 2], "holds a list"),
        "no-weights.pt": ({"steps": 3}, "no 'ema' or 'model' state dict"),
        "nested.pt": ({"ema": {"blocks": {"0": torch.zeros(1)}}}, "'ema' entry is not a state dict: blocks"),
        "half.pt": ({"ema": {"pos_embed": torch.zeros(1, 16, 192)}}, "not a DiT/SiT state dict: missing"),
        "integers.pt": (integer_weights, r"dtype mismatch keys: blocks\.0\.mlp\.fc1\.weight: checkpoint torch\.int64"),
        "meta.pt": ({"format": CHECKPOINT_FORMAT, "meta": {"model": "SiT-T/2"}, "ema": model.state_dict()},
                    "metadata .* is malformed"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(UserError, match=match) as caught:
            models.load_checkpoint(path, "SiT-T/2")
        message = str(caught.value)
        assert name in message and "\n" not in message and "weights_only=False" not in message, message
    with pytest.raises(UserError, match=r"not a readable checkpoint"):
        sampling.training_info(tmp_path / "garbage.pt")  # refused there too, not taken for a release


def test_the_files_own_metadata_wins_over_a_contradicting_name(tmp_path):
    dit = tiny_model("DiT-S/4")
    ours = tmp_path / "ours.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "meta": project_meta(dit, "DiT-S/4"), "ema": dit.state_dict()}, ours)
    with pytest.raises(UserError, match=r"ours\.pt: the checkpoint holds DiT-S/4 \(its metadata\); "
                                        r"--model SiT-S/4 contradicts it"):
        models.load_checkpoint(ours, "SiT-S/4")
    assert models.load_checkpoint(ours, "DiT-S/4").name == "DiT-S/4"  # agreeing is fine
    with pytest.raises(UserError, match=r"time convention ddpm \(its metadata\); --time-convention data_at_0"):
        models.load_checkpoint(ours, time_convention=models.DATA_AT_0)
    assert models.load_checkpoint(ours, time_convention=models.DISCRETE_STEPS).time_convention == "ddpm"

    # REPA's projectors say SiT; a bare state dict says nothing, so either family's name is taken.
    sit = release_model()
    torch.save({**sit.state_dict(), "projectors.0.0.weight": torch.randn(2, 2)}, tmp_path / "repa.pt")
    with pytest.raises(UserError, match=r"holds a SiT model \(its REPA projectors\); --model DiT-T/2 contradicts"):
        models.load_checkpoint(tmp_path / "repa.pt", "DiT-T/2")
    assert models.load_checkpoint(tmp_path / "repa.pt", "SiT-T/2").name == "SiT-T/2"
    torch.save(sit.state_dict(), tmp_path / "bare.pt")
    for name in ("SiT-T/2", "DiT-T/2"):
        assert models.load_checkpoint(tmp_path / "bare.pt", name).name == name
    # A release's time convention may be overridden, but only by one its family can have.
    assert models.load_checkpoint(tmp_path / "bare.pt", "SiT-T/2", time_convention="data_at_0").time_convention \
        == models.DATA_AT_0
    with pytest.raises(UserError, match="DiT-T/2 is a ddpm model; --time-convention data_at_1 contradicts it"):
        models.load_checkpoint(tmp_path / "bare.pt", "DiT-T/2", time_convention=models.DATA_AT_1)


# --- classifier-free guidance --------------------------------------------------------------------

class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.batches = model, model.num_classes, []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


def test_cfg_scale_one_and_interval_use_one_conditional_call():
    model = CountingModel(tiny_model("DiT-S/2").eval())
    x, t, y = inputs()
    plain = model.model(x, t, y)
    fn = models.guided_model_fn(model, y, scale=1.0)
    assert torch.equal(fn(x, t, 0.5), plain) and model.batches == [3]
    fn = models.guided_model_fn(model, y, scale=4.0, interval=(0.0, 0.7))
    assert torch.equal(fn(x, t, 0.9), plain) and model.batches == [3, 3]  # outside: conditional only
    fn(x, t, 0.7)  # the interval is inclusive
    assert model.batches == [3, 3, 6]


@pytest.mark.parametrize("guide_channels", [None, models.RELEASE_DIT_GUIDED_CHANNELS])
def test_cfg_formula(guide_channels):
    model = tiny_model("DiT-S/2").eval()
    x, t, y = inputs()
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, model.num_classes))
    out = models.cfg_forward(model, x, t, y, 2.5, guide_channels)
    c = 4 if guide_channels is None else guide_channels
    torch.testing.assert_close(out[:, :c], uncond[:, :c] + 2.5 * (cond[:, :c] - uncond[:, :c]))
    torch.testing.assert_close(out[:, c:], cond[:, c:])  # variance range (and unguided channels): conditional
