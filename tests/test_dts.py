"""Dual-time scheduling and attention separation (dts/): the backbone's per-token and per-group times
and group attention against closed forms, the group draws, the flags, and a run end to end.
The loss's equality with the release's SiT-SRA_DTS_AS is tests/test_dts_release.py."""
import json

import pytest
import torch

import models
import train
from configs.cli import parse, resolve
from dts import TokenGrouping, TokenGroupsConfig, group_counts, token_map
from errors import UserError
from models import TokenGroups
from tests.helpers import randomize_, tiny_model
from tests.test_train import FAST
from training.setup import check_resumable
from transport.objective import FlowObjective

N, GRID, PATCH = 3, 4, 2  # tiny_model: 8×8 inputs, patch 2 -> 16 tokens
T = GRID * GRID


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, 8, 8, generator=generator)
    t = torch.rand(N, generator=generator)
    y = torch.randint(0, 10, (N,), generator=generator)
    return x, t, y


def random_ids(num_groups=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_groups, (N, T), generator=generator)


def sensitive_model(**options):
    """std 0.1: the outputs move by ~0.04 with the time (by 5e-5 at the helpers' 0.02), so an equality to
    1e-6 below would catch a token at the wrong time."""
    return randomize_(tiny_model("SiT-S/2", **options), std=0.1).eval()


@pytest.fixture(scope="module")
def model():
    return sensitive_model()


def test_a_time_per_token_or_per_group_equal_to_the_images_time_is_the_plain_model(model):
    x, t, y = inputs()
    plain = model(x, t, y)
    assert plain.abs().mean() > 1e-3  # randomized weights: the comparisons below can fail
    per_token = model(x, t[:, None].expand(-1, T), y)
    ids = random_ids()
    per_group = model(x, t[:, None].expand(-1, 2), y, TokenGroups(ids))
    torch.testing.assert_close(per_token, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(per_group, plain, rtol=0, atol=1e-5)


def test_a_time_per_group_equals_the_same_time_given_per_token(model):
    x, _, y = inputs()
    ids = random_ids(num_groups=3)
    times = torch.rand(N, 3)
    per_group = model.forward_with_features(x, times, y, 2, TokenGroups(ids))
    per_token = model.forward_with_features(x, times.gather(1, ids), y, 2)
    assert not torch.allclose(per_token[0], model(x, times[:, 0], y), atol=1e-4)  # the times matter
    torch.testing.assert_close(per_group[0], per_token[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(per_group[1], per_token[1], rtol=0, atol=1e-5)
    separated = model(x, times, y, TokenGroups(ids, separate=True))
    assert not torch.allclose(separated, per_group[0], atol=1e-4)  # and so does the separation


def test_one_group_with_separation_is_no_separation(model):
    x, t, y = inputs()
    one_group = TokenGroups(torch.zeros(N, T, dtype=torch.long), separate=True)
    torch.testing.assert_close(model(x, t[:, None], y, one_group), model(x, t, y), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_separated_groups_are_independent_sequences(fused):
    """With separation, a group's tokens after any block equal the blocks run on that group's tokens
    alone (each keeps its position embedding): one image becomes independent training parts."""
    model = sensitive_model(fused_attn=fused)
    x, _, y = inputs()
    times = torch.rand(N, 2)
    ids = torch.stack([torch.randperm(T) % 2 for _ in range(N)])  # 8 tokens per group, different per image
    grouped = model.forward_features(x, times, y, 3, TokenGroups(ids, separate=True))
    tokens = model.x_embedder(x) + model.pos_embed
    for g in range(2):
        for n in range(N):
            index = (ids[n] == g).nonzero().squeeze(1)
            alone = tokens[n:n + 1, index]
            c = model.t_embedder(times[n:n + 1, g]) + model.y_embedder(y[n:n + 1])
            for block in model.blocks:
                alone = block(alone, c)
            torch.testing.assert_close(grouped[n, index], alone[0], rtol=0, atol=1e-5)


def test_the_model_refuses_a_time_of_the_wrong_shape(model):
    x, _, y = inputs()
    with pytest.raises(ValueError, match=r"t must be \(N,\), \(N, T=16\)"):
        model(x, torch.rand(N, 5), y)


def test_token_map_spreads_each_tokens_value_over_its_patch_in_patch_order():
    values = torch.arange(N * T, dtype=torch.float32).view(N, T)
    tmap = token_map(values, PATCH)
    assert tmap.shape == (N, 1, 8, 8)
    for i in range(GRID):
        for j in range(GRID):
            patch = tmap[:, 0, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH]
            assert torch.equal(patch, values[:, i * GRID + j, None, None].expand(-1, PATCH, PATCH))
    # and the patch embedding reads patches in the same order: a map of constant patches embeds to
    # tokens that depend on their own value only
    model = tiny_model("SiT-S/2")
    embedded = model.x_embedder(tmap.expand(-1, 4, -1, -1))
    alone = model.x_embedder(values[:, 5, None, None, None].expand(-1, 4, PATCH, PATCH))
    torch.testing.assert_close(embedded[:, 5], alone[:, 0], rtol=0, atol=1e-5)


def test_each_token_is_noised_and_regressed_at_its_groups_time():
    objective = FlowObjective()
    x0, eps = torch.randn(N, 4, 8, 8), torch.randn(N, 4, 8, 8)
    grouping = TokenGrouping(TokenGroupsConfig((0.25,), dual_time_scheduling=True), objective, T, PATCH)
    drawn = grouping.draw(N, "cpu")
    x_t = objective.noisy(x0, eps, drawn.time_map())
    target = objective.target(x0, eps, drawn.time_map())
    for g in range(2):
        at_g = objective.noisy(x0, eps, drawn.times[:, g])
        target_g = objective.target(x0, eps, drawn.times[:, g])
        mask = token_map((drawn.ids == g).float(), PATCH).bool().expand_as(x0)
        assert torch.equal(x_t[mask], at_g[mask]) and torch.equal(target[mask], target_g[mask])


@pytest.mark.parametrize("ratios, tokens, counts", [
    ((0.25, 0.75), 256, [64, 192]), ((0.25, 0.75), 16, [4, 12]), ((0.5, 0.3, 0.2), 256, [128, 77, 51]),
    ((0.3, 0.7), 16, [5, 11]), ((1 / 3, 1 / 3, 1 / 3), 16, [6, 5, 5]),
])
def test_group_sizes_floor_then_largest_remainders(ratios, tokens, counts):
    assert group_counts(ratios, tokens) == counts


def test_draws_have_exact_group_sizes_and_whole_images():
    objective = FlowObjective()
    config = TokenGroupsConfig((0.25,), attention_separation=True, full_sample_prob=0.5)
    grouping = TokenGrouping(config, objective, T, PATCH)
    drawn = grouping.draw(64, "cpu", torch.Generator().manual_seed(0))
    whole = (drawn.ids == 1).all(dim=1)
    assert 10 < whole.sum() < 54  # about half the images kept whole
    assert ((drawn.ids[~whole] == 0).sum(dim=1) == 4).all() and ((drawn.ids[~whole] == 1).sum(dim=1) == 12).all()
    assert torch.equal(drawn.times[:, 0], drawn.times[:, 1])  # one time without dual-time scheduling
    assert drawn.groups.separate
    dual = TokenGrouping(TokenGroupsConfig((0.25,), dual_time_scheduling=True), objective, T, PATCH)
    times = dual.draw(64, "cpu").times
    assert (times[:, 0] != times[:, 1]).all() and not dual.draw(1, "cpu").separate


def test_the_release_preset():
    config = resolve("sit-b2-sra-dts-as", {})
    groups, sra = config.groups, config.guidance
    assert groups.ratios == (0.25, 0.75) and groups.dual_time_scheduling and groups.attention_separation
    assert (sra.student_depth, sra.teacher_depth, sra.align_distance, sra.align_weight) == (3, 8, "cosine", 0.5)
    assert (sra.teacher_t, sra.teacher_mask, sra.t_max) == ("sra", True, 0.2)
    assert (config.optim.global_batch_size, config.optim.lr, config.optim.mixed_precision) == (256, 1e-4, "fp16")
    record = json.loads(json.dumps(config.to_dict()))
    assert record["groups"] == {"mask_ratio": [0.25], "dual_time_scheduling": True, "attention_separation": True,
                                "full_sample_prob": 0.0}
    # the same groups train REPA or the baseline; the teacher's settings drop out with SRA
    assert resolve("sit-b2-sra-dts-as", {"guidance": "none"}).groups == groups
    assert resolve("sit-b2-sra-dts-as", {"guidance": "repa"}).guidance.method == "repa"
    assert "groups" not in resolve("sit-b2-sra", {}).to_dict()  # records without groups are unchanged


@pytest.mark.parametrize("argv, message", [
    (["--dual-time-scheduling", "on"], "--dual-time-scheduling on need token groups: give --mask-ratio"),
    (["--mask-ratio", "0.25"], "changes nothing without --dual-time-scheduling on or --attention-separation on"),
    (["--mask-ratio", "1.5", "--dual-time-scheduling", "on"], "--mask-ratio 1.5: one share must be in [0, 1)"),
    (["--mask-ratio", "0.5,0,0.5", "--dual-time-scheduling", "on"], "every share of several must be > 0"),
    (["--mask-ratio", "quarter"], "argument --mask-ratio: expected a share like 0.25"),
    (["--mask-ratio", "0.5,0.3,0.2", "--attention-separation", "on", "--full-sample-prob", "0.1"],
     "--full-sample-prob needs two groups; --mask-ratio gives 3"),
    (["--preset", "sit-b2-sra-dts-as", "--full-sample-prob", "2"], "--full-sample-prob 2.0: must be <= 1"),
    (["--teacher-t", "self_flow"], "--teacher-t set the teacher for token groups"),
    (["--preset", "sit-b2-sra-dts-as", "--teacher-mask", "off"], "--teacher-t sra gives each group its own"),
    (["--model", "DiT-B/2", "--mask-ratio", "0.25"], "--mask-ratio applies to SiT models, not DiT-B/2"),
    (["--preset", "sit-b2-sra-dts-as", "--model", "DiT-B/2"], "token groups (--mask-ratio) train flow-matching"),
    (["--preset", "sit-b2-sra-dts-as", "--guidance", "repa", "--teacher-t", "same"],
     "--teacher-t does not apply to --guidance repa"),
])
def test_refused_group_flags_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse(argv)


def test_runs_recorded_before_the_teacher_group_settings_still_resume():
    record = resolve("sit-b2-sra", {}).to_dict()
    old = json.loads(json.dumps(record))
    del old["guidance"]["teacher_t"], old["guidance"]["teacher_mask"]
    check_resumable(old, record)
    changed = json.loads(json.dumps(record))
    changed["guidance"]["teacher_t"] = "same"
    with pytest.raises(UserError, match="guidance.teacher_t"):
        check_resumable(changed, record)


def test_teacher_labels_default_by_groups_and_old_grouped_runs_keep_theirs():
    """With token groups the teacher sees the labels before CFG dropout (the release's dual-time variant),
    without them the dropped ones (SPEC §3); a grouped run recorded before the setting existed trained with
    the dropped labels, so it resumes only when given them back."""
    assert resolve("sit-b2-sra", {}).guidance.teacher_labels == "dropped"
    grouped = resolve("sit-b2-sra-dts-as", {})
    assert grouped.guidance.teacher_labels == "clean"
    assert resolve("sit-b2-sra", {"teacher_labels": "clean"}).guidance.teacher_labels == "clean"
    old = json.loads(json.dumps(grouped.to_dict()))
    del old["guidance"]["teacher_labels"]
    with pytest.raises(UserError, match="guidance.teacher_labels: 'dropped' -> 'clean'"):
        check_resumable(old, grouped.to_dict())
    check_resumable(old, resolve("sit-b2-sra-dts-as", {"teacher_labels": "dropped"}).to_dict())
    plain = json.loads(json.dumps(resolve("sit-b2-sra", {}).to_dict()))
    del plain["guidance"]["teacher_labels"]
    check_resumable(plain, resolve("sit-b2-sra", {}).to_dict())


GROUPED = ["--mask-ratio", "0.25", "--dual-time-scheduling", "on", "--attention-separation", "on",
           "--ckpt-every", "2", "--sample-every", "0", "--log-every", "1"]


def test_a_grouped_sra_run_resumes_bit_identically_and_samples_as_usual(tmp_path, data_dir):
    def run(where, steps):
        return train.main([*FAST, "--data-dir", data_dir, "--results-dir", str(where), "--max-steps", str(steps),
                           *GROUPED])
    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 4)
    for a, b in [(straight["student"], resumed["student"]), (straight["ema"].model, resumed["ema"].model)]:
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), name
    assert straight["record"]["groups"]["dual_time_scheduling"] is True
    with pytest.raises(UserError, match="groups.attention_separation"):
        train.main([*FAST, "--data-dir", data_dir, "--results-dir", str(tmp_path / "b"), "--max-steps", "5",
                    *GROUPED[:4], *GROUPED[6:]])
    # sampling needs nothing of the groups: the checkpoint loads as a plain SiT, one time per image
    loaded = models.load_checkpoint(tmp_path / "a" / "debug" / "checkpoints" / "step_0000004.pt")
    x = torch.randn(2, loaded.model.in_channels, 8, 8)
    assert torch.isfinite(loaded.model(x, torch.rand(2), torch.zeros(2, dtype=torch.long))).all()


def test_the_baseline_trains_with_groups_too(tmp_path, data_dir):
    result = train.main([*FAST, "--data-dir", data_dir, "--results-dir", str(tmp_path), "--max-steps", "2",
                         "--guidance", "none", *GROUPED])
    assert result["record"]["guidance"] == {"method": "none"} and "groups" in result["record"]
