"""The demo's built-in dataset: ten classes of coloured shapes and textures, drawn with numpy.

Every class has its own shape and its own hue, so a sample grid shows at a glance whether a model
learned the classes. Within a class the position, size, rotation, exact colour and background vary.
Image `i` of class `c` is drawn from the seed (seed, c, i) alone: the same image for any dataset size,
on any machine, so nothing is shipped: the PNGs are written at run time (about 0.3 MB for 1,000 images).

    shapes/
      0-red-circle/00000.png ...
      ...
      9-rose-checkerboard/
"""
import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

# 16×16 pixels: SiT-T/4 sees 16 tokens, the size at which two runs train far enough on 2 CPU cores in
# a few minutes each (32×32 with SiT-T/8, the same cost, learned visibly slower; see demo/__main__.py).
RESOLUTION = 16
SUPERSAMPLING = 4  # each pixel averages 4×4 sub-pixel tests: anti-aliased edges
DEFAULT_SEED = 0

# (shape, hue): ten shapes, ten hues evenly spaced around the colour wheel.
CLASSES = (
    ("circle", "red"),
    ("square", "orange"),
    ("triangle", "yellow"),
    ("diamond", "lime"),
    ("plus", "mint"),
    ("ring", "cyan"),
    ("star", "azure"),
    ("crescent", "violet"),
    ("stripes", "purple"),
    ("checkerboard", "rose"),
)
NUM_CLASSES = len(CLASSES)
CLASS_NAMES = tuple(f"{index}-{hue}-{shape}" for index, (shape, hue) in enumerate(CLASSES))

# Ranges of the random factors (choices made for this demo: visible variety, classes never ambiguous).
HUE_JITTER = 0.02  # fraction of the colour wheel; neighbouring classes are 0.1 apart
SATURATION_RANGE = (0.7, 1.0)
VALUE_RANGE = (0.75, 1.0)
BACKGROUND_SATURATION_RANGE = (0.0, 0.3)
BACKGROUND_VALUE_RANGE = (0.08, 0.35)  # dark, so every foreground colour stands out
SIZE_RANGE = (0.45, 0.8)  # shape radius as a fraction of half the image side
CENTER_JITTER = 0.25  # shape centre offset, as a fraction of half the image side
ROTATION_JITTER = np.pi / 12  # ±15°: a square never turns into the diamond class (45°)
STRIPE_PERIOD_RANGE = (5.0, 9.0)  # pixels
CHECKER_CELL_RANGE = (4.0, 8.0)  # pixels
STAR_POINTS = 5
STAR_INNER_RADIUS = 0.45


def _star(u, v):
    """Inside a five-pointed star of outer radius 1 with a point up: fold the angle into one half-point
    wedge and test against the edge from the outer vertex (1, 0) to the inner vertex."""
    wedge = 2 * np.pi / STAR_POINTS
    angle = np.abs(np.mod(np.arctan2(u, v) + wedge / 2, wedge) - wedge / 2)  # in [0, wedge/2]
    radius = np.hypot(u, v)
    x, y = radius * np.cos(angle), radius * np.sin(angle)
    inner_x, inner_y = STAR_INNER_RADIUS * np.cos(wedge / 2), STAR_INNER_RADIUS * np.sin(wedge / 2)
    # the point is on the origin's side of the edge when this cross product is non-negative
    return (inner_x - 1) * y - inner_y * (x - 1) >= 0


# Shape masks on local coordinates (u right, v up), radius 1 = the shape's size.
SHAPES = {
    "circle": lambda u, v: np.hypot(u, v) <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: (v >= -0.5) & (np.sqrt(3) * u + v <= 1) & (-np.sqrt(3) * u + v <= 1),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "plus": lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 1),
    "ring": lambda u, v: (np.hypot(u, v) <= 1) & (np.hypot(u, v) >= 0.55),
    "star": _star,
    "crescent": lambda u, v: (np.hypot(u, v) <= 1) & (np.hypot(u - 0.45, v - 0.2) >= 0.8),
}
# Textures fill the image; their scale is a period in pixels.
TEXTURES = {
    "stripes": lambda x, y, period: np.mod(y, period) < period / 2,
    "checkerboard": lambda x, y, period: (np.floor(x / period) + np.floor(y / period)) % 2 == 0,
}
TEXTURE_PERIODS = {"stripes": STRIPE_PERIOD_RANGE, "checkerboard": CHECKER_CELL_RANGE}


def _rgb(hue, saturation, value):
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _subpixel_grid(resolution):
    """Sub-pixel centres in pixel units, (S, S) each, S = resolution · SUPERSAMPLING."""
    side = resolution * SUPERSAMPLING
    coordinates = (np.arange(side) + 0.5) / SUPERSAMPLING
    return np.meshgrid(coordinates, coordinates, indexing="xy")


def _coverage(inside, resolution):
    """Boolean sub-pixel mask (S, S) -> fraction of each pixel covered, (resolution, resolution)."""
    return inside.reshape(resolution, SUPERSAMPLING, resolution, SUPERSAMPLING).mean(axis=(1, 3))


def draw(class_index, image_index, seed=DEFAULT_SEED, resolution=RESOLUTION):
    """Image `image_index` of class `class_index`: uint8 (resolution, resolution, 3)."""
    if not 0 <= class_index < NUM_CLASSES:
        raise ValueError(f"class index {class_index} is outside 0..{NUM_CLASSES - 1}")
    rng = np.random.default_rng([seed, class_index, image_index])
    shape, _ = CLASSES[class_index]
    hue = class_index / NUM_CLASSES + rng.uniform(-HUE_JITTER, HUE_JITTER)
    foreground = _rgb(hue, rng.uniform(*SATURATION_RANGE), rng.uniform(*VALUE_RANGE))
    background = _rgb(
        rng.uniform(), rng.uniform(*BACKGROUND_SATURATION_RANGE), rng.uniform(*BACKGROUND_VALUE_RANGE)
    )
    rotation = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
    x, y = _subpixel_grid(resolution)
    half = resolution / 2
    if shape in TEXTURES:
        period = rng.uniform(*TEXTURE_PERIODS[shape])
        cos, sin = np.cos(rotation), np.sin(rotation)
        inside = TEXTURES[shape](cos * x - sin * y, sin * x + cos * y, period)
    else:
        size = rng.uniform(*SIZE_RANGE) * half
        center = half + rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2) * half
        dx, dy = (x - center[0]) / size, (center[1] - y) / size  # image rows grow downwards
        cos, sin = np.cos(rotation), np.sin(rotation)
        inside = SHAPES[shape](cos * dx + sin * dy, -sin * dx + cos * dy)
    alpha = _coverage(inside, resolution)[..., None]  # (H, W, 1)
    image = alpha * foreground + (1 - alpha) * background  # (H, W, 3) in [0, 1]
    return np.round(image * 255).astype(np.uint8)


def draw_many(images_per_class, seed=DEFAULT_SEED, resolution=RESOLUTION, start=0):
    """Images `start .. start + images_per_class - 1` of every class, class-major:
    uint8 (NUM_CLASSES · images_per_class, H, W, 3) and int64 labels."""
    images = [
        draw(label, index, seed, resolution)
        for label in range(NUM_CLASSES)
        for index in range(start, start + images_per_class)
    ]
    labels = np.repeat(np.arange(NUM_CLASSES), images_per_class)
    return np.stack(images), labels


def write_image_folder(root, images_per_class, seed=DEFAULT_SEED, resolution=RESOLUTION, progress=None):
    """One subfolder per class (sorted names = label order), PNG files; returns the number written.
    `progress`, if given, is called with the number of images finished after each one."""
    if images_per_class < 1:
        raise ValueError(f"images per class must be at least 1, got {images_per_class}")
    root = Path(root)
    written = 0
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            Image.fromarray(draw(label, index, seed, resolution)).save(folder / f"{index:05d}.png")
            written += 1
            if progress is not None:
                progress(written)
    return written
