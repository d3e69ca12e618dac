"""PNG figures of probe results and PCA pictures. Figures are drawn with matplotlib's object API on
the Agg canvas, so importing this module never changes the caller's plotting backend."""
import textwrap

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# What the panel shows, whatever the method: the EMA weights are SRA's teacher only in an SRA run.
WEIGHT_LABELS = {"ema": "EMA weights", "model": "online weights"}
LINE_STYLES = ("-", "--", ":", "-.")  # one per compared checkpoint, cycled
MARKERS = ("o", "s", "^", "D")  # likewise, so overlapping lines stay apart
COLORMAP = "viridis"  # noise levels from clean (dark) to noisy (light)
PANEL_INCHES = (4.5, 3.4)  # width, height of one accuracy panel
PICTURE_INCHES = 1.3  # side of one PCA picture
CAPTION_CHARS_PER_INCH = 14  # of the caption's small font, to wrap it to the figure's width
CAPTION_LINE_INCHES = 0.2
DPI = 120


def _new_figure(width, height) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _noise_colors(noise_levels):
    colormap = colormaps[COLORMAP]
    span = max(len(noise_levels) - 1, 1)
    return {t: colormap(0.85 * i / span) for i, t in enumerate(sorted(noise_levels))}


def _accuracy_axes(axes, weights, blocks, chance):
    axes.set_title(WEIGHT_LABELS.get(weights, weights))
    axes.set_xticks(blocks)
    axes.set_xlabel("block (0 = embedded input)")
    axes.set_ylabel("linear-probe top-1 (%)")
    axes.axhline(100 * chance, color="gray", linewidth=0.8, linestyle=":", label="chance")
    axes.grid(alpha=0.3)


def _series(rows, checkpoint, weights, noise_level):
    points = sorted((r["block"], 100 * r["top1"]) for r in rows
                    if (r["checkpoint"], r["weights"], r["t"]) == (checkpoint, weights, noise_level))
    return [block for block, _ in points], [accuracy for _, accuracy in points]


def plot_checkpoint(rows, checkpoint: str, path, chance: float):
    """Accuracy vs block, one line per noise level, one panel per weights (EMA, online); returns the figure."""
    rows = [r for r in rows if r["checkpoint"] == checkpoint]
    weights = list(dict.fromkeys(r["weights"] for r in rows))
    noise_levels = sorted({r["t"] for r in rows})
    blocks = sorted({r["block"] for r in rows})
    figure = _new_figure(PANEL_INCHES[0] * len(weights), PANEL_INCHES[1])
    colors = _noise_colors(noise_levels)
    for axes, weight in zip(figure.subplots(1, len(weights), squeeze=False)[0], weights):
        _accuracy_axes(axes, weight, blocks, chance)
        for t in noise_levels:
            axes.plot(*_series(rows, checkpoint, weight, t), marker="o", color=colors[t], label=f"t = {t:g}")
        axes.legend(fontsize="small")
    figure.suptitle(checkpoint)
    figure.savefig(path)
    return figure


def plot_comparison(rows, checkpoints, path, chance: float):
    """Accuracy vs block of several checkpoints: colour = noise level, line style = checkpoint; returns the
    figure."""
    weights = list(dict.fromkeys(r["weights"] for r in rows))
    noise_levels = sorted({r["t"] for r in rows})
    blocks = sorted({r["block"] for r in rows})
    figure = _new_figure(PANEL_INCHES[0] * len(weights), PANEL_INCHES[1] * 1.2)
    colors = _noise_colors(noise_levels)
    for axes, weight in zip(figure.subplots(1, len(weights), squeeze=False)[0], weights):
        _accuracy_axes(axes, weight, blocks, chance)
        for index, checkpoint in enumerate(checkpoints):
            style = LINE_STYLES[index % len(LINE_STYLES)]
            marker = MARKERS[index % len(MARKERS)]
            for t in noise_levels:
                axes.plot(*_series(rows, checkpoint, weight, t), linestyle=style, marker=marker,
                          color=colors[t], label=f"{checkpoint}, t = {t:g}")
        axes.legend(fontsize="x-small")
    figure.suptitle(" vs ".join(checkpoints))
    figure.savefig(path)
    return figure


def pca_caption(weights):
    """How to read pca.png (the paper's Figure 2, left)."""
    return (f"PCA of token features ({WEIGHT_LABELS.get(weights, weights)}), as the paper's Figure 2 (left). "
            "For each image and block, the first three principal components of that block's tokens are shown "
            "as red, green and blue, one square per token: tokens of similar colour have similar features. "
            "Column x_t is the model's input at noise level t.")


def save_pca_figure(panels: dict, inputs: dict, blocks, noise_levels, path, weights="ema"):
    """One PNG of PCA pictures, captioned; returns the figure. panels[name]: (I, len(noise_levels),
    len(blocks), g, g, 3) in [0, 1]; inputs[name]: (I, len(noise_levels), H, W, 3), the model input x_t.
    A row per (checkpoint, image, noise level); the first column is x_t, then one column per block."""
    row_count = sum(len(p) * len(noise_levels) for p in panels.values())
    columns = len(blocks) + 1
    width = PICTURE_INCHES * columns + 1.2
    caption = textwrap.fill(pca_caption(weights), width=int(width * CAPTION_CHARS_PER_INCH))
    figure = _new_figure(width, PICTURE_INCHES * row_count + CAPTION_LINE_INCHES * (caption.count("\n") + 1))
    figure.suptitle(caption, fontsize="small")
    grid = figure.subplots(row_count, columns, squeeze=False)
    row = 0
    for name, pictures in panels.items():
        for image in range(len(pictures)):
            for level, t in enumerate(noise_levels):
                cells = [inputs[name][image, level], *pictures[image, level]]
                for column, (axes, cell) in enumerate(zip(grid[row], cells)):
                    axes.imshow(cell.numpy(), interpolation="nearest")
                    axes.set_xticks([])
                    axes.set_yticks([])
                    if row == 0:
                        title = "x_t" if column == 0 else f"block {blocks[column - 1]}"
                        axes.set_title(title, fontsize="small")
                grid[row][0].set_ylabel(f"{name}\nimage {image}, t = {t:g}", fontsize="x-small")
                row += 1
    figure.savefig(path)
    return figure
