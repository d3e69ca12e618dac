"""REPA as a guidance method (SPEC §7; Yu et al., ICLR 2025, repository sihyun-yu/REPA).

The target is a frozen encoder's patch tokens of the clean image (repa/encoder.py); the student's
block-k tokens go through REPA's projector, a 3-layer SiLU MLP, and are compared token by token with
−cos of the normalized vectors, weighted by λ = 0.5: REPA's `loss.py` and `--proj-coeff`.
"""
import dataclasses

import torch.nn as nn

from configs.fields import option
from errors import UserError
from guidance.base import AlignmentConfig, AlignmentInputs, Guidance, GuidanceContext
from guidance.distances import DISTANCES
from models import init_linears, model_shape, parse_model_name

from .encoder import DEFAULT_ENCODER, ImageEncoder, load_encoder, weights_sha256

PROJ_COEFF = 0.5  # λ: REPA's --proj-coeff default and every script of its README
PROJECTOR_DIM = 2048  # REPA's projector_dim (models/sit.py)
# k_s, REPA's --encoder-depth: 8 for SiT-XL/2 (its README scripts) and SiT-L/2, 4 for SiT-B/2 (the REPA
# paper's setting per model size), 8 for MMDiT-D24/2 (train_t2i.py's default and README script for MS-COCO);
# other sizes take the same third of the depth.
ENCODER_DEPTHS = {"B": 4, "L": 8, "XL": 8, "D24": 8}


@dataclasses.dataclass(frozen=True)
class REPAConfig(AlignmentConfig):
    """`--guidance repa`: REPA's published settings by default."""

    method = "repa"

    align_weight: float = option(PROJ_COEFF, "λ, the weight of the alignment loss (REPA's --proj-coeff 0.5)",
                                 minimum=0.0)
    align_distance: str = option("neg_cosine", "per-token distance (REPA: neg_cosine, −cos of the normalized "
                                 "vectors)", choices=DISTANCES)
    repa_encoder: str = option(
        DEFAULT_ENCODER, "the frozen encoder: dinov2-vit-s/b/l/g, or a timm model (hf-hub:ID, local-dir:PATH)")
    repa_encoder_weights: str | None = option(
        None, "a local weights file for the encoder (timm's or DINOv2's torch.hub checkpoint) instead of "
        "the hub's", type=str)
    repa_projector_dim: int = option(PROJECTOR_DIM, "hidden width of REPA's projector MLP", minimum=1)

    @classmethod
    def default_student_depth(cls, model_name):
        size = parse_model_name(model_name)[1]
        return ENCODER_DEPTHS.get(size) or max(1, round(model_shape(model_name)[0] / 3))


def build_projector(hidden_size: int, projector_dim: int, target_dim: int, init: str = "xavier") -> nn.Sequential:
    """Linear(D, P) → SiLU → Linear(P, P) → SiLU → Linear(P, z): REPA's `build_mlp`, so the
    `projectors.0.*` keys of its checkpoints load here, initialized as REPA's model initializes its other
    linear layers (`PatchBackbone.linear_init`): Xavier-uniform weights and zero biases in its SiT,
    PyTorch's default in its MMDiT."""
    projector = nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, target_dim),
    )
    return init_linears(projector, init)


class REPA(Guidance):
    name = "repa"
    config_class = REPAConfig
    needs_images = True

    def __init__(self, config: REPAConfig, context: GuidanceContext, encoder: ImageEncoder | None = None):
        """encoder: an ImageEncoder to use instead of loading the config's (benchmarks with random
        weights); its grid must match the backbone's tokens."""
        super().__init__(config, context)
        grid = round(context.backbone.num_patches**0.5)
        if encoder is None:
            encoder = load_encoder(config.repa_encoder, config.repa_encoder_weights, grid)
        if encoder.grid != grid:
            raise ValueError(f"the encoder sees {encoder.grid}×{encoder.grid} patches, the model has {grid}×{grid}")
        self.encoder = encoder.to(context.device)
        self.weights_sha256 = weights_sha256(self.encoder.vit)

    def build_head(self, hidden_size):
        return build_projector(hidden_size, self.config.repa_projector_dim, self.encoder.embed_dim, self.linear_init)

    def target(self, inputs: AlignmentInputs):
        """The encoder's patch tokens of the clean images (N, T, D_encoder)."""
        if inputs.images is None:
            raise UserError("REPA needs the clean images: preprocess the dataset with --keep-images")
        return self.encoder(inputs.images)

    def identity(self):
        return {"repa_encoder_sha256": self.weights_sha256}
