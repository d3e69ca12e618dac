"""The diffusion transformer shared by DiT and SiT (SPEC §1).

One class serves both families: DiT predicts noise plus a learned variance range, SiT predicts
velocity; they differ only in `learn_sigma` and in the objective that trains them. Parameter and
buffer names follow the public DiT/SiT releases so their state dicts load with strict=True.
"""
import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from conditioning import Condition

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features before the MLP (DiT release)
MAX_PERIOD = 10_000  # longest period of the timestep sinusoids (DiT release)
MLP_RATIO = 4.0  # SPEC §1
ADALN_NORM_EPS = 1e-6  # LayerNorm eps without affine parameters inside adaLN blocks (DiT release)
EMBED_INIT_STD = 0.02  # init std of the label table and timestep MLP (DiT release)
LINEAR_INITS = ("xavier", "default")


def init_linears(module, style="xavier"):
    """Every nn.Linear in `module` (visited as nn.Module.apply does): Xavier-uniform weights and zero biases
    ("xavier": the `_basic_init` of the DiT, SiT, SRA and REPA SiT releases), or kept at PyTorch's default
    initialization ("default": REPA's MMDiT). Returns the module."""
    if style not in LINEAR_INITS:
        raise ValueError(f"linear init must be one of {LINEAR_INITS}, got {style!r}")

    def xavier(layer):
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    if style == "xavier":
        module.apply(xavier)
    return module


def modulate(x, shift, scale):
    # x: (N, T, D); shift, scale: (N, D), or (N, T, D) per token
    if shift.ndim == 2:
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return x * (1 + scale) + shift


def gate(g, x):
    # g: (N, D), or (N, T, D) per token; x: (N, T, D)
    return (g.unsqueeze(1) if g.ndim == 2 else g) * x


@dataclasses.dataclass(frozen=True)
class TokenGroups:
    """Each token's group, for training with several times per image (dual-time scheduling, dts/).

    ids: (N, T) int64 group index in [0, G) of every token, in patch order (row-major over the grid).
    separate: tokens attend only to tokens of their own group (attention separation). With groups, the
    backbone's time input is one time per group, (N, G): the conditioning is computed per group and
    handed to each token, which equals a per-token time (N, T) of t[n, ids[n, i]] at G/T of the cost."""

    ids: torch.Tensor
    separate: bool = False

    def attention_mask(self):
        """(N, 1, T, T) bool, True where query and key tokens share a group (SDPA's convention)."""
        return (self.ids[:, :, None] == self.ids[:, None, :]).unsqueeze(1)

    def per_token(self, values):
        """Per-group values (N, G, ...) -> per-token (N, T, ...)."""
        index = self.ids.view(*self.ids.shape, *[1] * (values.ndim - 2)).expand(-1, -1, *values.shape[2:])
        return values.gather(1, index)


def timestep_embedding(t, dim, max_period=MAX_PERIOD):
    """Sinusoidal features of (possibly fractional) timesteps t (N,) -> (N, dim), cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t):
        return self.mlp(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE))


class LabelEmbedder(nn.Module):
    """Class embedding table; with CFG it has one extra row, the null class at index num_classes."""

    def __init__(self, num_classes, hidden_size, with_null_class):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null_class), hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens (N, T, D) through one strided convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False, fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        # qk-norm as in REPA's SiT (LayerNorm over each head's channels)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        """x (N, T, D); mask: None, or (N, 1, T, T) bool, True where a query may attend to a key."""
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            weights = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            if mask is not None:
                weights = weights.masked_fill(~mask, float("-inf"))
            x = weights.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """adaLN-Zero transformer block: the conditioning c regresses shift/scale/gate of both branches."""

    def __init__(self, hidden_size, num_heads, qk_norm=False, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * MLP_RATIO))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, groups=None, mask=None):
        """x (N, T, D); c (N, D), or (N, G, D) per group of `groups` (TokenGroups); mask for attention."""
        modulation = self.adaLN_modulation(c)
        if groups is not None:
            modulation = groups.per_token(modulation)  # (N, T, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate(gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), mask))
        return x + gate(gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, groups=None):
        modulation = self.adaLN_modulation(c)
        if groups is not None:
            modulation = groups.per_token(modulation)
        shift, scale = modulation.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchBackbone(nn.Module):
    """What DiT/SiT and MMDiT share: the input grid of p×p patches, the output channels, the block count
    that feature depths index, and unpatchify."""

    def _set_shape(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, learn_sigma):
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_patches = (input_size // patch_size) ** 2

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    block_list_name = "blocks"  # the attribute holding the transformer blocks, in order
    # How the reference initializes the backbone's linear layers (`init_linears`), and so the layers that
    # guidance adds beside them (SRA's head, REPA's projectors), as the releases build those into the model.
    linear_init = "xavier"

    @property
    def block_list(self) -> nn.ModuleList:
        """The transformer blocks that feature depths count (`blocks`, or MMDiT's `joint_blocks`)."""
        return getattr(self, self.block_list_name)

    def _check_depth(self, depth):
        if not 1 <= depth <= self.depth:
            raise ValueError(f"feature depth must be in [1, {self.depth}] (1-based block index), got {depth}")


class DiT(PatchBackbone):
    """Class-conditional diffusion transformer (DiT/SiT backbone).

    forward(x, t, y) -> prediction (N, out_channels, H, W), as the public releases.
    forward_features(x, t, y, depth) -> tokens (N, T, D) after block `depth`, running only those blocks.
    forward_with_features(x, t, y, depth) -> (prediction, tokens after block `depth`) from one pass.
    Each also takes `groups` (TokenGroups) and then a time per group, for dual-time training (dts/).

    Labels are used as given: class dropout for CFG is applied by the trainer (`drop_labels`), so the
    EMA teacher can see exactly the student's dropped labels (SPEC §3 step 4).
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        num_classes=1000,
        class_dropout_prob=0.1,
        learn_sigma=True,
        qk_norm=False,
        fused_attn=True,
    ):
        super().__init__()
        self._set_shape(input_size, patch_size, in_channels, hidden_size, depth, num_heads, learn_sigma)
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, with_null_class=class_dropout_prob > 0)
        # Fixed sin-cos embedding, kept as a frozen parameter so the public key `pos_embed` loads.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        init_linears(self, self.linear_init)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.hidden_size, grid)).float()[None])
        # Patch projection initialized like a linear layer on the flattened patch (DiT release).
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBED_INIT_STD)
        # adaLN-Zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _embed(self, x, t, y, groups):
        """Tokens (N, T, D), the conditioning, and what the blocks need to apply it per token.

        t: (N,) one time per image (the public models' input); (N, T) one per token; or, with `groups`,
        (N, G) one per group. The conditioning is (N, D), (N, T, D) or (N, G, D) accordingly."""
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        n = tokens.shape[0]
        if t.ndim == 1:
            c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        elif t.ndim == 2 and (groups is not None or t.shape[1] == tokens.shape[1]):
            c = self.t_embedder(t.reshape(-1)).view(n, t.shape[1], -1) + self.y_embedder(y).unsqueeze(1)
        else:
            raise ValueError(f"t must be (N,), (N, T={tokens.shape[1]}) or, with token groups, (N, G); "
                             f"got {tuple(t.shape)}")
        per_group = groups if groups is not None and t.ndim == 2 else None
        mask = groups.attention_mask() if groups is not None and groups.separate else None
        return tokens, c, per_group, mask

    def forward_features(self, x, t, y, depth, groups=None):
        """Hidden tokens (N, T, D) after the first `depth` blocks; later blocks are not run."""
        self._check_depth(depth)
        tokens, c, per_group, mask = self._embed(x, t, y, groups)
        for block in self.blocks[:depth]:
            tokens = block(tokens, c, per_group, mask)
        return tokens

    def forward_with_features(self, x, t, y, depth, groups=None):
        """(prediction (N, C_out, H, W), tokens (N, T, D) after block `depth`) from one full pass."""
        self._check_depth(depth)
        tokens, c, per_group, mask = self._embed(x, t, y, groups)
        features = None
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, per_group, mask)
            if index == depth:
                features = tokens
        return self.unpatchify(self.final_layer(tokens, c, per_group)), features

    def forward(self, x, t, y, groups=None):
        """Prediction (N, C_out, H, W). t: (N,) as the public releases; (N, T) per token; or (N, G)
        with `groups` (TokenGroups), which may also separate the groups' attention."""
        tokens, c, per_group, mask = self._embed(x, t, y, groups)
        for block in self.blocks:
            tokens = block(tokens, c, per_group, mask)
        return self.unpatchify(self.final_layer(tokens, c, per_group))


def drop_labels(y, prob, null_class, generator=None):
    """Replace each label by the null class with probability `prob` (CFG training, SPEC §1); the class
    case of conditioning.Condition.drop, kept for callers of this name."""
    return Condition.classes(null_class).drop(y, prob, generator)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (grid_size**2, dim): half the channels encode the row
    coordinate, half the column, each as [sin, cos] of geometric frequencies (MAE/DiT convention)."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in the release
    emb_h = _sincos_1d(dim // 2, grid_w.reshape(-1))
    emb_w = _sincos_1d(dim // 2, grid_h.reshape(-1))
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(dim, positions):
    omega = 1.0 / MAX_PERIOD ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions, omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
