"""The frozen text encoder of text-to-image data: CLIP's text transformer, as U-ViT and REPA use it.

U-ViT's `FrozenCLIPEmbedder` protocol: a caption is tokenized by CLIP's tokenizer, padded with the
end token to `max_length` (77) and cut there, and its context is the text transformer's
`last_hidden_state` for those token ids (no attention mask: the causal mask already keeps every real
token from seeing the padding), (77, 768) for openai/clip-vit-large-patch14. The empty caption's
context is the null condition of classifier-free guidance.
"""

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from errors import UserError
from preprocessing.vae import HUB_ID_PATTERN, vae_id

log = logging.getLogger("preprocessing")

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # U-ViT's and REPA's MS-COCO text encoder
# Contexts are stored in half precision: MS-COCO train's ~414K captions at 77 x 768 take 49 GB instead of
# 98 GB in float32, and the model consumes them under bf16 autocast, which rounds more coarsely still.
CONTEXT_DTYPE = np.float16
_CONTEXT_TORCH_DTYPE = torch.float16  # CONTEXT_DTYPE, as torch spells it
# A tokenizer without a configured length reports a huge sentinel (int(1e30)) as model_max_length.
MAX_SANE_LENGTH = 10_000
CLIP_MODEL_TYPES = ("clip_text_model", "clip")  # a text model alone, or a full CLIP (its text tower is used)


def text_encoder_id(name: str) -> str:
    """A hub id as given; a local directory as its absolute path (recorded in the dataset metadata)."""
    return vae_id(name)


def round_like_stored(contexts: torch.Tensor) -> torch.Tensor:
    """Float contexts rounded through CONTEXT_DTYPE and back to their dtype: what a dataset stores, so that
    contexts encoded at sampling time equal those training saw."""
    return contexts.to(_CONTEXT_TORCH_DTYPE).to(contexts.dtype)


def to_stored(contexts: torch.Tensor) -> np.ndarray:
    """(N, L, D) float contexts -> the CONTEXT_DTYPE array a dataset stores (round to nearest even)."""
    stored = contexts.to(_CONTEXT_TORCH_DTYPE).cpu().numpy()
    if not np.isfinite(stored).all():
        raise RuntimeError(f"text encoder outputs exceed the range of {np.dtype(CONTEXT_DTYPE).name}")
    return stored


@dataclass(frozen=True, eq=False)
class TextEncoder:
    """A tokenizer and a CLIPTextModel (eval mode, float32, frozen) on one device."""

    tokenizer: object  # transformers tokenizer
    model: torch.nn.Module  # transformers CLIPTextModel
    name: str  # hub id, or the absolute path of a local directory
    max_length: int  # tokens per caption: the tokenizer's model_max_length, 77 for CLIP
    dim: int  # hidden size: 768 for CLIP ViT-L/14
    weights_sha256: str  # models.weights_sha256 of the model's state dict: the encoder by content

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """captions -> (N, max_length, dim) float32 contexts on the CPU (U-ViT's FrozenCLIPEmbedder)."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        hidden = self.model(input_ids=tokens["input_ids"].to(self.device)).last_hidden_state
        return hidden.float().cpu()

    def null(self) -> torch.Tensor:
        """(max_length, dim) float32: the context of the empty caption, the null condition for guidance."""
        return self.encode([""])[0]


@contextmanager
def _quiet_transformers():
    """transformers reports the vision tower of a full CLIP as unused weights, at length; that is expected."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _cannot_load(name: str, error: Exception) -> UserError:
    where = "local directory" if Path(name).exists() else "hub id (there is no local directory of that name)"
    reason = " ".join(str(error).split())  # transformers' messages span lines; a UserError is one
    return UserError(f"cannot load the text encoder --text-encoder {name} as a {where}: {reason}")


def load_text_encoder(name: str, device: torch.device | str = "cpu") -> TextEncoder:
    """AutoTokenizer and CLIPTextModel `from_pretrained(name)`, a hub id or a local directory; UserError
    saying why when they cannot be loaded or are not a CLIP text encoder."""
    import transformers

    import models  # the one definition of weights by content, shared with checkpoints

    name = text_encoder_id(name)
    if not Path(name).exists() and not re.fullmatch(HUB_ID_PATTERN, name):
        raise UserError(
            f"the text encoder --text-encoder {name} is neither a local directory nor a hub id (owner/name)"
        )
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise _cannot_load(name, error) from error
        if config.model_type not in CLIP_MODEL_TYPES:
            raise UserError(
                f"the text encoder --text-encoder {name} is a {config.model_type!r} model, not a CLIP text model "
                f"(model_type {' or '.join(map(repr, CLIP_MODEL_TYPES))})"
            )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
            model, info = transformers.CLIPTextModel.from_pretrained(
                name, dtype=torch.float32, output_loading_info=True
            )
        except (OSError, ValueError) as error:
            raise _cannot_load(name, error) from error
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(
            f"the text encoder --text-encoder {name} is not a CLIP text model: its weights lack "
            f"{len(missing)} of the model's tensors (first: {missing[0]})"
        )
    max_length = tokenizer.model_max_length
    if not isinstance(max_length, int) or not 0 < max_length <= MAX_SANE_LENGTH:
        raise UserError(
            f"the tokenizer of --text-encoder {name} has model_max_length {max_length}: set model_max_length "
            "(77 for CLIP) in its tokenizer_config.json"
        )
    positions = model.config.max_position_embeddings
    if max_length > positions:
        raise UserError(
            f"the tokenizer of --text-encoder {name} has model_max_length {max_length}, more than the "
            f"{positions} positions of its text model; set model_max_length to at most {positions}"
        )
    model = model.to(device).eval().requires_grad_(False)
    dim = model.config.hidden_size
    return TextEncoder(tokenizer, model, name, max_length, dim, models.weights_sha256(model.state_dict()))
