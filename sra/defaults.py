"""Per-model SRA defaults with their sources (SPEC §3, the block-pair table)."""
from models import model_shape, parse_model_name

# (student block k_s, teacher block k_T), 1-based: the output of that many blocks.
BLOCK_PAIRS = {
    ("SiT", "B"): (3, 8),  # paper text example; the release's SiT-B script
    ("SiT", "L"): (6, 16),  # teacher 16: paper's cost table; student ≈ ¼ depth (not stated)
    ("SiT", "XL"): (8, 20),  # release README
    ("DiT", "B"): (3, 8),  # by analogy with SiT-B
    ("DiT", "L"): (6, 16),  # by analogy with SiT-L
    ("DiT", "XL"): (8, 16),  # release README (the paper's cost table implies 20)
}
T_MAX = 0.2  # dynamic interval Δ ~ U(0, t_max): paper §3.2 (SiT); the DiT release README


def default_block_pair(model_name, depth=None):
    """The table's pair, or the authors' rule of thumb (student ≈ ¼, teacher ≈ ¾ of the depth) for
    sizes the table does not list (S, T, every MMDiT: 6 → 18 for MMDiT-D24/2, the paper's text-to-image
    run "without any hyperparameter tuning") or a depth override."""
    family, size, _ = parse_model_name(model_name)
    if depth is None and (family, size) in BLOCK_PAIRS:
        return BLOCK_PAIRS[(family, size)]
    depth = depth or model_shape(model_name)[0]
    return max(1, int(depth / 4 + 0.5)), max(1, int(3 * depth / 4 + 0.5))
