"""Model registry: every `DiT-{S,B,L,XL}/{2,4,8}` and `SiT-{S,B,L,XL}/{2,4,8}` (SPEC §1)."""
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
# DiT learns the variance range (8 output channels); SiT as trained here predicts velocity only.
FAMILY_DEFAULTS = {
    "DiT": {"learn_sigma": True},
    "SiT": {"learn_sigma": False},
}
MODEL_NAMES = tuple(
    f"{family}-{size}/{patch}" for family in FAMILY_DEFAULTS for size in SIZES for patch in PATCH_SIZES
)


def parse_model_name(name):
    """'SiT-XL/2' -> ('SiT', 'XL', 2), with an error listing the valid names."""
    try:
        family, rest = name.split("-", 1)
        size, patch = rest.split("/")
        patch = int(patch)
    except ValueError:
        family = size = patch = None
    if family not in FAMILY_DEFAULTS or size not in SIZES or patch not in PATCH_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return family, size, patch


def model_family(name):
    return parse_model_name(name)[0]


def create_model(name, input_size=32, in_channels=4, num_classes=1000, **options):
    """Build a registered model. `options` override the family defaults (learn_sigma, qk_norm,
    class_dropout_prob, fused_attn) and, for tests and small experiments, the size's shape
    (depth, hidden_size, num_heads)."""
    family, size, patch = parse_model_name(name)
    depth, hidden_size, num_heads = SIZES[size]
    kwargs = {"depth": depth, "hidden_size": hidden_size, "num_heads": num_heads, **FAMILY_DEFAULTS[family]}
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
