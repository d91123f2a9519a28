"""Regenerate the example figures of docs/surrogates.md (CPU; the image example takes minutes).

python docs/make_surrogate_images.py [--no-image]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from perspicio.surrogates import SegmentPresence, distill_linear, distill_tree  # noqa: E402
from perspicio.zoo.tabular import load_tabular  # noqa: E402

IMAGES = Path(__file__).parent / "images"


def save(fig, name: str) -> None:
    fig.savefig(IMAGES / name, dpi=80)
    plt.close(fig)
    print("wrote", IMAGES / name)


def main(argv: list[str]) -> None:
    demo = load_tabular("breast_cancer", "mlp")
    s = distill_tree(demo, max_depth=4)
    save(s.figure(), "surrogate_tree.png")
    save(s.curve(range(1, 9)).figure(), "surrogate_curve.png")
    save(distill_linear(demo, max_features=5).figure(), "surrogate_linear.png")
    if "--no-image" in argv:
        return
    from perspicio import zoo

    model = zoo.load("efficientnet_lite0")
    x = model.preprocess(zoo.sample("chelsea"))
    spec = SegmentPresence("slic:30", samples=200, baseline="blur")
    t = distill_tree(model, x, features=spec, target="Egyptian cat", softmax=True, max_depth=3)
    print(t)
    print(t.rules_text())
    save(t.figure(), "surrogate_image_tree.png")
    save(t.segments_figure(), "surrogate_image_segments.png")


if __name__ == "__main__":
    main(sys.argv[1:])
