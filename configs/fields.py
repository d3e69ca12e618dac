"""Typed config fields: a dataclass field that also describes its command-line flag.

Every training setting is a field of a frozen dataclass (configs/schema.py, and each guidance
method's config), with its default and one line of help in one place, so `train.py --help`, the
presets and the code cannot disagree. The flag is the field's name with hyphens: `t_max` is `--t-max`.
"""
import dataclasses
import math

ON_OFF = ("on", "off")


def option(default, help, *, choices=None, type=None, objective=None, families=None, minimum=None, maximum=None,
           exclusive_minimum=False):
    """A config field with its flag's help and checks.

    choices: the accepted values (bool fields take on/off); type: how a flag's text is parsed when the
    default does not tell (a None default); objective: "flow" or "ddpm" when the setting exists only
    for the families of that objective (a flag given for another family is refused); families: the model
    families (models.FAMILIES keys) the setting exists for, where that is narrower; minimum/maximum: the
    closed range of a number (exclusive_minimum: the minimum itself is refused).
    """
    metadata = {"help": help, "choices": choices, "type": type, "objective": objective, "families": families,
                "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum}
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


def value_type(field):
    """The Python type a flag's text becomes: the declared one, else the default's."""
    declared = field.metadata.get("type")
    return declared if declared is not None else type(field.default)


def format_value(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def check_range(config):
    """The minimum/maximum/choices of every field of a config dataclass; returns the first problem as
    'flag value: why', or None."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        meta = field.metadata
        if value is None or isinstance(value, (bool, tuple)):
            continue
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
            return f"{flag_name(field.name)} {value}: must be a finite number"
        if meta.get("choices") is not None and value not in meta["choices"]:
            return f"{flag_name(field.name)} {value}: choose one of {', '.join(map(str, meta['choices']))}"
        low, high = meta.get("minimum"), meta.get("maximum")
        if low is not None and (value < low or (meta.get("exclusive_minimum") and value == low)):
            relation = ">" if meta.get("exclusive_minimum") else ">="
            return f"{flag_name(field.name)} {value}: must be {relation} {low}"
        if high is not None and value > high:
            return f"{flag_name(field.name)} {value}: must be <= {high}"
    return None
