"""Concept discovery without labelled concepts, after CRAFT (Fel et al., CVPR 2023).

1. Random crops of the images (each resized to the model's input size) go through the model up
   to ``layer``; their activations, averaged over the spatial positions, form a non-negative
   matrix ``A`` (crops x channels) - the layer must be non-negative (after a ReLU).
2. Non-negative matrix factorisation ``A ~ U W`` (scikit-learn, ``init="nndsvda"``): the rows of
   ``W`` are the concepts (directions in the layer), ``U`` the crops' concept coefficients. A
   concept is shown as the crops with the largest coefficient.
3. Each image's activation map is projected on ``W`` position by position (non-negative least
   squares, ``W`` fixed): the concept's coefficient map, upsampled, says where it is present.
4. Importance for the target class: total Sobol indices of the concept coefficients (CRAFT):
   the coefficient maps are multiplied by quasi-random masks in [0, 1] (scrambled Sobol sequence,
   Saltelli design, Jansen estimator), the layer's output is replaced by the masked
   reconstruction ``(U * m) W`` and the target score recorded. ``importance="gradient_input"``
   gives the cheaper gradient x coefficient of the same reconstruction instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.capture import Capture
from ..core.guard import model_device, model_guard
from ..core.targets import resolve_target
from ..errors import LayerError, OptionError
from ._common import (
    Bundle,
    _fast_layout,
    activations,
    check_int,
    check_seed,
    count_calls,
    describe_target,
    image_set,
    layer_module,
    small_blas,
    to_pixels,
    unwrap,
)

IMPORTANCE = ("sobol", "gradient_input")

#: activations below this are treated as negative (a layer before its ReLU)
NEGATIVE_TOLERANCE = 1e-6


def _nmf_module() -> Any:
    try:
        import sklearn.decomposition as dec
    except ImportError as exc:
        raise OptionError(
            "concept discovery factorises activations with scikit-learn, which is not installed; "
            "install it with: pip install 'perspicio[concepts]'"
        ) from exc
    return dec


@dataclass(frozen=True)
class ConceptDiscovery:
    """Concepts found by CRAFT at one layer, their importance for the target and where they are.

    ``basis`` (k, channels): the concept directions, ordered by decreasing importance.
    ``crop_coefficients`` (crops, k), ``crops`` (crops, 3, s, s) in [0, 1] with ``crop_boxes``
    (image, top, left, size) in model-input pixels. ``maps`` (images, k, h, w): coefficient maps
    at the layer's resolution; ``images`` (images, 3, H, W) in [0, 1] for display.
    ``importance`` (k,): total Sobol indices (``importance_method="sobol"``) or gradient x
    coefficient. ``reconstruction_error``: ``||A - UW|| / ||A||`` on the crops.
    """

    layer: str
    target: str
    basis: Tensor
    crop_coefficients: Tensor
    crops: Tensor
    crop_boxes: Tensor
    maps: Tensor
    images: Tensor
    importance: Tensor
    importance_method: str
    reconstruction_error: float
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_concepts(self) -> int:
        return int(self.basis.shape[0])

    def top_crops(self, k: int = 8) -> Tensor:
        """(concepts, k) indices of each concept's most representative crops (largest coefficient)."""
        k = min(check_int("k", k, minimum=1), self.crop_coefficients.shape[0])
        return self.crop_coefficients.topk(k, dim=0).indices.T

    def upsampled_maps(self) -> Tensor:
        """Coefficient maps upsampled (bilinear) to the images' size: (images, k, H, W)."""
        return F.interpolate(
            self.maps.float(),
            size=tuple(self.images.shape[-2:]),
            mode="bilinear",
            align_corners=False,
        )

    def to_dict(self) -> dict[str, Any]:
        tops = self.top_crops(8)
        return {
            "method": "craft",
            "layer": self.layer,
            "target": self.target,
            "importance_method": self.importance_method,
            "reconstruction_error": self.reconstruction_error,
            "concepts": [
                {
                    "concept": i,
                    "importance": float(self.importance[i]),
                    "top_crops": [
                        {
                            "crop": int(j),
                            "coefficient": float(self.crop_coefficients[j, i]),
                            "box_image_top_left_size": self.crop_boxes[j].tolist(),
                        }
                        for j in tops[i]
                    ],
                    "mean_presence_per_image": self.maps[:, i].mean(dim=(1, 2)).tolist(),
                }
                for i in range(self.n_concepts)
            ],
            "options": self.options,
            "timings_s": self.timings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def gallery(self, k: int = 8, **kw: Any) -> Any:
        """Figure: one row per concept (by importance) with its ``k`` most representative crops."""
        from .figures import gallery_figure

        return gallery_figure(self, k=k, **kw)

    def maps_figure(self, images: Any = None, **kw: Any) -> Any:
        """Figure: each image beside the overlays of the most important concepts' maps."""
        from .figures import maps_figure

        return maps_figure(self, images=images, **kw)

    def save(self, directory: str | Path, name: str = "concepts", *, k: int = 8) -> list[Path]:
        """Write ``name_gallery.png`` (``k`` crops per concept), ``name_maps.png`` and
        ``name.json``; returns the paths."""
        import matplotlib.pyplot as plt

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for suffix, make in (("gallery", lambda: self.gallery(k=k)), ("maps", self.maps_figure)):
            fig = make()
            p = out / f"{name}_{suffix}.png"
            try:
                fig.savefig(p, dpi=110)
            finally:
                plt.close(fig)
            paths.append(p)
        js = out / f"{name}.json"
        js.write_text(self.to_json())
        return [*paths, js]


def random_crops(
    x: Tensor, n_per_image: int, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n_per_image`` square crops of side ``size`` per image at seeded random positions, each
    resized (bilinear) to the images' size. Returns (crops, boxes (image, top, left, size))."""
    n, _, h, w = x.shape
    tops = torch.randint(0, h - size + 1, (n, n_per_image), generator=generator)
    lefts = torch.randint(0, w - size + 1, (n, n_per_image), generator=generator)
    crops, boxes = [], []
    for i in range(n):
        for t, lf in zip(tops[i].tolist(), lefts[i].tolist()):
            crops.append(x[i : i + 1, :, t : t + size, lf : lf + size])
            boxes.append((i, t, lf, size))
    batch = torch.cat(crops)
    resized = F.interpolate(batch, size=(h, w), mode="bilinear", align_corners=False)
    return resized, torch.tensor(boxes, dtype=torch.long)


def _check_non_negative(a: Tensor, layer: str) -> None:
    low = float(a.min())
    if low < -NEGATIVE_TOLERANCE:
        raise LayerError(
            f"layer {layer!r} has negative activations (min {low:.3g}); non-negative matrix factorisation "
            "needs a layer after a ReLU (or another non-negative activation)."
        )


def project(acts: Tensor, basis: Tensor) -> Tensor:
    """Concept coefficients of activation rows (R, channels) on a fixed basis (k, channels):
    ``argmin_{u >= 0} ||a - u W||`` for every row, solved exactly (Lawson-Hanson active set,
    ``scipy.optimize.nnls``; an all-zero row has all-zero coefficients). An iterative solver
    stopped at a tolerance (scikit-learn's coordinate descent) left coefficients several percent
    off on ill-conditioned bases."""
    from scipy.optimize import nnls

    X = acts.detach().double().cpu().clamp_min(0).numpy()
    Wt = np.ascontiguousarray(basis.detach().double().cpu().numpy().T)  # (channels, k)
    U = np.zeros((X.shape[0], Wt.shape[1]))
    for i in np.flatnonzero(X.any(axis=1)):
        U[i] = nnls(Wt, X[i])[0]
    return torch.from_numpy(U)


def _maps(acts: Tensor, basis: Tensor) -> Tensor:
    """(N, C, h, w) activation maps -> (N, k, h, w) coefficient maps."""
    n, c, h, w = acts.shape
    u = project(acts.permute(0, 2, 3, 1).reshape(-1, c), basis)
    return u.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _scores_with_layer(
    bundle: Bundle,
    module: Any,
    x1: Tensor,
    replacement: Tensor,
    target_fn: Callable[[Tensor], Tensor],
    calls: int = 1,
) -> Tensor:
    """Target scores of input ``x1`` (1, ...) repeated, the layer's output replaced by each row of
    ``replacement`` (R, C, h, w). A module called ``calls`` times per forward pass is replaced at
    its last call (the one its activations were read from)."""
    reps = replacement.shape[0]
    x = _fast_layout(x1.expand(reps, *x1.shape[1:]))
    seen = [0]

    def transform(i: int, t: Tensor) -> Tensor | None:
        seen[0] += 1
        return replacement.to(t.dtype) if seen[0] == calls else None

    with Capture([module], transform=transform, store=False):
        out = bundle.model(x)
    return target_fn(out)


def sobol_masks(k: int, designs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Saltelli design from a scrambled Sobol sequence of dimension 2k: returns (A, B), each
    (designs, k) in [0, 1]."""
    from scipy.stats import qmc

    m = int(np.log2(designs))
    points = qmc.Sobol(d=2 * k, scramble=True, seed=np.random.default_rng(seed)).random_base2(m)
    return points[:, :k], points[:, k:]


def jansen_total(f_a: np.ndarray, f_b: np.ndarray, f_ab: np.ndarray) -> np.ndarray:
    """Total Sobol indices (Jansen estimator): ``E[(f(A) - f(A_B^i))^2] / (2 Var f)``; ``f_ab``
    is (k, designs). Zero when the output does not vary."""
    var = np.var(np.concatenate([f_a, f_b]))
    if var == 0:
        return np.zeros(f_ab.shape[0])
    return np.mean((f_a[None, :] - f_ab) ** 2, axis=1) / (2 * var)


def _sobol_importance(
    bundle: Bundle,
    module: Any,
    x: Tensor,
    maps: Tensor,
    basis: Tensor,
    resolved: Any,
    designs: int,
    seed: int,
    chunk: int,
    calls: int = 1,
) -> np.ndarray:
    k = basis.shape[0]
    a_masks, b_masks = sobol_masks(k, designs, seed)
    ab = np.repeat(a_masks[None], k, axis=0)  # (k, designs, k): A with column i from B
    for i in range(k):
        ab[i, :, i] = b_masks[:, i]
    all_masks = torch.from_numpy(
        np.concatenate([a_masks, b_masks, ab.reshape(-1, k)])
    )  # (designs*(k+2), k)
    w = basis.double()
    out = []
    device = model_device(bundle.model)
    for n in range(x.shape[0]):
        u = maps[n].double().permute(1, 2, 0)  # (h, w, k)
        fn = _one_row(resolved, n)
        f = []
        for s in range(0, all_masks.shape[0], chunk):
            m = all_masks[s : s + chunk]
            rec = torch.einsum("hwk,rk,kc->rchw", u, m, w).float().to(device)
            f.append(
                _scores_with_layer(bundle, module, x[n : n + 1].to(device), rec, fn, calls)
                .double()
                .cpu()
            )
        f_all = torch.cat(f).numpy()
        f_a, f_b, f_ab = (
            f_all[:designs],
            f_all[designs : 2 * designs],
            f_all[2 * designs :].reshape(k, designs),
        )
        out.append(jansen_total(f_a, f_b, f_ab))
    return np.mean(out, axis=0)


def _gradient_input_importance(
    bundle: Bundle,
    module: Any,
    x: Tensor,
    maps: Tensor,
    basis: Tensor,
    resolved: Any,
    calls: int = 1,
) -> np.ndarray:
    device = model_device(bundle.model)
    w = basis.float().to(device)
    out = []
    for n in range(x.shape[0]):
        u = maps[n].float().to(device).requires_grad_(True)  # (k, h, w)
        with torch.enable_grad():
            rec = torch.einsum("khw,kc->chw", u, w)[None]
            score = _scores_with_layer(
                bundle, module, x[n : n + 1].to(device), rec, _one_row(resolved, n), calls
            )
            (g,) = torch.autograd.grad(score.sum(), u)
        out.append((g * u).sum(dim=(1, 2)).detach().double().cpu().numpy())
    return np.mean(out, axis=0)


def _one_row(resolved: Any, n: int) -> Callable[[Tensor], Tensor]:
    """The target function of input ``n`` applied to every row of a batch of its copies."""
    if resolved.indices is None:
        return resolved.fn
    cls = int(resolved.indices[n])
    return lambda out: out.reshape(out.shape[0], -1)[:, cls]


def discover(
    model: Any,
    images: Any,
    *,
    layer: Any,
    target: Any = None,
    n_concepts: int = 8,
    crops_per_image: int = 16,
    crop_size: int | None = None,
    importance: str = "sobol",
    designs: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    max_iter: int = 500,
    preprocess: Callable[[Any], Tensor] | None = None,
) -> ConceptDiscovery:
    """Discover ``n_concepts`` concepts of ``target`` at ``layer`` from ``images`` (CRAFT).

    ``images``: examples of the class (tensor of model inputs, folder, or list of images).
    ``crop_size``: side of the random crops in model-input pixels (default: a quarter of the
    smaller side, at least 8). ``importance``: ``"sobol"`` (total Sobol indices with
    ``designs`` Saltelli samples, a power of two; ``designs * (n_concepts + 2)`` forward passes per
    image) or ``"gradient_input"``. Seeded: the same call gives the same result.
    """
    t0 = time.perf_counter()
    bundle = unwrap(model, preprocess)
    seed = check_seed(seed)
    k = check_int("n_concepts", n_concepts, minimum=1)
    per = check_int("crops_per_image", crops_per_image, minimum=1)
    chunk = check_int("batch_size", batch_size, minimum=1)
    if importance not in IMPORTANCE:
        raise OptionError(f"importance must be one of {', '.join(IMPORTANCE)}; got {importance!r}.")
    designs = check_int("designs", designs, minimum=2)
    if designs & (designs - 1):
        raise OptionError(
            f"designs must be a power of two (balanced Sobol sequence); got {designs}."
        )
    layer_name, module = layer_module(bundle.model, layer)
    x = image_set(images, bundle, "images", minimum=1)
    if x.ndim != 4:
        raise OptionError(
            f"concept discovery needs image inputs (N, C, H, W); got shape {tuple(x.shape)}."
        )
    h, w = x.shape[-2:]
    size = (
        max(8, min(h, w) // 4)
        if crop_size is None
        else check_int("crop_size", crop_size, minimum=2)
    )
    if size > min(h, w):
        raise OptionError(f"crop_size {size} is larger than the images ({h} x {w}).")
    if per * x.shape[0] < k:
        raise OptionError(
            f"{per * x.shape[0]} crops cannot give {k} concepts; use more images or crops_per_image."
        )

    # activations of the full images: the layer must have a spatial grid for the concept maps
    image_acts = activations(bundle.model, module, x, chunk=chunk)
    if image_acts.ndim != 4:
        raise LayerError(
            f"layer {layer_name!r} outputs shape {tuple(image_acts.shape[1:])} per image; concept maps need a "
            "layer with spatial dimensions (C, h, w). Choose a convolutional layer."
        )
    _check_non_negative(image_acts, layer_name)
    channels = int(image_acts.shape[1])
    if k > channels:
        raise OptionError(
            f"n_concepts={k} is more than the {channels} channels of layer {layer_name!r}: the "
            f"factorisation gives at most {channels} concepts there."
        )
    calls = count_calls(bundle.model, module, x)
    resolved = _resolve_all(bundle, x, target, chunk)

    gen = torch.Generator().manual_seed(seed)
    crops, boxes = random_crops(x.cpu(), per, size, gen)
    crop_acts = activations(bundle.model, module, crops, chunk=chunk)
    _check_non_negative(crop_acts, layer_name)
    A = crop_acts.mean(dim=(2, 3)).double().clamp_min(0)
    if not bool((A > 0).any()):
        raise LayerError(
            f"layer {layer_name!r} is zero on every crop of these images (dead units): there is "
            "nothing to factorise. Choose another layer or other images."
        )
    t1 = time.perf_counter()

    dec = _nmf_module()
    nmf = dec.NMF(
        n_components=k, init="nndsvda", solver="cd", max_iter=max_iter, tol=1e-4, random_state=seed
    )
    with small_blas():
        U = nmf.fit_transform(A.cpu().numpy())
        W = nmf.components_
        err = float(
            np.linalg.norm(A.cpu().numpy() - U @ W) / max(np.linalg.norm(A.cpu().numpy()), 1e-300)
        )
        basis = torch.from_numpy(np.ascontiguousarray(W))
        coeffs = torch.from_numpy(np.ascontiguousarray(U))
        maps = _maps(image_acts.double().clamp_min(0), basis)
    t2 = time.perf_counter()

    with model_guard(bundle.model), torch.no_grad():
        if importance == "sobol":
            imp = _sobol_importance(
                bundle, module, x, maps, basis, resolved, designs, seed, chunk, calls
            )
    if importance == "gradient_input":
        with model_guard(bundle.model):
            imp = _gradient_input_importance(bundle, module, x, maps, basis, resolved, calls)
    t3 = time.perf_counter()

    order = torch.from_numpy(np.argsort(-imp, kind="stable"))
    pixels = to_pixels(bundle, x)
    crop_pixels = torch.stack(
        [pixels[i, :, t : t + s, lf : lf + s] for i, t, lf, s in boxes.tolist()]
    )
    return ConceptDiscovery(
        layer=layer_name,
        target=describe_target(bundle, resolved),
        basis=basis[order],
        crop_coefficients=coeffs[:, order],
        crops=crop_pixels,
        crop_boxes=boxes,
        maps=maps[:, order],
        images=pixels,
        importance=torch.from_numpy(imp)[order],
        importance_method=importance,
        reconstruction_error=err,
        options={
            "n_concepts": k,
            "crops_per_image": per,
            "crop_size": size,
            "designs": designs,
            "seed": seed,
            "model": bundle.name,
            "n_images": int(x.shape[0]),
        },
        timings={"activations": t1 - t0, "factorisation": t2 - t1, "importance": t3 - t2},
    )


def _resolve_all(bundle: Bundle, x: Tensor, target: Any, chunk: int) -> Any:
    """The target resolved on the outputs of all images (a class target: one index per image)."""
    device = model_device(bundle.model)
    with model_guard(bundle.model), torch.no_grad():
        out = torch.cat(
            [bundle.model(x[s : s + chunk].to(device)).cpu() for s in range(0, x.shape[0], chunk)]
        )
    return resolve_target(target, out, bundle.labels)


def concept_maps(
    model: Any,
    images: Any,
    discovery: ConceptDiscovery,
    *,
    preprocess: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """Coefficient maps (images, k, h, w) of ``discovery``'s concepts in new images (same layer)."""
    bundle = unwrap(model, preprocess)
    _, module = layer_module(bundle.model, discovery.layer)
    x = image_set(images, bundle, "images", minimum=1)
    acts = activations(bundle.model, module, x)
    if acts.ndim != 4:
        raise LayerError(
            f"layer {discovery.layer!r} has no spatial dimensions; concept maps need (C, h, w)."
        )
    _check_non_negative(acts, discovery.layer)
    with small_blas():
        return _maps(acts.double().clamp_min(0), discovery.basis)
