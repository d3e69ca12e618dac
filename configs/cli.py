"""train.py's command line: flags from the config dataclasses, and their resolution into a TrainConfig.

Resolution is DEFAULTS ← preset ← flags given, done once. A flag the chosen model family or guidance
method would ignore (`--path` for DiT, `--teacher-depth` with `--guidance repa`) is an error, not a
silent no-op; a preset's values that do not apply to the method chosen on the command line are dropped.
"""
import argparse
import dataclasses
import re

from errors import ArgumentParser, UserError
from guidance import AlignmentConfig
from guidance.registry import CHOICES, METHODS, NONE, config_class
from models import FAMILIES, DiT, family_of, model_family

from .fields import ON_OFF, flag_name, format_value, value_type
from .presets import PRESET_NAMES, PRESETS
from .schema import SECTIONS, ModelConfig, TrainConfig

DEFAULT_METHOD = "sra"
# argparse takes "-1e-3" for an option; this also reads exponent forms as (negative) numbers, so that
# `--lr -1e-3` reaches the range check and gets its message.
NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(\.\d*)?[eE][-+]?\d+$")


def _guidance_fields() -> dict[str, tuple[dataclasses.Field, tuple[str, ...]]]:
    """Every guidance flag: its field (the first method's), and the methods that take it."""
    found = {}
    for method, guidance in METHODS.items():
        for field in dataclasses.fields(guidance.config_class):
            entry = found.setdefault(field.name, (field, ()))
            found[field.name] = (entry[0], entry[1] + (method,))
    return found


def _section_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    return {field.name: (section, field) for section, cls in SECTIONS.items() for field in dataclasses.fields(cls)}


def _parse_bool(text):
    if text not in ON_OFF:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _add_flag(group, field, help_text):
    kind = value_type(field)
    choices = field.metadata.get("choices")
    kwargs = {"default": argparse.SUPPRESS, "help": help_text}
    if kind is bool:
        kwargs.update(type=_parse_bool, metavar="{on,off}")
    else:
        kwargs["type"] = kind
        if choices is not None:
            kwargs["choices"] = choices
            if len(choices) > 8:  # e.g. every registered model: name them in the help, not the usage line
                kwargs["metavar"] = field.name.upper()
    group.add_argument(flag_name(field.name), **kwargs)


def _owners(field) -> tuple[str, ...] | None:
    """The model families a setting exists for (None: every family)."""
    if field.metadata.get("families"):
        return tuple(field.metadata["families"])
    scope = field.metadata.get("objective")
    return tuple(f for f, spec in FAMILIES.items() if spec.objective == scope) if scope else None


def _help(field, default_text=None):
    default_text = default_text if default_text is not None else format_value(field.default)
    owners = _owners(field)
    where = f"; {'/'.join(owners)} models only" if owners else ""
    return f"{field.metadata['help']} (default: {default_text}{where})"


def build_parser(description=None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="train.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser._negative_number_matcher = NEGATIVE_NUMBER
    parser.add_argument("--preset", choices=PRESET_NAMES, default=argparse.SUPPRESS, metavar="NAME",
                        help=f"named starting config; flags override it: {', '.join(PRESET_NAMES)} (README, "
                             "Presets) (default: none)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check and save the resolved config, then stop (default: off)")
    parser.add_argument("--guidance", choices=CHOICES, default=argparse.SUPPRESS,
                        help=f"representation guidance: sra, repa, or none, the baseline (default: {DEFAULT_METHOD})")
    parser.add_argument("--sra", type=_parse_bool, metavar="{on,off}", default=argparse.SUPPRESS,
                        help="older spelling: on is --guidance sra, off is --guidance none (default: none, "
                             "--guidance decides)")
    titles = {"run": "run and data", "model": "model", "objective": "objective",
              "groups": "token groups: dual-time scheduling and attention separation (dts/)",
              "optim": "optimization", "output": "logging, checkpoints, samples, FID"}
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(titles[name])
        for field in dataclasses.fields(cls):
            if name == "run" and field.name == "data_dir":
                group.add_argument("--data-dir", default=argparse.SUPPRESS, metavar="DIR",
                                   help="dataset written by `python -m preprocessing` (required)")
                continue
            _add_flag(group, field, _help(field))
    shared = {field.name for field in dataclasses.fields(AlignmentConfig)}
    groups = {None: parser.add_argument_group("guidance (every method)")}
    for method in METHODS:
        groups[method] = parser.add_argument_group(f"guidance: {method} only")
    for name, (field, methods) in _guidance_fields().items():
        defaults = {m: getattr(config_class(m)(), name) for m in methods}
        if len(set(map(repr, defaults.values()))) > 1:
            default_text = ", ".join(f"{m} {format_value(v)}" for m, v in defaults.items())
        else:
            default_text = format_value(next(iter(defaults.values())))
        group = groups[None] if name in shared else groups[methods[0]]
        _add_flag(group, field, _help(field, default_text))
    # --data-dir is checked when the run starts (a dry run of the config alone may leave it out), so argparse
    # sees it as optional; the usage line shows it as what a run needs.
    parser.usage = parser.format_usage().removeprefix("usage: ").replace("[--data-dir DIR]", "--data-dir DIR")
    return parser


def parse(argv=None, description=None):
    """(argparse namespace, TrainConfig) from a command line."""
    args = build_parser(description).parse_args(argv)
    given = {key: value for key, value in vars(args).items() if key not in ("preset", "dry_run")}
    return args, resolve(getattr(args, "preset", None), given)


def _method(given: dict, preset_values: dict) -> str:
    alias = given.pop("sra", None)
    method = given.pop("guidance", None)
    if alias is not None:
        from_alias = DEFAULT_METHOD if alias else NONE
        if method is not None and method != from_alias:
            raise UserError(f"--sra {'on' if alias else 'off'} contradicts --guidance {method}; give one of them")
        method = from_alias
    return method or preset_values.pop("guidance", DEFAULT_METHOD)


def _ignored(given: dict, method: str, model_name: str) -> list[str]:
    """What the user asked for that this run would not use."""
    sections, guidance_fields = _section_fields(), _guidance_fields()
    problems = []
    for name in given:
        field = sections[name][1] if name in sections else guidance_fields[name][0]
        if name in guidance_fields and method not in guidance_fields[name][1]:
            problems.append(f"{flag_name(name)} does not apply to --guidance {method} "
                            f"(it is a setting of {', '.join(guidance_fields[name][1])})")
            continue
        owners = _owners(field)
        if owners and model_family(model_name) not in owners:
            problems.append(f"{flag_name(name)} applies to {'/'.join(owners)} models, not {model_name}")
    return problems


def _check_groups(groups, given: dict, model_name: str) -> None:
    """Token groups train SiT only (flow models with one token stream); the teacher's group settings need
    groups."""
    family = family_of(model_name)
    if groups.enabled and (family.objective != "flow" or family.backbone is not DiT):
        raise UserError(f"token groups (--mask-ratio) train flow-matching models (SiT), not {model_name}")
    unused = [flag_name(name) for name in ("teacher_t", "teacher_mask") if name in given]
    if unused and not groups.enabled:
        raise UserError(f"{' and '.join(unused)} set the teacher for token groups: give --mask-ratio with "
                        "--dual-time-scheduling on or --attention-separation on")


def _refuse_unused(config, given: dict) -> None:
    """A flag given for a field that the config's other values make irrelevant is an error."""
    unused = [f"{flag_name(name)} applies only with {needs}"
              for name, needs in config.unused_fields().items() if name in given]
    if unused:
        raise UserError("; ".join(unused))


def _pick(cls, values: dict):
    return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})


def resolve(preset: str | None = None, given: dict | None = None) -> TrainConfig:
    """DEFAULTS ← PRESETS[preset] ← given (flag dest -> value, only flags actually given)."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    given = dict(given or {})
    preset_values = dict(PRESETS[preset]) if preset else {}
    known = set(_section_fields()) | set(_guidance_fields()) | {"guidance", "sra"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise UserError(f"unknown settings: {', '.join(unknown)}")
    method = _method(given, preset_values)
    values = {**preset_values, **given}
    model = _pick(ModelConfig, values)
    problems = _ignored(given, method, model.model)
    if problems:
        raise UserError("; ".join(problems))
    if model.learn_sigma is None:
        model = dataclasses.replace(model, learn_sigma=family_of(model.model).learn_sigma)
    sections = {name: _pick(cls, values) for name, cls in SECTIONS.items() if name != "model"}
    _refuse_unused(sections["output"], given)
    guidance = None
    if method != NONE:
        guidance = _pick(config_class(method), values).resolved_for(model.model, model.depth)
        _refuse_unused(guidance, given)
        guidance = guidance.with_run_length(sections["optim"].max_steps).with_token_groups(sections["groups"].enabled)
    _check_groups(sections["groups"], given, model.model)
    return TrainConfig(preset=preset, model=model, guidance=guidance, **sections)
