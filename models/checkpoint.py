"""Loading backbones from this project's checkpoints and from the public DiT/SiT/SRA/REPA releases.

Key names are the public releases' (SPEC §1). A checkpoint is either a bare state dict or a dict with
`model`/`ema` entries; `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped; the SRA
release's projection head (`ap_head.*`) and REPA's projectors (`projectors.*`) are not part of the
backbone and are returned separately. Anything else that does not fit is an error naming the keys.
"""
import dataclasses
import pickle
from pathlib import Path

import torch

from .registry import DATA_AT_0, DATA_AT_1, FAMILIES, SIZES, TIME_CONVENTIONS, create_model, parse_model_name

# Written by train.py; versioned so old files stay readable. Version 2 nests the config by section and
# adds a checksum and the objective to the metadata; sampling and analysis read both.
CHECKPOINT_FORMAT = "sra-checkpoint/2"
CHECKPOINT_FORMAT_V1 = "sra-checkpoint/1"
CHECKPOINT_FORMATS = (CHECKPOINT_FORMAT_V1, CHECKPOINT_FORMAT)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EXTRA_KEY_GROUPS = ("ap_head", "projectors")  # SRA release head; REPA projectors
SHOW_KEYS = 8  # how many offending keys an error message lists


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    time_convention: str
    source: str  # which weights were used: "ema", "model" or "state_dict"
    extras: dict  # groups of non-backbone keys found in the file, e.g. {"ap_head": {...}}
    metadata: dict  # this project's metadata block, {} for public releases
    notes: list  # how the name and time convention were decided, for the user


def checkpoint_metadata(model, time_convention):
    """The block a checkpoint of `model` carries so that it loads without flags."""
    if time_convention not in TIME_CONVENTIONS:
        raise ValueError(f"time convention must be one of {TIME_CONVENTIONS}, got {time_convention!r}")
    return {"model": dict(model.spec), "time_convention": time_convention}


def strip_wrapper_prefixes(state_dict):
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def split_extras(state_dict):
    """Backbone keys, and the non-backbone groups (SRA `ap_head`, REPA `projectors`) separately."""
    backbone, extras = {}, {}
    for key, value in state_dict.items():
        group = key.split(".", 1)[0]
        if group in EXTRA_KEY_GROUPS:
            extras.setdefault(group, {})[key.split(".", 1)[1]] = value
        else:
            backbone[key] = value
    return backbone, extras


def _torch_load(path, map_location):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # Release training files pickle an argparse.Namespace under `args`; a local file the user
        # chose to load is trusted the way those releases' own loaders trust it.
        return torch.load(path, map_location=map_location, weights_only=False)


def _select_weights(raw, prefer):
    """(state dict, source, metadata, args) from whatever the file holds."""
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint holds a {type(raw).__name__}, expected a state dict or a dict of them")
    metadata = raw.get("meta", {}) if raw.get("format") in CHECKPOINT_FORMATS else {}
    for source in (prefer, "ema", "model"):
        if isinstance(raw.get(source), dict):
            return raw[source], source, metadata, raw.get("args")
    if all(isinstance(value, torch.Tensor) for value in raw.values()):
        return raw, "state_dict", metadata, None
    raise ValueError(
        f"checkpoint has no 'ema' or 'model' state dict and is not one itself; keys: {sorted(raw)[:SHOW_KEYS]}"
    )


def infer_architecture(state_dict):
    """Shape facts of a backbone state dict: patch, channels, input size, width, depth, classes."""
    required = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not a DiT/SiT state dict: missing {missing}")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    tokens = state_dict["pos_embed"].shape[1]
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "input_size": int(round(tokens**0.5)) * patch,
        "hidden_size": hidden,
        "depth": depth,
        # Public releases always carry the null-class row (trained with label dropout 0.1).
        "num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "learn_sigma": out_channels == 2 * in_channels,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state_dict,
    }


def _size_for(arch):
    for size, (depth, hidden, _) in SIZES.items():
        if (depth, hidden) == (arch["depth"], arch["hidden_size"]):
            return size
    return None


def _decide_name(model_name, metadata, arch, extras, notes):
    if model_name is None and metadata:
        return metadata["model"]["name"]
    size = _size_for(arch)
    if model_name is not None:
        family, expected_size, patch = parse_model_name(model_name)
        depth, hidden, _ = SIZES[expected_size]
        if (depth, hidden, patch) != (arch["depth"], arch["hidden_size"], arch["patch_size"]):
            raise ValueError(
                f"{model_name} has depth {depth}, width {hidden}, patch {patch}, but the checkpoint has depth "
                f"{arch['depth']}, width {arch['hidden_size']}, patch {arch['patch_size']}"
            )
        return model_name
    if size is None:
        raise ValueError(f"checkpoint depth {arch['depth']} / width {arch['hidden_size']} match no registered size")
    if "projectors" in extras:
        notes.append("family SiT: REPA projectors present")
        return f"SiT-{size}/{arch['patch_size']}"
    raise ValueError(
        f"cannot tell whether this {size}/{arch['patch_size']} checkpoint is DiT or SiT; "
        f"pass the model name (e.g. --model SiT-{size}/{arch['patch_size']})"
    )


def _decide_time_convention(name, metadata, extras, args, override, notes):
    if override is not None:
        if override not in TIME_CONVENTIONS:
            raise ValueError(f"time convention must be one of {TIME_CONVENTIONS}, got {override!r}")
        notes.append(f"time convention {override}: given by the caller")
        return override
    if metadata:
        return metadata["time_convention"]
    family = FAMILIES[parse_model_name(name)[0]]
    if family.objective == "ddpm":
        return family.time_convention  # DiT releases and this project agree on integer steps
    if extras or (args is not None and hasattr(args, "encoder_depth")):
        notes.append("time convention data_at_0: SRA/REPA release (t = 0 is data)")
        return DATA_AT_0
    notes.append("time convention data_at_1: SiT release (t = 1 is data); pass time_convention to override")
    return DATA_AT_1


def load_checkpoint(path, model_name=None, *, time_convention=None, prefer="ema", map_location="cpu"):
    """Build the backbone a checkpoint describes and load its weights strictly.

    path: this project's training checkpoint (metadata inside, no flags needed) or a public release.
    model_name: needed only where the file cannot say (a bare DiT/SiT state dict).
    prefer: "ema" (default, what is sampled and evaluated) or "model" (the online weights).
    """
    raw = _torch_load(path, map_location)
    weights, source, metadata, args = _select_weights(raw, prefer)
    backbone, extras = split_extras(strip_wrapper_prefixes(weights))
    arch = infer_architecture(backbone)
    notes = []
    name = _decide_name(model_name, metadata, arch, extras, notes)
    convention = _decide_time_convention(name, metadata, extras, args, time_convention, notes)
    if metadata:
        spec = metadata["model"]
        model = create_model(spec["name"], spec["input_size"], spec["in_channels"], spec["num_classes"],
                             **spec["options"])
    else:
        family = parse_model_name(name)[0]
        options = {"learn_sigma": arch["learn_sigma"], "qk_norm": arch["qk_norm"]}
        if options["learn_sigma"] == FAMILIES[family].learn_sigma:
            del options["learn_sigma"]
        model = create_model(name, arch["input_size"], arch["in_channels"], arch["num_classes"], **options)
    load_backbone_state(model, backbone)
    return LoadedModel(model.eval(), name, convention, source, extras, metadata, notes)


def load_backbone_state(model, state_dict):
    """load_state_dict(strict=True) with an error that lists the offending keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
            problems.append(f"{label} keys: {', '.join(keys[:SHOW_KEYS])}{more}")
    if problems:
        raise ValueError("checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
