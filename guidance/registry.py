"""The guidance methods by `--guidance` name. A new method is one module beside sra/ and repa/ (a config
dataclass and a `Guidance` subclass), one line here, and its presets."""
from repa.method import REPA
from sra.method import SRA

from .base import AlignmentConfig, Guidance, GuidanceContext

METHODS: dict[str, type[Guidance]] = {SRA.name: SRA, REPA.name: REPA}
NONE = "none"  # the baseline: no alignment loss
CHOICES = (NONE, *METHODS)


def config_class(method: str) -> type[AlignmentConfig]:
    return METHODS[method].config_class


def build_guidance(config: AlignmentConfig | None, context: GuidanceContext) -> Guidance | None:
    """The method that `config` configures, or None for the baseline."""
    return None if config is None else METHODS[config.method](config, context)
