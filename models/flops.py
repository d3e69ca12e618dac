"""Analytic FLOPs of a backbone's forward pass (DiT/SiT, MMDiT) and of a training step.

What is counted is the matrix multiplies, at 2·M·K·N FLOPs for an (M×K)·(K×N) product (one multiply and
one add per term): the linear layers, the patch embedding (a stride-p convolution, i.e. one (T × C·p²)
by (C·p² × D) product), and the attention's QKᵀ and AV at 2·T²·D each per image (summed over heads).
Norms, activations, softmax, modulation, additions and the label lookup are not counted. This is the
convention of torch.utils.flop_counter, which tests/test_flops.py matches exactly, and of the "model
FLOPs" of PaLM (Chowdhery et al. 2022, App. B) and Chinchilla (Hoffmann et al. 2022, App. F).

DiT/SiT, per image: T = (input/p)² tokens of width D, C input and C_out output channels, MLP width 4D:
    patch embedding   2·T·C·p²·D
    timestep MLP      2·256·D + 2·D²                 (256 sinusoidal features, FREQUENCY_EMBEDDING_SIZE)
    each block        24·T·D² + 4·T²·D + 12·D²       (qkv 6TD², attention 4T²D, proj 2TD², MLP 16TD²,
                                                      adaLN 12D²: one conditioning vector per image)
    final layer       4·D² + 2·T·D·p²·C_out          (adaLN to shift and scale, the output linear)
SiT-XL/2 at 256 px (T = 256, D = 1152, 28 blocks, C = C_out = 4): 237.23 GFLOP per image; DiT-XL/2
(C_out = 8) 237.24 GFLOP, the DiT paper's 118.6 Gflops, which counts multiply-adds.

MMDiT, per image, with L text tokens of width C_ctx (the context embedder, 2·L·C_ctx·D, after the timestep
MLP): each joint block runs both streams' adaLN, qkv, proj and MLP (the block terms above with T and
with L tokens) and one attention over the L + T tokens, 4·(L + T)²·D; the last block's text stream is
`pre_only`, its adaLN (4·D²) and qkv (6·L·D²) only.

With token groups (dts/) the timestep MLP and adaLN run once per group, G times the per-image terms
above; the count keeps one conditioning vector per image (each further group adds 0.2% to the forward of
SiT-B/2 or SiT-XL/2 at 256 px).
"""
import dataclasses

from conditioning import TEXT

from .mmdit import CONTEXT_DIM
from .registry import FAMILIES, parse_model_name
from .transformer import FREQUENCY_EMBEDDING_SIZE, MLP_RATIO

# A training step is a forward and a backward pass, and the backward costs twice the forward: one
# product for the gradient w.r.t. a layer's input and one w.r.t. its weights for every product of the
# forward (Kaplan et al. 2020, §2.1; PaLM App. B: 6·N FLOPs per token for N parameters).
BACKWARD_PER_FORWARD = 2
TERMS = ("patch embedding", "timestep MLP", "context embedder", "adaLN", "qkv", "attention", "proj", "MLP",
         "final layer")


@dataclasses.dataclass(frozen=True)
class BackboneShape:
    """What a backbone's FLOPs depend on."""

    tokens: int  # T, image tokens: (input size / patch size)²
    hidden_size: int  # D
    depth: int  # blocks
    patch_size: int
    in_channels: int
    out_channels: int
    context_dim: int | None = None  # MMDiT: the text context's width (C_ctx); None for DiT/SiT

    @classmethod
    def of_model(cls, model):
        """The shape of a built DiT/SiT or MMDiT (on any device, "meta" included)."""
        return cls(model.num_patches, model.hidden_size, model.depth, model.patch_size, model.in_channels,
                   model.out_channels, getattr(model, "context_dim", None))

    @classmethod
    def of_name(cls, name, input_size, in_channels=4, **options):
        """The shape `models.create_model(name, input_size, in_channels, **options)` would build, without
        building it; options as there (depth, hidden_size, learn_sigma, context_dim; others do not
        change the FLOPs)."""
        family, size, patch = parse_model_name(name)
        spec = FAMILIES[family]
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch}")
        depth, hidden_size, _ = spec.sizes[size]
        learn_sigma = options.get("learn_sigma", spec.learn_sigma)
        context_dim = options.get("context_dim", CONTEXT_DIM) if spec.condition == TEXT else None
        return cls((input_size // patch) ** 2, options.get("hidden_size", hidden_size), options.get("depth", depth),
                   patch, in_channels, in_channels * 2 if learn_sigma else in_channels, context_dim)

    @property
    def joint(self):
        """MMDiT: two streams per block and one attention over text and image tokens."""
        return self.context_dim is not None


def matmul_flops(m, k, n):
    """(m×k)·(k×n): m·n dot products of length k, a multiply and an add per term."""
    return 2 * m * k * n


def _stream_terms(tokens, dim, pre_only=False):
    """One stream of one block over `tokens` tokens, one image: adaLN, qkv, proj, MLP."""
    mlp = int(dim * MLP_RATIO)
    return {
        "adaLN": matmul_flops(1, dim, (2 if pre_only else 6) * dim),
        "qkv": matmul_flops(tokens, dim, 3 * dim),
        "proj": 0 if pre_only else matmul_flops(tokens, dim, dim),
        "MLP": 0 if pre_only else matmul_flops(tokens, dim, mlp) + matmul_flops(tokens, mlp, dim),
    }


def forward_flop_terms(backbone, batch_size=1, depth=None, context_length=None):
    """The FLOPs of one forward pass of `batch_size` images, by term (TERMS).

    backbone: a built model or a BackboneShape. depth: None for `forward` (every block and the final
    layer), or k for `forward_features(..., k)` (the first k blocks, no final layer). context_length:
    L, the text tokens per image, for an MMDiT (and only there)."""
    shape = backbone if isinstance(backbone, BackboneShape) else BackboneShape.of_model(backbone)
    if shape.joint and context_length is None:
        raise ValueError("an MMDiT's FLOPs depend on the text context: give its length (context_length)")
    if not shape.joint and context_length is not None:
        raise ValueError("a class-conditional backbone takes no text context (context_length must be None)")
    if depth is not None and not 1 <= depth <= shape.depth:
        raise ValueError(f"depth must be in [1, {shape.depth}] (1-based block index), got {depth}")
    d, t, patch = shape.hidden_size, shape.tokens, shape.patch_size**2
    terms = dict.fromkeys(TERMS, 0)
    terms["patch embedding"] = matmul_flops(t, shape.in_channels * patch, d)
    terms["timestep MLP"] = matmul_flops(1, FREQUENCY_EMBEDDING_SIZE, d) + matmul_flops(1, d, d)
    if shape.joint:
        terms["context embedder"] = matmul_flops(context_length, shape.context_dim, d)
    for index in range(shape.depth if depth is None else depth):
        streams = [_stream_terms(t, d)]
        attended = t
        if shape.joint:
            streams.append(_stream_terms(context_length, d, pre_only=index == shape.depth - 1))
            attended = context_length + t
        for stream in streams:
            for name, flops in stream.items():
                terms[name] += flops
        terms["attention"] += matmul_flops(attended, d, attended) + matmul_flops(attended, attended, d)  # QKᵀ, AV
    if depth is None:
        terms["final layer"] = matmul_flops(1, d, 2 * d) + matmul_flops(t, d, patch * shape.out_channels)
    return {name: batch_size * flops for name, flops in terms.items()}


def forward_flops(backbone, batch_size=1, depth=None, context_length=None):
    """The FLOPs of one forward pass of `batch_size` images (the sum of forward_flop_terms)."""
    return sum(forward_flop_terms(backbone, batch_size, depth, context_length).values())


def flops_of(name, input_size, in_channels=4, batch_size=1, depth=None, context_length=None, **options):
    """forward_flops of the registered model `name` at `input_size` (latent side), without building it.
    depth: as forward_flops' (the partial forward); options: create_model's other shape overrides
    (hidden_size, learn_sigma, context_dim; for a different block count use BackboneShape.of_name)."""
    shape = BackboneShape.of_name(name, input_size, in_channels, **options)
    return forward_flops(shape, batch_size, depth, context_length)


def training_step_flops(forward):
    """Model FLOPs of a training step whose forward costs `forward` FLOPs: forward + backward =
    (1 + BACKWARD_PER_FORWARD)·forward = 3·forward, the PaLM/Chinchilla convention. For a DiT/SiT block
    that is 3·(24·T·D² + 4·T²·D + 12·D²) per image: 72·T·D² + 12·T²·D + 36·D².

    Autograd computes no gradient w.r.t. the inputs, which need none: the patch embedding's, the timestep
    MLP's first layer's and the MMDiT context embedder's input gradients are not computed, so the
    executed step costs 3·forward − (2·T·C·p²·D + 2·256·D [+ 2·L·C_ctx·D]) per image, 0.0014% less for
    SiT-XL/2 at 256 px. The model-FLOPs convention counts them."""
    return (1 + BACKWARD_PER_FORWARD) * forward
