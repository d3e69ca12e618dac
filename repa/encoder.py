"""REPA's target network: a frozen pretrained ViT (DINOv2 by default) on the clean image (SPEC §7).

The image goes in as REPA feeds it: uint8 / 255, ImageNet mean/std, a bicubic resize to the side at
which the encoder's patch grid equals the diffusion model's token grid (224 px for 16×16 tokens and
DINOv2's 14 px patches, REPA's 224·resolution/256 at 256 and 512 px). The output is the patch
tokens after the final norm (DINOv2's `x_norm_patchtokens`), without class or register tokens.

Weights come through timm: a REPA encoder name (`dinov2-vit-b`, the default) or any timm model
reference (`hf-hub:timm/…`, `local-dir:/folder` holding a timm config.json and weights); or a local
weights file given beside it (timm's format, or DINOv2's own torch.hub checkpoint such as
`dinov2_vitb14_pretrain.pth`, converted by timm). DINOv2's position embedding is resampled to the
grid with timm's `resample_abs_pos_embed`, as REPA does.
"""
import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError

# REPA's --enc-type names of the DINOv2 encoders -> timm's models with the DINOv2 weights (LVD-142M).
ENCODERS = {
    "dinov2-vit-s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-vit-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-vit-l": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-vit-g": "vit_giant_patch14_dinov2.lvd142m",
}
DEFAULT_ENCODER = "dinov2-vit-b"  # REPA's default --enc-type
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # REPA normalizes DINOv2's input with timm's ImageNet constants
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODE = "bicubic"  # REPA's preprocess_raw_image


class ImageEncoder(nn.Module):
    """uint8 images (N, 3, R, R) -> patch tokens (N, grid², D), frozen, in eval mode."""

    def __init__(self, vit: nn.Module, grid: int):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        patch = vit.patch_embed.patch_size[0]
        self.input_size = grid * patch  # the side at which the encoder sees grid × grid patches
        self.grid = grid
        self.embed_dim = vit.embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens  # class (and register) tokens come first
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        return super().train(False)  # frozen: dropout and the like never switch on

    def preprocess(self, images):
        """uint8 (N, 3, R, R) -> the normalized, resized encoder input, in REPA's order."""
        x = (images.float() / 255.0 - self.mean) / self.std
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, self.input_size, mode=RESIZE_MODE)
        return x

    def forward(self, images):
        tokens = self.vit.forward_features(self.preprocess(images))  # (N, prefix + grid², D)
        return tokens[:, self.num_prefix_tokens:]


def timm_name(encoder: str) -> str:
    return ENCODERS.get(encoder, encoder)


def read_state_dict(path: Path) -> dict:
    """A weights file as tensors, without running code from it (safetensors, or torch's safe loader)."""
    if not path.is_file():
        raise UserError(f"--repa-encoder-weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: the user's input, not a bug
        raise UserError(f"--repa-encoder-weights {path}: cannot read it ({type(error).__name__}: {error})") from None
    for key in ("model", "state_dict", "teacher"):  # training files wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"--repa-encoder-weights {path}: holds a {type(state).__name__}, not a state dict")
    return state


def patch_size(name: str) -> int:
    """The patch size of a timm ViT, read from a model built on the meta device (no memory, no weights)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=0).patch_embed.patch_size[0]
    except (RuntimeError, OSError, ValueError, FileNotFoundError) as error:
        raise UserError(f"--repa-encoder {name}: not a timm ViT ({type(error).__name__}: {error})") from None


def create_vit(encoder: str, weights: str | None, grid: int) -> nn.Module:
    """The timm ViT of `encoder` sized for grid × grid patches, with its pretrained weights, or with
    the weights of the file `weights`."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    name = timm_name(encoder)
    img_size = grid * patch_size(name)
    if weights is None:
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, img_size=img_size)
        except (RuntimeError, OSError, ValueError) as error:
            first_line = (str(error).splitlines() or [""])[0]
            raise UserError(
                f"--repa-encoder {encoder}: cannot load its pretrained weights ({type(error).__name__}: "
                f"{first_line}); offline, pass a local folder (--repa-encoder local-dir:PATH) or a weights "
                "file (--repa-encoder-weights FILE)") from None
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
    state = checkpoint_filter_fn(read_state_dict(Path(weights)), vit)
    state = {key: value for key, value in state.items() if not key.startswith("head.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"--repa-encoder-weights {weights} does not fit {name}: missing {sorted(missing)[:4]}, "
                        f"unexpected {sorted(unexpected)[:4]}")
    return vit


def load_encoder(encoder: str = DEFAULT_ENCODER, weights: str | None = None, grid: int = 16) -> ImageEncoder:
    """The frozen encoder for a diffusion model with grid × grid tokens, on the CPU."""
    return ImageEncoder(create_vit(encoder, weights, grid), grid)


def weights_sha256(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and bytes): the identity
    of the weights, whatever file or hub they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
