"""Training configuration: presets (plain data), the typed config sections (`configs.schema`) and the
command line that resolves flags and presets into them (`configs.cli`)."""
from .presets import PRESET_NAMES, PRESETS

__all__ = ["PRESETS", "PRESET_NAMES"]
