"""Figures of the concept tools: the TCAV bar chart, concept crop galleries and concept maps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn.functional as F

if TYPE_CHECKING:
    from .discovery import ConceptDiscovery
    from .tcav import TCAVResult


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _wrap(text: str, width: int = 16, lines: int = 3) -> str:
    """A long name on up to ``lines`` lines of about ``width`` characters (cut with ... beyond)."""
    import textwrap

    parts = textwrap.wrap(text, width, break_long_words=True) or [""]
    if len(parts) > lines:
        parts = [*parts[: lines - 1], _short(" ".join(parts[lines - 1 :]), width)]
    return "\n".join(parts)


def tcav_figure(result: TCAVResult, *, title: str | None = None) -> Any:
    """Mean TCAV score per concept (error bar: standard deviation over the random sets), the
    random-vs-random baseline, and above each concept ``*`` (significant after Bonferroni) or
    ``n.s.`` with its p-value. Long concept names are wrapped (not cut to one indistinguishable
    prefix); the note on the sets sits below the tick labels."""
    import matplotlib.pyplot as plt

    names = list(result.concepts)
    means = [result.scores[c] for c in names] + [float(np.mean(result.random_scores))]
    stds = [float(np.std(result.concept_scores[c])) for c in names] + [
        float(np.std(result.random_scores))
    ]
    labels = [_wrap(c) for c in names] + ["random"]
    colors = ["tab:blue" if result.significant[c] else "tab:gray" for c in names] + ["lightgray"]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(labels) + 1.5), 4.6), layout="constrained")
    pos = np.arange(len(labels))
    ax.bar(pos, means, yerr=stds, color=colors, capsize=5, edgecolor="black", linewidth=0.6)
    ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8)
    top = 1.0
    for i, c in enumerate(names):
        p = result.p_values[c]
        mark = "*" if result.significant[c] else "n.s."
        y = means[i] + stds[i] + 0.03  # above the error bar, never across it
        top = max(top, y + 0.14)
        ax.text(i, y, f"{mark}\np={p:.2g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos, labels, rotation=20 if len(labels) > 4 else 0, fontsize=8)
    ax.set_ylim(0, max(1.22, top))
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("TCAV score")
    n_sets = len(result.random_scores)
    ax.set_title(
        title or _short(f"TCAV: target {result.target} at {result.layer}", 60), fontsize=10
    )
    ax.set_xlabel(
        f"{result.n_inputs} inputs, {n_sets} random sets; bars: mean +- std; "
        f"* p < {result.alpha:g}/{len(names)} (Bonferroni)",
        fontsize=7.5,
        color="dimgray",
    )
    return fig


def gallery_figure(result: ConceptDiscovery, *, k: int = 8, concepts: int | None = None) -> Any:
    """One row per concept (most important first): its ``k`` crops with the largest coefficients."""
    import matplotlib.pyplot as plt

    n = result.n_concepts if concepts is None else min(concepts, result.n_concepts)
    tops = result.top_crops(k)[:n]
    k = tops.shape[1]
    fig, axes = plt.subplots(n, k, figsize=(1.25 * k + 1.6, 1.3 * n + 0.6), squeeze=False)
    for r in range(n):
        for c in range(k):
            ax = axes[r, c]
            crop = result.crops[int(tops[r, c])].permute(1, 2, 0).numpy()
            ax.imshow(np.clip(crop, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        label = "importance" if result.importance_method == "sobol" else "grad x coef"
        axes[r, 0].set_ylabel(
            f"concept {r}\n{label}\n{float(result.importance[r]):.3g}",
            fontsize=8,
            rotation=0,
            ha="right",
            va="center",
        )
    fig.suptitle(
        _short(f"CRAFT concepts: target {result.target} at {result.layer}", 70), fontsize=10
    )
    fig.tight_layout()
    return fig


def maps_figure(
    result: ConceptDiscovery,
    *,
    images: Any = None,
    concepts: int = 3,
    max_images: int = 4,
    alpha: float = 0.55,
) -> Any:
    """Each image beside overlays of the most important concepts' coefficient maps (upsampled;
    one colour scale per concept across all images, so an absent concept stays dark)."""
    import matplotlib.pyplot as plt

    from ..viz.overlay import colorize, to_image_array

    idx = list(range(min(max_images, result.images.shape[0]))) if images is None else list(images)
    nc = min(concepts, result.n_concepts)
    up = F.interpolate(
        result.maps[idx].float(),
        size=tuple(result.images.shape[-2:]),
        mode="bilinear",
        align_corners=False,
    )
    scale = result.maps.float().amax(dim=(0, 2, 3)).clamp_min(1e-12)
    fig, axes = plt.subplots(
        len(idx), nc + 1, figsize=(2.2 * (nc + 1), 2.2 * len(idx) + 0.5), squeeze=False
    )
    for r, i in enumerate(idx):
        bg = to_image_array(result.images[i])
        axes[r, 0].imshow(bg)
        axes[r, 0].set_ylabel(f"image {i}", fontsize=8)
        for c in range(nc):
            heat = (up[r, c] / scale[c]).clamp(0, 1).numpy()
            blended = (1 - alpha * heat[..., None]) * bg + alpha * heat[..., None] * colorize(
                heat, "jet"
            )
            axes[r, c + 1].imshow(np.clip(blended, 0, 1))
            if r == 0:
                axes[r, c + 1].set_title(f"concept {c}", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    fig.suptitle(_short(f"Concept maps at {result.layer}", 70), fontsize=10)
    fig.tight_layout()
    return fig
