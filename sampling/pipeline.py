"""From a checkpoint to uint8 images: the model in this project's time convention, its objective's
sampler, the decoder, and one batch of global indices at a time."""
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import models
from errors import UserError
from objectives.registry import create_objective, from_description
from sampling.images import to_uint8
from sampling.seeds import initial_noise, sampler_generators
from transport import ReversedTime

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # SPEC §4: the decoder of the DiT, SiT, REPA and SRA evaluations
NO_VAE = "none"  # pixel-space models: the sample is the image
CFG_CHANNELS = {"all": None, "3": models.RELEASE_DIT_GUIDED_CHANNELS}
DEFAULT_FLOW = {"path": "linear", "prediction": "velocity"}  # every public SiT/REPA/SRA release (SPEC §2)


def training_info(path) -> dict:
    """What this project's checkpoints say about their training, read without loading the weights
    (memory-mapped): {"objective": {"kind", **options} or None, "vae", "data_dir", "condition" (what the
    model is conditioned on: kind, and for text the encoder by name and content)}; all None for public
    releases. Reads both checkpoint formats (version 1 kept a flat config). The file is read
    by the loader's weights-only unpickler: a file it refuses is a UserError here too, never skipped."""
    info = {"objective": None, "vae": None, "data_dir": None, "condition": None}
    raw = models.read_checkpoint_file(path, mmap=True)
    if not isinstance(raw, dict) or raw.get("format") not in models.CHECKPOINT_FORMATS:
        return info
    if raw["format"] == models.CHECKPOINT_FORMAT_V1:
        config = raw.get("config", {})
        if not isinstance(config, dict):
            raise UserError(f"{path} says it is {raw['format']}, but its training config ('config') is malformed")
        if models.family_of(config.get("model", "SiT-B/2")).objective == "flow":
            info["objective"] = {"kind": "flow", **{key: config.get(key, value) for key, value in DEFAULT_FLOW.items()}}
        return {**info, "vae": config.get("vae"), "data_dir": config.get("data_dir")}
    meta = raw.get("meta")
    if not isinstance(meta, dict):
        raise UserError(f"{path} says it is {raw['format']}, but has no metadata block ('meta')")
    return {key: meta.get(key) for key in info}


def load_model(path, model_name=None, time_convention=None, weights="ema"):
    """(model in this project's convention, LoadedModel). A SiT release model (t = 1 data) is
    wrapped in transport.ReversedTime (SPEC §2)."""
    loaded = models.load_checkpoint(path, model_name, time_convention=time_convention, prefer=weights)
    model = ReversedTime(loaded.model) if loaded.time_convention == models.DATA_AT_1 else loaded.model
    return model.eval().requires_grad_(False), loaded


def build_objective(loaded, info: dict):
    """The objective the backbone was trained with: as this project's checkpoint records it, else its
    family's (models.FAMILIES) with the public releases' settings."""
    if info.get("objective") is not None:
        return from_description(info["objective"])
    kind = models.family_of(loaded.name).objective
    if kind == "ddpm":
        return create_objective(kind, learn_sigma=loaded.model.learn_sigma)
    return create_objective(kind, **DEFAULT_FLOW)


@dataclasses.dataclass
class Decoder:
    name: str  # VAE hub id or directory, or "none"
    channels: int  # latent channels it takes
    downsample: int  # image pixels per latent pixel along a side
    decode: Callable[[torch.Tensor], torch.Tensor]  # model space (N, C, h, w) -> (N, 3, H, W) in [-1, 1]
    source: str  # why this decoder, for the log


def dataset_index(config: dict) -> dict | None:
    """The index of the dataset the checkpoint was trained on, where it is still readable.
    config: {"data_dir", "vae"} of the training run (training_info, or train.py's own)."""
    from preprocessing import store

    data_dir = config.get("data_dir")
    path = Path(data_dir) / store.INDEX_FILE if data_dir else None
    return store.read_json(path) if path is not None and path.is_file() else None


def choose_vae(vae_flag: str | None, config: dict) -> tuple[str, str, dict | None]:
    """(name, why, dataset index): --vae, else the training run's VAE, else DEFAULT_VAE."""
    dataset = dataset_index(config)
    if vae_flag is not None:
        return vae_flag, "--vae", dataset
    if config.get("vae"):
        return config["vae"], "the checkpoint's training config", dataset
    if dataset is not None:
        name = NO_VAE if dataset["kind"] == "pixels" else dataset["vae"]
        return name, f"the training dataset {config['data_dir']}", dataset
    return DEFAULT_VAE, "the default (SPEC §4)", None


def load_decoder(vae_flag: str | None, config: dict, device) -> Decoder:
    name, source, dataset = choose_vae(vae_flag, config)
    if name == NO_VAE:
        return Decoder(NO_VAE, 3, 1, lambda x: x, source)
    from preprocessing.vae import load_vae  # diffusers is needed only here

    vae = load_vae(name, device)
    scale, shift = vae.scaling.scale, vae.scaling.shift
    if dataset is not None and dataset["kind"] == "vae" and dataset["vae"] == vae.name:
        scale, shift = dataset["scale"], dataset["shift"]  # the constants the model was trained with
        encoded_by = dataset.get("vae_sha256")  # datasets written before it was recorded lack it
        if vae_flag is None and encoded_by is not None and encoded_by != vae.weights_sha256:
            raise UserError(f"the VAE {vae.name} now holds other weights (sha256 {vae.weights_sha256[:12]}…) than "
                            f"the ones that encoded the training dataset ({encoded_by[:12]}…); restore them, or "
                            "pass --vae to decode with another VAE on purpose")

    def decode(x):
        return vae.model.decode(x / scale + shift).sample

    return Decoder(vae.name, vae.latent_channels, vae.downsample, decode, source)


def check_compatible(backbone, decoder: Decoder, image_size: int | None, cfg_scale: float) -> int:
    """Error unless the model, decoder and requested image size fit together; returns the image size."""
    if backbone.in_channels != decoder.channels:
        what = "pixel-space sampling (--vae none) needs 3" if decoder.name == NO_VAE else (
            f"the VAE {decoder.name} decodes {decoder.channels}")
        raise UserError(f"the model takes {backbone.in_channels}-channel inputs, but {what} channels")
    produced = backbone.input_size * decoder.downsample
    if image_size is not None and image_size != produced:
        raise UserError(
            f"--image-size {image_size} does not fit: the model's {backbone.input_size}×"
            f"{backbone.input_size} inputs decode to {produced}×{produced} images with {decoder.name}"
        )
    labels = getattr(backbone, "y_embedder", None)  # text models' null is the empty caption, always at hand
    if cfg_scale != 1.0 and labels is not None and labels.embedding_table.num_embeddings <= backbone.num_classes:
        raise UserError("classifier-free guidance needs a null class; this model was trained without one")
    return produced


class BatchSampler:
    """Images of the global indices [start, end): noise and conditions from the seed and the indices,
    the objective's sampler under CFG (the condition's null as the unconditional half), the decoder,
    uint8 rounding. `source` gives each index's condition (sampling.conditions)."""

    def __init__(self, model, sample_shape, objective, decoder: Decoder, settings: dict, device,
                 autocast: bool, source):
        self.model, self.sample_shape, self.objective, self.decoder = model, sample_shape, objective, decoder
        self.settings, self.device, self.autocast, self.source = settings, device, autocast, source
        self.condition = source.condition.to(device)
        self.sampler_options = {"eta": settings["ddim_eta"]} if settings["sampler"] == "ddim" else {}

    @torch.no_grad()
    def __call__(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, H, W, 3) uint8, the conditions' record (n,): labels or caption indices) for the
        indices start..end-1."""
        s = self.settings
        indices = range(start, end)
        z = initial_noise(s["seed"], indices, self.sample_shape).to(self.device)  # (n, C, h, w)
        y, record = self.source(indices)
        y = y.to(self.device)
        model_fn = models.guided_model_fn(
            self.model, y, scale=s["cfg_scale"], interval=tuple(s["guidance_interval"]),
            guide_channels=CFG_CHANNELS[s["cfg_channels"]], null=self.condition.null_like(y),
        )
        generators = sampler_generators(s["seed"], indices, self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with autocast:
            x0 = self.objective.sample(model_fn, z, method=s["sampler"], num_steps=s["num_steps"],
                                       generator=generators, **self.sampler_options)
        # The decoder runs in float32, as in the DiT and REPA scripts; chunks bound its memory.
        images = torch.cat([self.decoder.decode(chunk) for chunk in x0.split(s["vae_batch_size"])])
        return to_uint8(images, s["rounding"]), record
