"""Named training presets that command-line flags override."""
from .presets import DEFAULTS, PRESET_NAMES, PRESETS, resolve

__all__ = ["DEFAULTS", "PRESETS", "PRESET_NAMES", "resolve"]
