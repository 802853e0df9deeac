"""Matplotlib helpers shared by the notebooks: images, boxes and heatmaps. Nothing of the method
lives here; figures are small PNGs so that the stored notebooks stay light."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import is_color_like
import torch

plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72, "font.size": 9, "axes.titlesize": 9,
                     "figure.max_open_warning": 0})
BASE, NOVEL, OTHER = "tab:blue", "tab:red", "0.5"  # base classes, novel classes, anything else


def split_color(label: int, num_base: int) -> str:
    """Blue for a base class id, red for a novel one (ids: base first, then novel)."""
    return BASE if label < num_base else NOVEL


def denormalize(image: torch.Tensor, cfg) -> np.ndarray:
    """A data.py image [3, H, W] (normalised with data.pixel_mean/std) -> [H, W, 3] in [0, 1]."""
    mean = torch.tensor(cfg.data.pixel_mean)[:, None, None]
    std = torch.tensor(cfg.data.pixel_std)[:, None, None]
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def show(ax, image, title: str | None = None):
    """An image (PIL, [H, W, 3] array) without axes."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


def boxes(ax, boxes_xyxy, texts=None, colors="tab:blue", style="-", lw=1.5, fontsize=7):
    """Draw [N, 4] xyxy boxes; ``texts`` (one per box or None) go above each box's corner."""
    b = np.asarray(torch.as_tensor(boxes_xyxy).detach().cpu().float()).reshape(-1, 4)
    colors = [colors] * len(b) if is_color_like(colors) else list(colors)  # one colour, or one per box
    for i, (x1, y1, x2, y2) in enumerate(b):
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=lw, ls=style,
                                   edgecolor=colors[i]))
        if texts is not None and texts[i]:
            ax.text(x1, y1 - 1, texts[i], color="white", fontsize=fontsize, va="bottom",
                    bbox=dict(facecolor=colors[i], alpha=0.8, pad=0.5, lw=0))


def heatmap(ax, matrix, title: str | None = None, xlabels=None, ylabels=None, cmap="viridis",
            vmin=None, vmax=None, colorbar: bool = True):
    """A matrix as an image, with optional tick labels and a colour bar."""
    m = np.asarray(torch.as_tensor(matrix).detach().cpu().float())
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
    for labels, set_ticks, set_labels in ((xlabels, ax.set_xticks, ax.set_xticklabels),
                                          (ylabels, ax.set_yticks, ax.set_yticklabels)):
        if labels is not None:
            set_ticks(range(len(labels)))
            set_labels(labels, fontsize=7, rotation=90 if set_ticks == ax.set_xticks else 0)
    if title:
        ax.set_title(title)
    if colorbar:
        plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im
