"""Model registry: every `DiT-{S,B,L,XL}/{2,4,8}` and `SiT-{S,B,L,XL}/{2,4,8}` (SPEC §1), the text-to-image
`MMDiT-D{6,12,24}/{2,4,8}` (SPEC §8), and the one table of what a model family means: how it is trained and
sampled, its output, its time convention, what it is conditioned on and its sizes."""
import dataclasses

from conditioning import CLASS, TEXT
from errors import UserError

from .mmdit import HEAD_DIM, MMDiT
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
# MMDiT sizes by depth (SD3 names its models by depth): REPA's rule, width 32·depth and depth heads
# (heads of 32 channels; SD3 uses 64·depth). D24 is REPA's MS-COCO model (depth 24, width 768), the one the
# SRA paper's text-to-image table trains; D6 and D12 are for debugging and small runs.
MMDIT_SIZES = {f"D{depth}": (depth, HEAD_DIM * depth, depth) for depth in (6, 12, 24)}
PATCH_SIZES = (2, 4, 8)

# Time conventions (SPEC §2): what the network's time input means.
DATA_AT_0 = "data_at_0"  # flow t in [0, 1], 0 = data: this project, the SRA and REPA releases
DATA_AT_1 = "data_at_1"  # flow t in [0, 1], 1 = data: the original SiT release
DISCRETE_STEPS = "ddpm"  # DiT: integer steps in [0, 999], 0 = least noise
TIME_CONVENTIONS = (DATA_AT_0, DATA_AT_1, DISCRETE_STEPS)


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family is (SPEC §1–2, §8)."""

    objective: str  # the objective it trains and samples with: "ddpm" or "flow" (objectives.registry)
    learn_sigma: bool  # default output: DiT ε plus the variance range (2C channels), SiT velocity (C)
    time_convention: str  # the convention of the models this project trains
    condition: str = CLASS  # what y is (conditioning/): class labels, or text contexts
    sizes: dict = dataclasses.field(default_factory=lambda: SIZES)  # size name -> (depth, width, heads)
    backbone: type = DiT  # the module class


# The one table every part of the project asks: training, sampling, checkpoints, analysis.
FAMILIES = {
    "DiT": Family(objective="ddpm", learn_sigma=True, time_convention=DISCRETE_STEPS),
    "SiT": Family(objective="flow", learn_sigma=False, time_convention=DATA_AT_0),
    # REPA's MMDiT trains as SiT does (linear path, velocity, t = 0 data: its loss.py and samplers_t2i.py).
    "MMDiT": Family(objective="flow", learn_sigma=False, time_convention=DATA_AT_0, condition=TEXT,
                    sizes=MMDIT_SIZES, backbone=MMDiT),
}
MODEL_NAMES = tuple(
    f"{family}-{size}/{patch}" for family, spec in FAMILIES.items() for size in spec.sizes for patch in PATCH_SIZES
)


def parse_model_name(name):
    """'SiT-XL/2' -> ('SiT', 'XL', 2), with an error listing the valid names."""
    try:
        family, rest = name.split("-", 1)
        size, patch = rest.split("/")
        patch = int(patch)
    except ValueError:
        family = size = patch = None
    if family not in FAMILIES or size not in FAMILIES[family].sizes or patch not in PATCH_SIZES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return family, size, patch


def model_shape(name):
    """(depth, width, heads) of a registered model name."""
    family, size, _ = parse_model_name(name)
    return FAMILIES[family].sizes[size]


def model_family(name):
    return parse_model_name(name)[0]


def family_of(name):
    """The `Family` of a registered model name: FAMILIES[model_family(name)]."""
    return FAMILIES[model_family(name)]


IMAGENET_CLASSES = 1000  # the default of class-conditional models


def create_model(name, input_size=32, in_channels=4, num_classes=None, **options):
    """Build a registered model. `options` override the family defaults (learn_sigma, qk_norm, fused_attn;
    DiT/SiT: class_dropout_prob; MMDiT: context_dim) and, for tests and small experiments, the size's
    shape (depth, hidden_size, num_heads). num_classes: default 1000, and 0 (none) for text-conditioned
    families."""
    family, size, patch = parse_model_name(name)
    spec = FAMILIES[family]
    if num_classes is None:
        num_classes = 0 if spec.condition == TEXT else IMAGENET_CLASSES
    depth, hidden_size, num_heads = spec.sizes[size]
    kwargs = {"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads, "learn_sigma": spec.learn_sigma}
    kwargs.update(options)
    if spec.condition == TEXT:
        if num_classes:
            raise ValueError(f"{name} is conditioned on text, not on {num_classes} classes (pass num_classes=0)")
        model = spec.backbone(input_size=input_size, patch_size=patch, in_channels=in_channels, **kwargs)
    else:
        model = spec.backbone(input_size=input_size, patch_size=patch, in_channels=in_channels,
                              num_classes=num_classes, **kwargs)
    # Everything needed to rebuild this model; checkpoints store it so they load without flags.
    model.spec = {
        "name": name,
        "input_size": input_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "options": dict(options),
    }
    return model
