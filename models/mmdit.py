"""MMDiT: the text-conditioned backbone of the text-to-image experiment (SPEC §8; SD3's joint attention
as REPA's `models/mmdit.py` builds it for MS-COCO).

Image tokens and text tokens keep their own weights (two streams per block) and meet in one attention
over both sequences, text first. The adaLN conditioning is the timestep embedding alone; the text
enters through attention only (REPA's model is built without a pooled-text vector, `adm_in_channels`
None). The last block's text stream is `pre_only`: it supplies keys and values and is then dropped.
Parameter and buffer names are REPA's, so its state dicts load with strict=True and give the same
outputs; REPA's projectors (`projectors.*`) are not part of the backbone (models.checkpoint splits them
off). The contract is the DiT/SiT one (models/transformer.py): forward, forward_features and
forward_with_features, where the features are the image tokens after block k.

Where this model differs from REPA's file, it is in what REPA cannot run: REPA crops a 16×16 position
table for every input (256 px only, `pos_embed_max_size` fixed at 16); here the table has the input's
own grid, which is the same table at 256 px. Initialization follows REPA: PyTorch's default
initialization everywhere (no adaLN-Zero), the fixed 2-D sin-cos position table.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer import (
    ADALN_NORM_EPS,
    MLP_RATIO,
    FinalLayer,
    Mlp,
    PatchBackbone,
    PatchEmbed,
    TimestepEmbedder,
    sincos_pos_embed_2d,
)

CONTEXT_DIM = 768  # CLIP ViT-L/14's text width: REPA hard-codes context_embedder Linear(768, hidden)
HEAD_DIM = 32  # REPA: hidden = 32·depth with depth heads
QK_NORM_EPS = 1e-6  # REPA's qk LayerNorm eps


class StreamAttention(nn.Module):
    """One stream's attention projections (REPA's SelfAttention): qkv in, and out (`proj`) unless the
    stream ends at this block (`pre_only`)."""

    def __init__(self, dim, num_heads, qk_norm=False, pre_only=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        self.ln_q = nn.LayerNorm(self.head_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.ln_k = nn.LayerNorm(self.head_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()

    def qkv_heads(self, x):
        """(N, T, D) -> q, k, v each (N, H, T, Dh)."""
        n, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, self.head_dim).unbind(2)
        return self.ln_q(q).transpose(1, 2), self.ln_k(k).transpose(1, 2), v.transpose(1, 2)


class StreamBlock(nn.Module):
    """One stream of a joint block (REPA's DismantledBlock): adaLN-modulated attention input, then, after
    the joint attention, the gated attention output and the gated MLP."""

    def __init__(self, hidden_size, num_heads, qk_norm=False, pre_only=False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_NORM_EPS)
        self.attn = StreamAttention(hidden_size, num_heads, qk_norm=qk_norm, pre_only=pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=ADALN_NORM_EPS)
            self.mlp = Mlp(hidden_size, int(hidden_size * MLP_RATIO))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))

    def pre_attention(self, x, c):
        """q, k, v (N, H, T, Dh) of the modulated tokens, and the modulation the rest of the block uses."""
        modulation = self.adaLN_modulation(c).unsqueeze(1).chunk(2 if self.pre_only else 6, dim=-1)
        shift, scale = modulation[:2]
        return self.attn.qkv_heads(self.norm1(x) * (1 + scale) + shift), modulation[2:]

    def post_attention(self, x, attended, modulation):
        """x (N, T, D) plus the gated projection of its attention output (N, T, D), plus the gated MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa * self.attn.proj(attended)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class JointBlock(nn.Module):
    """The text stream and the image stream attending jointly over [text tokens, image tokens]."""

    def __init__(self, hidden_size, num_heads, qk_norm=False, pre_only=False, fused_attn=True):
        super().__init__()
        self.fused_attn = fused_attn
        self.context_block = StreamBlock(hidden_size, num_heads, qk_norm=qk_norm, pre_only=pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, qk_norm=qk_norm)

    def forward(self, context, x, c):
        """context (N, L, D), x (N, T, D), c (N, D) -> (context or None after a pre_only block, x)."""
        context_qkv, context_modulation = self.context_block.pre_attention(context, c)
        x_qkv, x_modulation = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(context_qkv, x_qkv))  # (N, H, L + T, Dh)
        if self.fused_attn:
            attended = F.scaled_dot_product_attention(q, k, v)
        else:
            attended = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        n, heads, tokens, head_dim = attended.shape
        attended = attended.transpose(1, 2).reshape(n, tokens, heads * head_dim)
        length = context.shape[1]
        x = self.x_block.post_attention(x, attended[:, length:], x_modulation)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, attended[:, :length], context_modulation), x


class MMDiT(PatchBackbone):
    """Text-conditioned diffusion transformer with joint attention (SD3 / REPA's MMDiT).

    forward(x, t, y) -> prediction (N, out_channels, H, W); y is the text context (N, L, context_dim).
    forward_features(x, t, y, depth) -> image tokens (N, T, D) after block `depth`, running only those blocks.
    forward_with_features(x, t, y, depth) -> (prediction, image tokens after block `depth`) from one pass.
    t is one time per image, (N,). The null context for guidance and dropout is data (the empty caption's
    context, conditioning.Condition): contexts are used as given.
    """

    condition = "text"
    block_list_name = "joint_blocks"  # REPA's key names
    linear_init = "default"  # REPA's models/mmdit.py initializes nothing, its projectors included

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=24, num_heads=24,
                 context_dim=CONTEXT_DIM, learn_sigma=False, qk_norm=False, fused_attn=True):
        super().__init__()
        self._set_shape(input_size, patch_size, in_channels, hidden_size, depth, num_heads, learn_sigma)
        self.context_dim = context_dim

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        # A buffer, as REPA's (its key `pos_embed` is in every REPA state dict).
        grid = input_size // patch_size
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).float()[None])
        self.joint_blocks = nn.ModuleList([
            JointBlock(hidden_size, num_heads, qk_norm=qk_norm, pre_only=index == depth - 1, fused_attn=fused_attn)
            for index in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def _embed(self, x, t, y, groups):
        if groups is not None:
            raise ValueError("MMDiT has no token groups (dual-time scheduling trains DiT/SiT backbones)")
        if t.ndim != 1:
            raise ValueError(f"MMDiT takes one time per image, t of shape (N,); got {tuple(t.shape)}")
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"MMDiT was built for {self.input_size}×{self.input_size} inputs; got "
                             f"{tuple(x.shape[-2:])} (its position table has the grid of that size)")
        if y.ndim != 3 or y.shape[-1] != self.context_dim:
            raise ValueError(f"the text context must be (N, L, {self.context_dim}); got {tuple(y.shape)}")
        tokens = self.x_embedder(x) + self.pos_embed
        return tokens, self.context_embedder(y), self.t_embedder(t)

    def forward_features(self, x, t, y, depth, groups=None):
        """Image tokens (N, T, D) after the first `depth` joint blocks; later blocks are not run."""
        self._check_depth(depth)
        tokens, context, c = self._embed(x, t, y, groups)
        for block in self.joint_blocks[:depth]:
            context, tokens = block(context, tokens, c)
        return tokens

    def forward_with_features(self, x, t, y, depth, groups=None):
        """(prediction (N, C_out, H, W), image tokens (N, T, D) after block `depth`) from one full pass."""
        self._check_depth(depth)
        tokens, context, c = self._embed(x, t, y, groups)
        features = None
        for index, block in enumerate(self.joint_blocks, start=1):
            context, tokens = block(context, tokens, c)
            if index == depth:
                features = tokens
        return self.unpatchify(self.final_layer(tokens, c)), features

    def forward(self, x, t, y, groups=None):
        """Prediction (N, C_out, H, W) for inputs x (N, C, H, W), times t (N,), text contexts y (N, L, D_ctx)."""
        tokens, context, c = self._embed(x, t, y, groups)
        for block in self.joint_blocks:
            context, tokens = block(context, tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))
