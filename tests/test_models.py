import pytest
import torch

import models
from models.checkpoint import CHECKPOINT_FORMAT
from tests.helpers import randomize_, tiny_model

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


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_registry_name_builds_and_runs(name):
    family, size, patch = models.parse_model_name(name)
    depth, hidden, heads = models.SIZES[size]
    with torch.device("meta"):  # the full-size model, without paying for its initialization
        full = models.create_model(name)
    assert (len(full.blocks), full.hidden_size, full.patch_size) == (depth, hidden, patch)
    # A 2-block model of the same width and patch runs forward at a tiny input.
    model = models.create_model(name, input_size=16, num_classes=10, depth=2).eval()
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
    fused = tiny_model(fused_attn=True).eval()
    explicit = tiny_model(fused_attn=False).eval()
    x, t, y = inputs()
    torch.testing.assert_close(fused(x, t, y), explicit(x, t, y), rtol=1e-5, atol=1e-6)


def test_qk_norm_adds_public_keys():
    keys = tiny_model(qk_norm=True).state_dict()
    assert "blocks.0.attn.q_norm.weight" in keys and "blocks.0.attn.k_norm.bias" in keys


def test_deterministic_under_fixed_seed():
    x, t, y = inputs()
    torch.manual_seed(123)
    first = randomize_(models.create_model("SiT-S/2", input_size=8, num_classes=10, depth=2), seed=5)(x, t, y)
    torch.manual_seed(123)
    second = randomize_(models.create_model("SiT-S/2", input_size=8, num_classes=10, depth=2), seed=5)(x, t, y)
    assert torch.equal(first, second)


def test_sincos_position_embedding_layout():
    model = tiny_model()
    pos = model.pos_embed[0]  # (T, D): first half encodes the column (w), second half the row (h)
    half = model.hidden_size // 2
    grid = model.input_size // model.patch_size
    assert torch.equal(pos[0, :half], pos[grid, :half])  # same column, next row
    assert torch.equal(pos[0, half:], pos[1, half:])  # same row, next column
    assert not pos.requires_grad


def test_drop_labels():
    y = torch.arange(10)
    assert torch.equal(models.drop_labels(y, 0.0, 10), y)
    assert torch.equal(models.drop_labels(y, 1.0, 10), torch.full_like(y, 10))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(models.drop_labels(y, 0.5, 10, g1), models.drop_labels(y, 0.5, 10, g2))


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
    with pytest.raises(ValueError, match="cannot tell whether"):
        models.load_checkpoint(tmp_path / "s.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
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
