"""Regenerate the example figures of docs/featurevis.md (CPU, a few minutes).

    python docs/make_featurevis_images.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from perspicio.cli import main

IMAGES = Path(__file__).parent / "images"

RUNS = [
    (["kernels"], "kernels.png", "featurevis_kernels.png"),
    (["maps", "chelsea", "--layer", "_blocks.2", "--top-k", "8"], "chelsea_maps.png", "featurevis_maps.png"),
    (["top", "--layer", "_blocks.8", "--target", "7", "--k", "6"], "top.png", "featurevis_top.png"),
    (["top", "-m", "digits", "--layer", "act2", "--target", "5", "--k", "8"], "top.png", "featurevis_top_digits.png"),
    (["maximize", "--target", "130", "--steps", "256"], "maximize.png", "featurevis_maximize_flamingo_plot.png"),
    (["maximize", "-m", "digits", "--steps", "150"], "maximize.png", "featurevis_maximize_digits.png"),
    (["invert", "chelsea", "--layer", "_blocks.4", "--steps", "300"], "chelsea_invert.png", "featurevis_invert.png"),
    (["project", "-m", "digits", "--method", "tsne"], "projection_tsne.png", "featurevis_projection_digits.png"),
    (["project", "--method", "pca"], "projection_pca.png", "featurevis_projection_photos.png"),
    (["sensitivity", "chelsea"], "chelsea_sensitivity.png", "featurevis_sensitivity.png"),
    (["attack", "chelsea", "--epsilon", "2/255"], "chelsea_attack.png", "featurevis_attack.png"),
]


def run() -> int:
    IMAGES.mkdir(exist_ok=True)
    numbers = {}
    only = set(sys.argv[1:])
    for args, produced, target in RUNS:
        if only and target not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            code = main(["features", *args, "--out", tmp, "--no-progress"] if args[0] not in ("kernels", "maps", "attack")
                        else ["features", *args, "--out", tmp])
            if code != 0:
                return code
            shutil.copy(Path(tmp) / produced, IMAGES / target)
            if args[0] == "maximize" and "-m" not in args:
                shutil.copy(Path(tmp) / "maximize_0.png", IMAGES / "featurevis_maximize_flamingo.png")
            js = Path(tmp) / produced.replace(".png", ".json")
            if js.is_file():
                data = json.loads(js.read_text())
                numbers[target] = {k: data[k] for k in ("target_probability", "cosine", "success", "linf", "after_name",
                                                        "before_name", "explanation", "scanned") if k in data}
    print(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run())
