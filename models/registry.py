"""Model registry: every `DiT-{S,B,L,XL}/{2,4,8}` and `SiT-{S,B,L,XL}/{2,4,8}` (SPEC §1), and the one
table of what a model family means: how it is trained and sampled, its output, its time convention."""
import dataclasses

from errors import UserError

from .transformer import DiT

# (depth, hidden size, heads) per size, SPEC §1 table (the DiT paper's configurations), plus T,
# DeiT-Tiny's shape, which no paper trains: the debug and demo presets use it.
SIZES = {
    "T": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)

# Time conventions (SPEC §2): what the network's time input means.
DATA_AT_0 = "data_at_0"  # flow t in [0, 1], 0 = data: this project, the SRA and REPA releases
DATA_AT_1 = "data_at_1"  # flow t in [0, 1], 1 = data: the original SiT release
DISCRETE_STEPS = "ddpm"  # DiT: integer steps in [0, 999], 0 = least noise
TIME_CONVENTIONS = (DATA_AT_0, DATA_AT_1, DISCRETE_STEPS)


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family is, beyond the shared transformer (SPEC §1–2)."""

    objective: str  # the objective it trains and samples with: "ddpm" or "flow" (objectives.registry)
    learn_sigma: bool  # default output: DiT ε plus the variance range (2C channels), SiT velocity (C)
    time_convention: str  # the convention of the models this project trains


# The one table every part of the project asks: training, sampling, checkpoints, analysis.
FAMILIES = {
    "DiT": Family(objective="ddpm", learn_sigma=True, time_convention=DISCRETE_STEPS),
    "SiT": Family(objective="flow", learn_sigma=False, time_convention=DATA_AT_0),
}
MODEL_NAMES = tuple(
    f"{family}-{size}/{patch}" for family in FAMILIES for size in SIZES for patch in PATCH_SIZES
)


def parse_model_name(name):
    """'SiT-XL/2' -> ('SiT', 'XL', 2), with an error listing the valid names."""
    try:
        family, rest = name.split("-", 1)
        size, patch = rest.split("/")
        patch = int(patch)
    except ValueError:
        family = size = patch = None
    if family not in FAMILIES or size not in SIZES or patch not in PATCH_SIZES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return family, size, patch


def model_family(name):
    return parse_model_name(name)[0]


def family_of(name):
    """The `Family` of a registered model name: FAMILIES[model_family(name)]."""
    return FAMILIES[model_family(name)]


def create_model(name, input_size=32, in_channels=4, num_classes=1000, **options):
    """Build a registered model. `options` override the family defaults (learn_sigma, qk_norm,
    class_dropout_prob, fused_attn) and, for tests and small experiments, the size's shape
    (depth, hidden_size, num_heads)."""
    family, size, patch = parse_model_name(name)
    depth, hidden_size, num_heads = SIZES[size]
    kwargs = {"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads,
              "learn_sigma": FAMILIES[family].learn_sigma}
    kwargs.update(options)
    model = DiT(input_size=input_size, patch_size=patch, in_channels=in_channels, num_classes=num_classes, **kwargs)
    # Everything needed to rebuild this model; checkpoints store it so they load without flags.
    model.spec = {
        "name": name,
        "input_size": input_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "options": dict(options),
    }
    return model
