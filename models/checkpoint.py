"""Loading backbones from this project's checkpoints and from the public DiT/SiT/SRA/REPA releases
(REPA's MMDiT included).

Key names are the public releases' (SPEC §1). A checkpoint is either a bare state dict or a dict with
`model`/`ema` entries; `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped; the SRA
release's projection head (`ap_head.*`) and REPA's projectors (`projectors.*`) are not part of the
backbone and are returned separately. Anything else that does not fit is an error naming the keys.
Files are read by torch's weights-only unpickler (tensors, plain values and the releases' pickled
argparse.Namespace): nothing in a checkpoint runs as code, and a file that would is refused.
"""
import argparse
import dataclasses
import hashlib
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from conditioning import TEXT
from errors import UserError

from .registry import (
    DATA_AT_0,
    DATA_AT_1,
    DISCRETE_STEPS,
    FAMILIES,
    TIME_CONVENTIONS,
    create_model,
    family_of,
    model_shape,
    parse_model_name,
)

# Written by train.py; versioned so old files stay readable. Version 2 nests the config by section and
# adds a checksum and the objective to the metadata; sampling and analysis read both.
CHECKPOINT_FORMAT = "sra-checkpoint/2"
CHECKPOINT_FORMAT_V1 = "sra-checkpoint/1"
CHECKPOINT_FORMATS = (CHECKPOINT_FORMAT_V1, CHECKPOINT_FORMAT)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EXTRA_KEY_GROUPS = ("ap_head", "projectors")  # SRA release head; REPA projectors
SHOW_KEYS = 8  # how many offending keys an error message lists
REPA_FAMILY = "SiT"  # REPA trains SiT only (SPEC §7): its projectors say which family a file holds
METADATA_MODEL_KEYS = ("name", "input_size", "in_channels", "num_classes", "options")  # model.spec

# The only non-tensor type the public training files pickle: the DiT, SiT, REPA and SRA train.py
# scripts save their argparse.Namespace under `args`. A Namespace pickles as its class plus a dict of
# plain values (NEWOBJ, BUILD), so allowing the class is all they need; anything else is refused.
RELEASE_SAFE_GLOBALS = (argparse.Namespace,)
# How torch's weights-only unpickler names a refused type (it drops the module of a builtin: "GLOBAL exec").
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S*\w) (?:was not an allowed global|whose module)")
UNPICKLER_DETAIL = "WeightsUnpickler error:"  # precedes the specific part of torch's long message
# What torch.load raises for a file that is truncated, corrupt or no torch.save file at all.
UNREADABLE_FILE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, IndexError,
                          KeyError, struct.error)
# This project's training checkpoints carry a sha256 over the rest of their content under this key
# (training/checkpoints.py writes it); every reader recomputes it, so a flipped byte is caught.
DIGEST_KEY = "sha256"


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


def content_digest(value, digest=None):
    """sha256 over a checkpoint's content in a fixed order: dict keys sorted, tensors by dtype, shape and
    bytes, anything else by its repr."""
    digest = digest or hashlib.sha256()
    if isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode() + b":")
            content_digest(value[key], digest)
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[")
        for item in value:
            content_digest(item, digest)
        digest.update(b"]")
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())
    return digest


def check_content_digest(state):
    """`state` without its DIGEST_KEY entry, once the content hashes to it; ValueError otherwise."""
    state = dict(state)
    expected = state.pop(DIGEST_KEY)
    actual = content_digest(state).hexdigest()
    if actual != expected:
        raise ValueError(f"checksum mismatch: the content hashes to {actual[:16]}…, the file says {expected[:16]}…")
    return state


def read_checkpoint_file(path, map_location="cpu", mmap=False):
    """torch.load with the weights-only unpickler: tensors, plain values and argparse.Namespace, never
    code. A missing, unreadable or code-carrying file is a UserError naming it; nothing from the file
    runs, whoever made it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(RELEASE_SAFE_GLOBALS)):
            # Only zip-format files (torch >= 1.6) can be memory-mapped; older ones are read whole.
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except UNREADABLE_FILE_ERRORS as error:
        refused = REFUSED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if refused is not None:
            name = refused[1] if "." in refused[1] else f"builtins.{refused[1]}"
            raise UserError(
                f"{path} was not loaded: it pickles {name}, and unpickling that would run code; only "
                "tensors, plain values and argparse.Namespace are read"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt or not written by torch.save): "
                        f"{_failure_detail(error)}") from None


def _failure_detail(error) -> str:
    """One short line of why torch.load failed; torch's unpickler text is long and advises turning the
    weights-only loader off, which this project never does, so only its specific part is kept."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        detail = UNPICKLER_DETAIL in text
        text = text.split(UNPICKLER_DETAIL, 1)[1] if detail else "refused by the weights-only unpickler"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].split('. ')[0][:200] if lines else 'no detail'}"


def weights_sha256(state_dict) -> str:
    """sha256 over a state dict's tensors in sorted key order (name, dtype, shape, bytes): the
    weights by content, wherever their file lies and whatever else it holds."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _select_weights(raw, prefer):
    """(state dict, source, metadata, args) from whatever the file holds."""
    if not isinstance(raw, dict):
        raise UserError(f"the checkpoint holds a {type(raw).__name__}, expected a state dict or a dict of them")
    metadata = _metadata(raw) if raw.get("format") in CHECKPOINT_FORMATS else {}
    for source in (prefer, "ema", "model"):
        if isinstance(raw.get(source), dict):
            return _tensors_only(raw[source], f"its '{source}' entry"), source, metadata, raw.get("args")
    if raw and all(isinstance(value, torch.Tensor) for value in raw.values()):
        return raw, "state_dict", metadata, None
    raise UserError(
        f"the checkpoint has no 'ema' or 'model' state dict and is not one itself; "
        f"keys: {sorted(map(str, raw))[:SHOW_KEYS]}"
    )


def _metadata(raw):
    """This project's metadata block, checked for what the loader reads (checkpoint_metadata)."""
    metadata = raw.get("meta")
    spec = metadata.get("model") if isinstance(metadata, dict) else None
    if not (isinstance(spec, dict) and all(key in spec for key in METADATA_MODEL_KEYS)
            and metadata.get("time_convention") in TIME_CONVENTIONS):
        raise UserError(f"the checkpoint says it is {raw['format']}, but its metadata ('meta') is malformed: "
                        f"it needs model {{{', '.join(METADATA_MODEL_KEYS)}}} and a time_convention")
    return metadata


def _tensors_only(state_dict, what):
    bad = [str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise UserError(f"{what} is not a state dict: {', '.join(bad[:SHOW_KEYS])} "
                        f"{'is' if len(bad) == 1 else 'are'} not tensors")
    return state_dict


def infer_architecture(state_dict):
    """Shape facts of a backbone state dict: family (None where DiT and SiT cannot be told apart), patch,
    channels, input size, width, depth, and classes (DiT/SiT) or context width (MMDiT)."""
    if any(key.startswith("joint_blocks.") for key in state_dict):
        return _infer_mmdit(state_dict)
    required = {"x_embedder.proj.weight": 4, "pos_embed": 3, "y_embedder.embedding_table.weight": 2,
                "final_layer.linear.weight": 2}  # key: its number of dimensions
    _check_keys(state_dict, required, "DiT/SiT")
    arch = _common_architecture(state_dict, "blocks.")
    return {
        **arch,
        "family": None,
        # Public releases always carry the null-class row (trained with label dropout 0.1).
        "num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state_dict,
    }


def _infer_mmdit(state_dict):
    required = {"x_embedder.proj.weight": 4, "pos_embed": 3, "context_embedder.weight": 2,
                "final_layer.linear.weight": 2}
    _check_keys(state_dict, required, "MMDiT")
    return {
        **_common_architecture(state_dict, "joint_blocks."),
        "family": "MMDiT",
        "num_classes": 0,
        "context_dim": state_dict["context_embedder.weight"].shape[1],
        "qk_norm": "joint_blocks.0.x_block.attn.ln_q.weight" in state_dict,
    }


def _check_keys(state_dict, required, what):
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise UserError(f"not a {what} state dict: missing {missing}")
    misshapen = [f"{key} {tuple(state_dict[key].shape)}" for key, ndim in required.items()
                 if state_dict[key].ndim != ndim]
    if misshapen:
        raise UserError(f"not a {what} state dict: {', '.join(misshapen)} have the wrong number of dimensions")


def _common_architecture(state_dict, blocks_prefix):
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    tokens = state_dict["pos_embed"].shape[1]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "input_size": int(round(tokens**0.5)) * patch,
        "hidden_size": hidden,
        "depth": len({key.split(".")[1] for key in state_dict if key.startswith(blocks_prefix)}),
        "learn_sigma": out_channels == 2 * in_channels,
    }


def _size_for(arch, family):
    for size, (depth, hidden, _) in FAMILIES[family].sizes.items():
        if (depth, hidden) == (arch["depth"], arch["hidden_size"]):
            return size
    return None


def _decide_name(model_name, metadata, arch, extras, notes):
    """The model's name: what the file says (this project's metadata; REPA's projectors say SiT) wins,
    and a model_name that contradicts it is an error rather than a model built against its file."""
    if metadata:
        held = metadata["model"]["name"]
        if model_name is not None and model_name != held:
            raise UserError(f"the checkpoint holds {held} (its metadata); --model {model_name} contradicts it")
        return held
    if model_name is not None:
        family, _, patch = parse_model_name(model_name)
        if arch["family"] is not None and family != arch["family"]:
            raise UserError(f"the checkpoint holds an {arch['family']} model (its keys); --model {model_name} "
                            "contradicts it")
        if arch["family"] is None and "projectors" in extras and family != REPA_FAMILY:
            raise UserError(f"the checkpoint holds a {REPA_FAMILY} model (its REPA projectors); "
                            f"--model {model_name} contradicts it")
        depth, hidden, _ = model_shape(model_name)
        if (depth, hidden, patch) != (arch["depth"], arch["hidden_size"], arch["patch_size"]):
            raise UserError(
                f"{model_name} has depth {depth}, width {hidden}, patch {patch}, but the checkpoint has depth "
                f"{arch['depth']}, width {arch['hidden_size']}, patch {arch['patch_size']}"
            )
        return model_name
    size = _size_for(arch, arch["family"] or REPA_FAMILY)  # DiT and SiT share their sizes
    if size is None:
        raise UserError(f"checkpoint depth {arch['depth']} / width {arch['hidden_size']} match no registered size")
    if arch["family"] is not None:
        return f"{arch['family']}-{size}/{arch['patch_size']}"
    if "projectors" in extras:
        notes.append(f"family {REPA_FAMILY}: REPA projectors present")
        return f"{REPA_FAMILY}-{size}/{arch['patch_size']}"
    raise UserError(
        f"cannot tell whether this {size}/{arch['patch_size']} checkpoint is DiT or SiT; "
        f"pass the model name (e.g. --model SiT-{size}/{arch['patch_size']})"
    )


def _decide_time_convention(name, metadata, extras, args, override, notes):
    family = family_of(name)
    if override is not None:
        if override not in TIME_CONVENTIONS:
            raise UserError(f"time convention must be one of {TIME_CONVENTIONS}, got {override!r}")
        if metadata and override != metadata["time_convention"]:
            raise UserError(f"the checkpoint holds a model in time convention {metadata['time_convention']} "
                            f"(its metadata); --time-convention {override} contradicts it")
        # Integer steps belong to the DDPM family alone; flow models take t in [0, 1] either way round.
        discrete = family.time_convention == DISCRETE_STEPS
        fitting = [convention for convention in TIME_CONVENTIONS if (convention == DISCRETE_STEPS) == discrete]
        if override not in fitting:
            raise UserError(f"{name} is a {family.objective} model; --time-convention {override} contradicts it "
                            f"(it takes {' or '.join(fitting)})")
        notes.append(f"time convention {override}: given by the caller")
        return override
    if metadata:
        return metadata["time_convention"]
    if family.objective == "ddpm":
        return family.time_convention  # DiT releases and this project agree on integer steps
    if family.condition == TEXT:
        notes.append("time convention data_at_0: REPA's MMDiT (t = 0 is data)")
        return DATA_AT_0
    if extras or (args is not None and hasattr(args, "encoder_depth")):
        notes.append("time convention data_at_0: SRA/REPA release (t = 0 is data)")
        return DATA_AT_0
    notes.append("time convention data_at_1: SiT release (t = 1 is data); pass time_convention to override")
    return DATA_AT_1


def load_checkpoint(path, model_name=None, *, time_convention=None, prefer="ema", map_location="cpu"):
    """Build the backbone a checkpoint describes and load its weights strictly.

    path: this project's training checkpoint (metadata inside, no flags needed) or a public release.
    model_name: needed only where the file cannot say (a bare DiT/SiT state dict); where it can, a
        contradicting name is an error, as is a time_convention that contradicts its metadata.
    prefer: "ema" (default, what is sampled and evaluated) or "model" (the online weights).
    A file that does not fit is a UserError naming it.
    """
    raw = read_checkpoint_file(path, map_location)
    try:
        if isinstance(raw, dict) and DIGEST_KEY in raw:  # this project's training file: verify it first
            try:
                raw = check_content_digest(raw)
            except ValueError as error:
                raise UserError(f"the file is damaged ({error}); use another checkpoint of the run") from None
        return _build(raw, model_name, time_convention, prefer)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def _build(raw, model_name, time_convention, prefer):
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
        options = {"learn_sigma": arch["learn_sigma"], "qk_norm": arch["qk_norm"]}
        if options["learn_sigma"] == family_of(name).learn_sigma:
            del options["learn_sigma"]
        if "context_dim" in arch:
            options["context_dim"] = arch["context_dim"]
        model = create_model(name, arch["input_size"], arch["in_channels"], arch["num_classes"], **options)
    load_backbone_state(model, backbone)
    return LoadedModel(model.eval(), name, convention, source, extras, metadata, notes)


def load_backbone_state(model, state_dict):
    """load_state_dict(strict=True) with a UserError that lists the offending keys, shapes and dtypes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shared = sorted(set(expected) & set(state_dict))
    mismatched = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in shared if state_dict[key].shape != expected[key].shape]
    # load_state_dict would cast integer or complex weights into the float parameters without a word.
    wrong_dtype = [f"{key}: checkpoint {state_dict[key].dtype} vs model {expected[key].dtype}"
                   for key in shared if state_dict[key].is_complex()
                   or state_dict[key].is_floating_point() != expected[key].is_floating_point()]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
                        ("dtype mismatch", wrong_dtype)):
        if keys:
            more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
            problems.append(f"{label} keys: {', '.join(keys[:SHOW_KEYS])}{more}")
    if problems:
        raise UserError("checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
