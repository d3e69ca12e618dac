"""Exactness of dual-time scheduling (DTS) + attention separation (AS) against the SRA authors' release
`SiT-SRA_DTS_AS` (its loss.py and model.py, docs/SPEC.md §7).

The release cannot be imported here (it lives in a git mirror and needs timm's modules), so this file
holds an independent reference: the release's formulas rewritten from scratch on plain tensors, fed the
project's weights. Both sides get the same weights, images, noise, group ids, group times and Δ — the
draws are injected (a hand-made `DrawnGroups`, a patched `draw_delta`), except in the last loss test,
which replays the release's order of random draws from one seed.

What the reference computes, as the release does:
- student: every group's noisy version of the image (stacked along the batch, group-major) is patch-
  embedded, pos_embed added, and each token takes the embedding of its own group's version; the
  conditioning is per token (time embedding of the (N, T) per-token times + label embedding), each
  block's adaLN modulation is a Linear on the (N·T, D) conditioning and modulates per token; with AS
  the attention logits of query/key pairs from different groups are set to finfo.min before softmax;
  the alignment feature is the output of block k_s through the head (Linear D->2D, SiLU, Linear);
  the prediction is in token form and compared with the patchified targets (order nchpwq->nhwpqc),
  gathered by group id;
- L_gen = mean over (T, p²C) per image of (out − gt_token)², then the batch mean;
- teacher (eval: raw block-k_T tokens) per --teacher-t / --teacher-mask, see `release_loss`;
- L_align = mean of 1 − cos over the FEATURE dimension. The release literally calls
  F.cosine_similarity(a, b) with the default dim=1, the token axis of (N, T, D): a bug this project
  does not copy (SPEC §3 step 6); `test_release_literal_cosine_is_over_tokens` pins the difference.
Linear path, velocity: x_t = (1 − t)·x0 + t·ε, target ε − x0 (t = 0 is data).

Tolerances (float32): predictions and tokens are O(0.1–1) and the losses O(0.01–1); the two sides
differ only in summation order (SDPA vs an explicit softmax, one conv on a time-mapped image vs G
stacked convs), observed ≤ ~1e-6. Asserted: atol = ATOL (2e-6) · max(1, max |value|), rtol = 1e-5.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sra.method as sra_method
from dts import DrawnGroups, TokenGrouping, TokenGroupsConfig, group_counts
from guidance import AlignmentInputs, GuidanceContext, Student, TrainingLoss
from sra.head import ProjectionHead
from tests.helpers import randomize_, tiny_model
from transport.objective import FlowObjective

MODEL = "SiT-T/2"  # at input 8 with patch 2: T = 16 tokens
PATCH = 2
TOKENS = 16
DEPTH, WIDTH, HEADS = 4, 32, 2
STUDENT_DEPTH, TEACHER_DEPTH = 2, 3  # k_s, k_T (the release's block_out_s / block_out_t)
T_MAX = 0.2  # the release's interval: Δ = 0.2·U(0, 1)
ATOL = 2e-6
RTOL = 1e-5
NULL_CLASS = 10


def assert_close(actual, expected, what):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{what}: {m}")
    return (actual - expected).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# The reference: the release's formulas on plain tensors
# ----------------------------------------------------------------------------------------------------

def ref_patchify(images, p=PATCH):
    """(N, C, H, W) -> (N, T, p·p·C), the release's 'nchpwq->nhwpqc' order."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def ref_pick_by_group(stacked, ids):
    """stacked (G·N, T, ...) group-major (versions of group 0 for every image, then group 1, …) and
    ids (N, T) -> (N, T, ...), each token from its group's version (select by equality, as the release's
    `_mix_group_scalars`; the release's `mix_group_tokens` gathers the same values)."""
    n = ids.shape[0]
    versions = stacked.reshape(-1, n, *stacked.shape[1:])
    picked = versions[0].clone()
    extra = (1,) * (picked.ndim - 2)
    for g in range(1, versions.shape[0]):
        picked = torch.where((ids == g).view(*ids.shape, *extra), versions[g], picked)
    return picked


def ref_per_token_scalar(per_group, ids):
    """(N, G) one value per group -> (N, T) per token."""
    picked = per_group[:, :1].expand_as(ids).clone()
    for g in range(1, per_group.shape[1]):
        picked = torch.where(ids == g, per_group[:, g:g + 1].expand_as(ids), picked)
    return picked


def ref_time_frequencies(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def ref_forward(sd, images, t_tok, y, ids, separate, feature_block, head=None):
    """The release's SiT.forward(..., return_token=True): (prediction tokens (N, T, p²C), alignment
    feature (N, T, D)). images: (G·N, C, H, W) stacked group versions with ids (N, T) (mixed mode), or
    (N, C, H, W) with ids None (normal mode); t_tok (N, T) per-token times; head: the student's ap_head
    weights (training mode), None for the teacher (eval: raw tokens)."""
    x = F.conv2d(images, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    allow = None
    if ids is not None:
        x = ref_pick_by_group(x, ids)
        if separate:
            allow = ids[:, :, None] == ids[:, None, :]  # (N, T, T), True = may attend
    n, tokens, dim = x.shape
    hidden = F.silu(F.linear(ref_time_frequencies(t_tok.reshape(-1)), sd["t_embedder.mlp.0.weight"],
                             sd["t_embedder.mlp.0.bias"]))
    t_emb = F.linear(hidden, sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"]).reshape(n, tokens, dim)
    c = t_emb + sd["y_embedder.embedding_table.weight"][y][:, None, :]
    c_rows = F.silu(c.reshape(n * tokens, dim))
    head_dim = dim // HEADS
    feature = None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        block = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        w = block.__getitem__
        mod = F.linear(c_rows, w("adaLN_modulation.1.weight"), w("adaLN_modulation.1.bias")).reshape(n, tokens, 6 * dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.split(dim, dim=-1)
        h = F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale1) + shift1
        qkv = F.linear(h, w("attn.qkv.weight"), w("attn.qkv.bias")).reshape(n, tokens, 3, HEADS, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
        if allow is not None:
            logits = logits.masked_fill(~allow[:, None], torch.finfo(logits.dtype).min)
        attn = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, tokens, dim)
        x = x + gate1 * F.linear(attn, w("attn.proj.weight"), w("attn.proj.bias"))
        h = F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale2) + shift2
        h = F.gelu(F.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias")), approximate="tanh")
        x = x + gate2 * F.linear(h, w("mlp.fc2.weight"), w("mlp.fc2.bias"))
        if i + 1 == feature_block:
            if head is None:
                feature = x
            else:
                feature = F.linear(F.silu(F.linear(x, head["linear1.weight"], head["linear1.bias"])),
                                   head["linear2.weight"], head["linear2.bias"])
    mod = F.linear(c_rows, sd["final_layer.adaLN_modulation.1.weight"],
                   sd["final_layer.adaLN_modulation.1.bias"]).reshape(n, tokens, 2 * dim)
    shift, scale = mod.split(dim, dim=-1)
    out = F.linear(F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale) + shift, sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    return out, feature


def release_loss(student_sd, head_sd, teacher_sd, x0, eps, y, ids, times, delta, teacher_t, teacher_mask,
                 separate, distance="cosine", dropped=None):
    """SRALoss.__call__ of the release for given draws; times and delta (N, G); dropped: (N,) bool, the
    labels the student's embedder drops for CFG (training mode), which the teacher (eval mode) keeps.
    Returns every piece."""
    n, num_groups = times.shape
    y_student = y if dropped is None else torch.where(dropped, NULL_CLASS, y)
    at = lambda t, x, e: (1 - t.view(n, 1, 1, 1)) * x + t.view(n, 1, 1, 1) * e  # noqa: E731
    group_inputs = torch.cat([at(times[:, g], x0, eps) for g in range(num_groups)])
    group_targets = torch.cat([eps - x0 for _ in range(num_groups)])  # d_alpha·x0 + d_sigma·ε, linear path
    t_tok = ref_per_token_scalar(times, ids)
    out, xr = ref_forward(student_sd, group_inputs, t_tok, y_student, ids, separate, STUDENT_DEPTH, head_sd)
    gt_token = ref_pick_by_group(ref_patchify(group_targets), ids)
    gen = ((out - gt_token) ** 2).mean(dim=(1, 2)).mean()

    t_min = times.min(dim=1).values
    if teacher_mask:
        teacher_ids = ids
        if teacher_t == "sra":
            t_teacher = (times - delta).clamp(0, 1)
            teacher_input = torch.cat([at(t_teacher[:, g], x0, eps) for g in range(num_groups)])
            teacher_t_tok = ref_per_token_scalar(t_teacher, ids)
        elif teacher_t == "same":
            teacher_input, teacher_t_tok = group_inputs, t_tok
        elif teacher_t == "self_flow":
            teacher_input = torch.cat([at(t_min, x0, eps)] + [x0] * (num_groups - 1))
            teacher_t_tok = t_min[:, None].expand(n, TOKENS)
        else:
            raise NotImplementedError(teacher_t)
    else:
        assert teacher_t == "self_flow"
        teacher_ids, teacher_input = None, at(t_min, x0, eps)
        teacher_t_tok = t_min[:, None].expand(n, TOKENS)
    target = ref_forward(teacher_sd, teacher_input, teacher_t_tok, y, teacher_ids, separate, TEACHER_DEPTH)[1]

    if distance == "cosine":
        align = (1 - F.cosine_similarity(xr, target, dim=-1)).mean()  # over the feature dim (SPEC)
    elif distance == "smooth_l1":
        align = F.smooth_l1_loss(xr, target, beta=0.05)  # release "sml1": mean over every element
    else:
        raise NotImplementedError(distance)
    literal_cos = (1 - F.cosine_similarity(xr, target)).mean()  # the release's literal dim=1 (tokens)
    return {"out": out, "gt_token": gt_token, "xr": xr, "target": target, "gen": gen, "align": align,
            "literal_cos": literal_cos}


# ----------------------------------------------------------------------------------------------------
# The project's side, and shared fixtures
# ----------------------------------------------------------------------------------------------------

def make_models(fused_attn=True):
    student = tiny_model(MODEL, seed=1, depth=DEPTH, hidden_size=WIDTH, num_heads=HEADS, fused_attn=fused_attn)
    teacher = tiny_model(MODEL, seed=2, depth=DEPTH, hidden_size=WIDTH, num_heads=HEADS, fused_attn=fused_attn)
    # std 0.1 (not tiny_model's 0.02): outputs O(0.1–1), so a wrong formula cannot hide under atol
    randomize_(student, 1, std=0.1)
    randomize_(teacher, 2, std=0.1)
    teacher.eval().requires_grad_(False)
    head = randomize_(ProjectionHead(WIDTH), 3, std=0.1)
    return student, head, teacher


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def make_batch(n, seed=5):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=generator)
    eps = torch.randn(n, 4, 8, 8, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return x0, eps, y


def make_ids(ratios, n, full_row, seed=7):
    config = TokenGroupsConfig(mask_ratio=ratios, dual_time_scheduling=True, attention_separation=True)
    grouping = TokenGrouping(config, FlowObjective(), TOKENS, PATCH)
    ids = grouping.draw_ids(n, "cpu", torch.Generator().manual_seed(seed))
    if full_row:
        ids[-1] = 1  # an image kept whole (--full-sample-prob): every token in the second group
    return ids


def make_times(n, num_groups, dual_time, seed=11):
    generator = torch.Generator().manual_seed(seed)
    times = torch.rand(n, num_groups, generator=generator)
    times[0, 0] = 0.04  # t − Δ < 0 for this group: the clamp at 0 is exercised
    if not dual_time:
        times = times[:, :1].expand(-1, num_groups).contiguous()
    delta = T_MAX * torch.rand(n, num_groups, generator=generator)
    delta[0, 0] = 0.15
    return times, delta


def sra_guidance(teacher, student, teacher_t, teacher_mask, distance="cosine"):
    config = sra_method.SRAConfig(student_depth=STUDENT_DEPTH, teacher_depth=TEACHER_DEPTH, t_max=T_MAX,
                                  align_distance=distance, teacher_t=teacher_t, teacher_mask=teacher_mask)
    return sra_method.SRA(config, GuidanceContext(FlowObjective(), teacher, student, torch.device("cpu")))


def inject_delta(monkeypatch, delta):
    """sra.method.draw_delta returns `delta` (N, G) laid out group-major, as the release draws it (all
    images' Δ of group 0, then group 1, …); records its calls."""
    calls = []

    def fixed_delta(objective, n, t_max, fixed, device, generator=None):
        calls.append((n, t_max, fixed))
        assert n == delta.numel()
        return delta.T.reshape(-1).clone()

    monkeypatch.setattr(sra_method, "draw_delta", fixed_delta)
    return calls


def project_pieces(student_model, head, guidance, x0, eps, y, drawn):
    """What TrainingLoss.__call__ computes, from given groups and noise."""
    objective = FlowObjective()
    student = Student(student_model, head, STUDENT_DEPTH)
    where = drawn.time_map()
    x_t = objective.noisy(x0, eps, where)
    prediction, projected = student(x_t, objective.model_time(drawn.times), y, drawn.groups)
    gen = objective.loss(prediction, x0, eps, where, x_t).mean()
    with torch.no_grad():
        target = guidance.target(AlignmentInputs(x0, eps, drawn.times, y, None, drawn))
    align = guidance.distance(projected, target).mean()
    return {"out": ref_patchify(prediction), "xr": projected, "target": target, "gen": gen, "align": align}


# (mask ratios, attention separation, dual-time, teacher_t, teacher_mask, full-sample row, distance, fused)
CASES = [
    pytest.param((0.25,), sep, True, tt, tm, True, "cosine", True, id=f"G2-{tt}-mask{int(tm)}-AS{int(sep)}")
    for sep in (True, False)
    for tt, tm in (("sra", True), ("same", True), ("self_flow", True), ("self_flow", False))
] + [
    pytest.param((0.25,), True, False, "sra", True, True, "cosine", True, id="G2-sra-AS1-single-time"),
    pytest.param((0.25,), True, True, "sra", True, False, "smooth_l1", True, id="G2-sra-AS1-smoothl1"),
    pytest.param((0.25,), True, True, "sra", True, True, "cosine", False, id="G2-sra-AS1-explicit-attn"),
    pytest.param((0.5, 0.3, 0.2), True, True, "sra", True, False, "cosine", True, id="G3-sra-mask1-AS1"),
    pytest.param((0.5, 0.3, 0.2), True, True, "self_flow", True, False, "cosine", True, id="G3-self_flow-mask1-AS1"),
    pytest.param((0.5, 0.3, 0.2), False, True, "same", True, False, "cosine", True, id="G3-same-mask1-AS0"),
]

MAX_DIFF = {}  # what each comparison was off by, for the report (printed with -s)


@pytest.mark.parametrize("ratios, separate, dual_time, teacher_t, teacher_mask, full_row, distance, fused", CASES)
def test_loss_pieces_equal_release(monkeypatch, ratios, separate, dual_time, teacher_t, teacher_mask, full_row,
                                   distance, fused):
    n = 3
    student_model, head, teacher = make_models(fused)
    x0, eps, y = make_batch(n)
    ids = make_ids(ratios, n, full_row)
    num_groups = len(TokenGroupsConfig(mask_ratio=ratios, attention_separation=True).ratios)
    times, delta = make_times(n, num_groups, dual_time)
    calls = inject_delta(monkeypatch, delta)
    guidance = sra_guidance(teacher, student_model, teacher_t, teacher_mask, distance)
    drawn = DrawnGroups(ids, times, separate, PATCH)

    mine = project_pieces(student_model, head, guidance, x0, eps, y, drawn)
    ref = release_loss(state(student_model), state(head), state(teacher), x0, eps, y, ids, times, delta,
                       teacher_t, teacher_mask, separate, distance)

    assert calls == ([(n * num_groups, T_MAX, False)] if teacher_t == "sra" else [])
    # Non-trivial: predictions and tokens are far from zero and from the targets, so the checks can fail.
    assert ref["out"].abs().mean() > 0.05 and ref["target"].abs().mean() > 0.1 and ref["xr"].abs().mean() > 0.05
    assert ref["gen"] > 0.1 and ref["align"] > 0.01
    key = f"{ratios}-{teacher_t}-mask{teacher_mask}-AS{separate}-dts{dual_time}-{distance}-fused{fused}"
    MAX_DIFF[key] = {name: assert_close(mine[name].detach(), ref[name].detach(), name)
                     for name in ("out", "xr", "target", "gen", "align")}


def test_reference_sees_groups_times_and_separation():
    """The reference itself depends on what it must: per-token times, the group mask and Δ (else the
    comparisons above could agree on something that ignores them)."""
    n = 3
    student_model, head, teacher = make_models()
    x0, eps, y = make_batch(n)
    ids = make_ids((0.25,), n, full_row=False)
    times, delta = make_times(n, 2, dual_time=True)
    sd, hd, td = state(student_model), state(head), state(teacher)
    base = release_loss(sd, hd, td, x0, eps, y, ids, times, delta, "sra", True, True)
    no_sep = release_loss(sd, hd, td, x0, eps, y, ids, times, delta, "sra", True, False)
    swapped = release_loss(sd, hd, td, x0, eps, y, ids, times.flip(1), delta, "sra", True, True)
    other_delta = release_loss(sd, hd, td, x0, eps, y, ids, times, delta.flip(1), "sra", True, True)
    for other in (no_sep, swapped):
        assert (other["out"] - base["out"]).abs().max() > 1e-2
    assert (other_delta["target"] - base["target"]).abs().max() > 1e-2
    assert abs(other_delta["align"] - base["align"]) > 1e-4
    # The project's backbone with and without separation differs as much.
    objective = FlowObjective()
    x_t = objective.noisy(x0, eps, DrawnGroups(ids, times, True, PATCH).time_map())
    with torch.no_grad():
        on = student_model(x_t, times, y, DrawnGroups(ids, times, True, PATCH).groups)
        off = student_model(x_t, times, y, DrawnGroups(ids, times, False, PATCH).groups)
    assert (on - off).abs().max() > 1e-2


def test_release_literal_cosine_is_over_tokens():
    """The release's `1 - F.cosine_similarity(a, b)` on (N, T, D) compares each feature channel's
    profile over the T tokens (dim=1), not each token's D-vector; the project takes it over the feature
    dimension (SPEC §3 step 6). The two differ, so this known deviation shows up here if either changes."""
    n = 3
    student_model, head, teacher = make_models()
    x0, eps, y = make_batch(n)
    ids = make_ids((0.25,), n, full_row=False)
    times, delta = make_times(n, 2, dual_time=True)
    ref = release_loss(state(student_model), state(head), state(teacher), x0, eps, y, ids, times, delta,
                       "sra", True, True)
    over_tokens = 1 - F.cosine_similarity(ref["xr"], ref["target"], dim=1)
    assert over_tokens.shape == (n, WIDTH)  # one value per image and feature channel
    assert_close(ref["literal_cos"], over_tokens.mean(), "literal cosine")
    assert abs(ref["literal_cos"] - ref["align"]) > 1e-3


@pytest.mark.parametrize("teacher_t, teacher_mask, separate, dropout", [
    ("sra", True, True, 0.0), ("self_flow", False, True, 0.0), ("same", True, False, 0.0),
    # Every label dropped: the student trains on the null class and the teacher still sees the labels (the
    # release drops them inside the student's embedder, in training mode, which its eval-mode teacher skips).
    ("sra", True, True, 1.0),
])
def test_training_loss_call_equals_release(monkeypatch, teacher_t, teacher_mask, separate, dropout):
    """TrainingLoss.__call__ itself: groups injected through `grouping.draw`, Δ through draw_delta, and
    ε read back by replaying the seed (class dropout draws one uniform per image first, then the patched
    draw nothing, so `torch.randn_like(x0)` is the next draw)."""
    n, weight, seed = 3, 0.7, 123
    student_model, head, teacher = make_models()
    x0, _, y = make_batch(n)
    ids = make_ids((0.25,), n, full_row=dropout == 0)
    times, delta = make_times(n, 2, dual_time=True)
    inject_delta(monkeypatch, delta)
    objective = FlowObjective()
    config = TokenGroupsConfig(mask_ratio=(0.25,), dual_time_scheduling=True, attention_separation=separate)
    grouping = TokenGrouping(config, objective, TOKENS, PATCH)
    monkeypatch.setattr(grouping, "draw", lambda *a, **k: DrawnGroups(ids, times, separate, PATCH))
    guidance = sra_guidance(teacher, student_model, teacher_t, teacher_mask)
    loss_fn = TrainingLoss(objective, dropout, NULL_CLASS, guidance, grouping)

    torch.manual_seed(seed)
    terms = loss_fn(Student(student_model, head, STUDENT_DEPTH), x0, y, weight)
    torch.manual_seed(seed)
    dropped = torch.rand(n) < dropout if dropout else None
    eps = torch.randn_like(x0)
    ref = release_loss(state(student_model), state(head), state(teacher), x0, eps, y, ids, times, delta,
                       teacher_t, teacher_mask, separate, dropped=dropped)
    MAX_DIFF[f"TrainingLoss-{teacher_t}-mask{teacher_mask}-AS{separate}-drop{dropout}"] = {
        "gen": assert_close(terms["gen"], ref["gen"], "gen"),
        "align": assert_close(terms["align"], ref["align"], "align"),
        "loss": assert_close(terms["loss"].detach(), ref["gen"] + weight * ref["align"], "loss"),
    }
    if dropout:  # the labels the teacher sees matter: a teacher on the null class gives another target
        null_teacher = release_loss(state(student_model), state(head), state(teacher), x0, eps,
                                    torch.full_like(y, NULL_CLASS), ids, times, delta, teacher_t, teacher_mask,
                                    separate)
        assert bool(dropped.all()) and abs(null_teacher["align"] - ref["align"]) > 1e-4
    terms["loss"].backward()  # the graph reaches the student and head, not the teacher
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------------
# The release's draws: group sizes, ids, and the whole random order
# ----------------------------------------------------------------------------------------------------

def release_ratios(mask_ratio):
    """The release's _normalize_mask_ratios for the values this project accepts."""
    ratios = [float(r) for r in mask_ratio]
    if len(ratios) == 1:
        r = ratios[0]
        return [1.0] if r <= 0.0 or r >= 1.0 else [r, 1.0 - r]
    ratios = [r for r in ratios if r > 0]
    return [r / sum(ratios) for r in ratios]


def release_counts(ratios, seq_len):
    """The release's _compute_group_counts: ⌊share·T⌋ in float32, the remainder one each to the largest
    fractional parts (torch.topk)."""
    expected = torch.tensor(ratios, dtype=torch.float32) * seq_len
    counts = expected.floor().long()
    remainder = seq_len - int(counts.sum())
    if remainder > 0:
        counts[torch.topk(expected - counts.float(), k=remainder).indices] += 1
    return counts.tolist()


def release_ids(counts, n, seq_len, full_sample_prob):
    """The release's _build_group_ids_from_counts (+ its full-sample override), same random calls."""
    perm = torch.rand(n, seq_len).argsort(dim=1)
    ordered = torch.cat([torch.full((c,), g) for g, c in enumerate(counts)]).expand(n, -1)
    ids = torch.empty(n, seq_len, dtype=torch.long)
    ids.scatter_(1, perm, ordered)
    if full_sample_prob > 0:
        whole = torch.rand(n) < full_sample_prob
        ids[whole] = 1
    return ids


RATIO_CASES = [((0.25,), 16), ((0.25,), 256), ((0.1,), 16), ((0.3,), 16), ((0.7,), 256), ((0.5, 0.3, 0.2), 16),
               ((0.5, 0.3, 0.2), 256), ((0.2, 0.2, 0.6), 16), ((1, 1, 1), 16), ((0.15, 0.35, 0.5), 64),
               ((0.45, 0.1, 0.45), 16), ((0.33, 0.33, 0.34), 1024)]


@pytest.mark.parametrize("mask_ratio, seq_len", RATIO_CASES)
def test_group_counts_follow_release_rule(mask_ratio, seq_len):
    ratios = TokenGroupsConfig(mask_ratio=mask_ratio, attention_separation=True).ratios
    assert ratios == pytest.approx(release_ratios(mask_ratio), abs=1e-12)
    counts = group_counts(ratios, seq_len)
    assert counts == release_counts(release_ratios(mask_ratio), seq_len)
    assert sum(counts) == seq_len


@pytest.mark.parametrize("mask_ratio, seq_len, release", [((0.1, 0.3, 0.6), 16, [1, 5, 10]),
                                                          ((0.05, 0.1, 0.85), 16, [1, 1, 14])])
def test_group_counts_exact_ties_follow_release_rounding(mask_ratio, seq_len, release):
    # 0.1·16 = 1.6 and 0.6·16 = 9.6 tie in exact arithmetic; in float32 9.6's fraction is the larger.
    ratios = TokenGroupsConfig(mask_ratio=mask_ratio, attention_separation=True).ratios
    assert group_counts(ratios, seq_len) == release


def test_release_counts_at_exact_ties():
    """The values above are what the release computes (float32 decides the tie)."""
    assert release_counts(release_ratios((0.1, 0.3, 0.6)), 16) == [1, 5, 10]
    assert release_counts(release_ratios((0.05, 0.1, 0.85)), 16) == [1, 1, 14]
    assert group_counts((0.1, 0.3, 0.6), 16) == [1, 5, 10]  # computed in float32 here too


@pytest.mark.parametrize("mask_ratio, full_sample_prob", [((0.25,), 0.0), ((0.5, 0.3, 0.2), 0.0), ((0.25,), 0.5)])
def test_draw_ids_sizes_and_release_draws(mask_ratio, full_sample_prob):
    n = 64
    config = TokenGroupsConfig(mask_ratio=mask_ratio, dual_time_scheduling=True, attention_separation=True,
                               full_sample_prob=full_sample_prob)
    grouping = TokenGrouping(config, FlowObjective(), TOKENS, PATCH)
    torch.manual_seed(3)
    ids = grouping.draw_ids(n, "cpu")
    counts = torch.stack([(ids == g).sum(dim=1) for g in range(grouping.num_groups)], dim=1)  # (n, G)
    whole = (ids == 1).all(dim=1)
    assert (counts[~whole] == torch.tensor(grouping.counts)).all()
    if full_sample_prob:
        assert 0 < whole.sum() < n  # some images kept whole, not all
    else:
        assert not whole.any()
    # Not the same permutation for every image.
    assert len({tuple(row.tolist()) for row in ids}) > n // 2
    # The release's draws from the same seed give the same ids.
    torch.manual_seed(3)
    assert torch.equal(ids, release_ids(release_counts(release_ratios(mask_ratio), TOKENS), n, TOKENS,
                                        full_sample_prob))


def test_training_loss_replays_release_random_order(monkeypatch):
    """Without any injection: from one seed, TrainingLoss draws what the release's SRALoss draws, in its
    order (ids: rand + argsort; full-sample: rand; times: rand per group; ε: randn_like; teacher Δ:
    0.2·rand per group), so the whole loss equals the reference replaying those draws."""
    n, weight, seed = 4, 0.5, 2024
    student_model, head, teacher = make_models()
    x0, _, y = make_batch(n)
    objective = FlowObjective()
    config = TokenGroupsConfig(mask_ratio=(0.25,), dual_time_scheduling=True, attention_separation=True,
                               full_sample_prob=0.5)
    grouping = TokenGrouping(config, objective, TOKENS, PATCH)
    guidance = sra_guidance(teacher, student_model, "sra", True)
    loss_fn = TrainingLoss(objective, 0.0, NULL_CLASS, guidance, grouping)
    torch.manual_seed(seed)
    terms = loss_fn(Student(student_model, head, STUDENT_DEPTH), x0, y, weight)

    torch.manual_seed(seed)
    ids = release_ids(release_counts(release_ratios((0.25,)), TOKENS), n, TOKENS, 0.5)
    times = torch.cat([torch.rand(n, 1, 1, 1) for _ in range(2)], dim=1).view(n, 2)
    eps = torch.randn_like(x0)
    delta = torch.cat([0.2 * torch.rand(n, 1, 1, 1) for _ in range(2)], dim=1).view(n, 2)
    ref = release_loss(state(student_model), state(head), state(teacher), x0, eps, y, ids, times, delta,
                       "sra", True, True)
    MAX_DIFF["TrainingLoss-replayed-draws"] = {
        "gen": assert_close(terms["gen"], ref["gen"], "gen"),
        "align": assert_close(terms["align"], ref["align"], "align"),
        "loss": assert_close(terms["loss"].detach(), ref["gen"] + weight * ref["align"], "loss"),
    }


def test_zz_report_max_differences():
    """Prints the largest differences seen above (run with -s); runs last in this file."""
    for key, diffs in MAX_DIFF.items():
        print(key, {k: f"{v:.2e}" for k, v in diffs.items()})
