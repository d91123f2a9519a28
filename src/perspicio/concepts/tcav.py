"""Testing with Concept Activation Vectors (TCAV; Kim et al., ICML 2018) with its significance test.

For each concept and each of N random sets a CAV is fitted (:mod:`.cav`); the TCAV score of a
concept against one random set is the fraction of the target-class inputs whose directional
derivative of the target score along the CAV is positive. Significance, two tests:

- ``test="paper"`` (Kim et al.): the N scores of a concept against N scores of random-vs-random
  CAVs (random set i as the "concept" against set i+1, cyclically), two-sample two-sided t-test.
  Its samples are not independent (the concept's N scores share one concept set), so it declares
  random concepts significant far more often than ``alpha`` (docs/concepts.md).
- ``test="exchangeable"`` (default): the concept's mean score against the mean scores of each
  random set taken as a pseudo-concept against the N - 1 other random sets and the concept's set.
  Under the null the N + 1 sets are exchangeable, so the concept's mean is one more draw from the
  pseudo-concepts' distribution: two-sided prediction t-test with N - 1 degrees of freedom.

A concept is significant when its p-value is below ``alpha / number of concepts`` (Bonferroni).

Activations are computed once per image and layer: the concept sets, the random images (each
pool image once, however many sets it is drawn into) and the inputs (with the gradient of the
target, one forward and one backward pass) - then every CAV reuses them.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.capture import resolve_layers
from ..errors import InputError, LayerError, OptionError
from ._common import (
    MIN_SET_SIZE,
    activations,
    activations_and_gradients,
    check_int,
    check_seed,
    describe_target,
    image_set,
    layer_module,
    small_blas,
    unwrap,
)
from .cav import CAV, check_classifier, fit_cav


@dataclass(frozen=True)
class TCAVResult:
    """TCAV scores and their significance for each concept at one layer and target.

    ``scores[c]`` is the mean over the random sets; ``concept_scores[c]`` the N scores (one per
    random set); ``random_scores`` the random-vs-random baseline (``test="paper"``: the N cyclic
    pair scores; ``"exchangeable"``: each random set's mean score against the other sets) and
    ``null_scores[c]`` the sample concept ``c`` was tested against. ``p_values`` are uncorrected;
    ``significant[c]`` is ``p < alpha / len(concepts)`` (Bonferroni).
    """

    layer: str
    target: str
    concepts: tuple[str, ...]
    scores: dict[str, float]
    concept_scores: dict[str, np.ndarray]
    random_scores: np.ndarray
    null_scores: dict[str, np.ndarray]
    p_values: dict[str, float]
    significant: dict[str, bool]
    alpha: float
    cavs: dict[str, tuple[CAV, ...]]
    random_cavs: tuple[CAV, ...]
    n_inputs: int
    set_sizes: dict[str, int]
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: directional derivatives of the target score along each CAV, (random sets, inputs) per concept
    derivatives: dict[str, np.ndarray] = field(default_factory=dict)
    #: the same for the random-vs-random CAVs (one row per CAV of ``random_cavs``)
    random_derivatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def concept_magnitudes(self) -> dict[str, np.ndarray]:
        """Per random set, ``sum(max(S, 0)) / sum(|S|)`` of the directional derivatives S (the
        magnitude variant of the score: large positive derivatives weigh more than small ones)."""
        return {c: magnitude_scores(d) for c, d in self.derivatives.items()}

    @property
    def magnitudes(self) -> dict[str, float]:
        """Mean over the random sets of :attr:`concept_magnitudes`."""
        return {c: float(np.mean(m)) for c, m in self.concept_magnitudes.items()}

    @property
    def p_values_corrected(self) -> dict[str, float]:
        """Bonferroni-corrected p-values: ``min(1, p * number of concepts)``."""
        m = len(self.concepts)
        return {c: min(1.0, p * m) for c, p in self.p_values.items()}

    @property
    def cav_accuracy(self) -> dict[str, float]:
        """Mean training accuracy of each concept's CAVs (how separable the concept is)."""
        return {c: float(np.mean([v.accuracy for v in cs])) for c, cs in self.cavs.items()}

    def to_dict(self) -> dict[str, Any]:
        corrected = self.p_values_corrected
        magnitudes = self.magnitudes
        return {
            "method": "tcav",
            "layer": self.layer,
            "target": self.target,
            "n_inputs": self.n_inputs,
            "alpha": self.alpha,
            "bonferroni_threshold": self.alpha / len(self.concepts),
            "concepts": {
                c: {
                    "score": self.scores[c],
                    "score_std": float(np.std(self.concept_scores[c])),
                    "scores_per_random_set": self.concept_scores[c].tolist(),
                    "magnitude": magnitudes.get(c),
                    "mean_derivative_per_random_set": (
                        self.derivatives[c].mean(axis=1).tolist() if c in self.derivatives else None
                    ),
                    "p_value": self.p_values[c],
                    "null_scores": self.null_scores[c].tolist(),
                    "p_value_bonferroni": corrected[c],
                    "significant": self.significant[c],
                    "cav_accuracy": self.cav_accuracy[c],
                    "set_size": self.set_sizes[c],
                }
                for c in self.concepts
            },
            "random": {
                "score": float(np.mean(self.random_scores)),
                "score_std": float(np.std(self.random_scores)),
                "scores": self.random_scores.tolist(),
                "cav_accuracy": float(np.mean([v.accuracy for v in self.random_cavs])),
            },
            "options": self.options,
            "timings_s": self.timings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def figure(self, **kw: Any) -> Any:
        """Bar chart: mean TCAV score per concept with its standard deviation over the random sets,
        the random-vs-random baseline, and a significance mark (``*`` or ``n.s.``) with the p-value."""
        from .figures import tcav_figure

        return tcav_figure(self, **kw)

    def save(self, directory: str | Path, name: str = "tcav") -> list[Path]:
        """Write ``name.png`` (the bar chart) and ``name.json``; returns the paths."""
        import matplotlib.pyplot as plt

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        fig = self.figure()
        png, js = out / f"{name}.png", out / f"{name}.json"
        try:
            fig.savefig(png, dpi=110)
        finally:
            plt.close(fig)
        js.write_text(self.to_json())
        return [png, js]


TESTS = ("exchangeable", "paper")


def null_pairs(n_sets: int, test: str) -> list[tuple[int, int]]:
    """(pseudo-concept, counterpart) random-set pairs of the null: ``"paper"`` i vs i+1 (cyclic);
    ``"exchangeable"`` every ordered pair i != j, grouped by i."""
    if test == "paper":
        return [(i, (i + 1) % n_sets) for i in range(n_sets)]
    return [(i, j) for i in range(n_sets) for j in range(n_sets) if j != i]


def prediction_t_test(value: float, sample: np.ndarray) -> float:
    """Two-sided p-value of ``value`` as one more draw from the normal population ``sample`` came
    from: ``t = (value - mean) / (sd * sqrt(1 + 1/n))`` with n - 1 degrees of freedom."""
    from scipy import stats

    sample = np.asarray(sample, dtype=np.float64)
    n = len(sample)
    sd = float(np.std(sample, ddof=1))
    diff = value - float(np.mean(sample))
    if sd == 0:
        return 1.0 if diff == 0 else 0.0
    t = diff / (sd * np.sqrt(1 + 1 / n))
    return float(2 * stats.t.sf(abs(t), df=n - 1))


def t_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided two-sample t-test (pooled variance, as in the TCAV reference code); p-value.

    When both samples have no spread the test is decided by the means (p = 1 if equal, else 0).
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():  # nearly constant samples: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=True).pvalue)


def _as_sets(spec: Any, bundle: Any, what: str, ndim: int | None = None) -> list[Tensor]:
    """A list of random sets given as a list of tensors/folders/lists."""
    if isinstance(spec, Tensor) or isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise OptionError(
            f"{what} must be a list of image sets or a count of sets drawn from random=; got {type(spec).__name__}."
        )
    return [image_set(s, bundle, f"{what}[{i}]", ndim=ndim) for i, s in enumerate(spec)]


def draw_sets(pool_size: int, n_sets: int, set_size: int, seed: int) -> list[np.ndarray]:
    """``n_sets`` index sets of ``set_size`` distinct pool items each (sets may overlap), seeded."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(pool_size, size=set_size, replace=False)) for _ in range(n_sets)]


def directional_derivatives(gradients: Tensor, vectors: Tensor) -> Tensor:
    """(N inputs, D) gradients . (K, D) CAVs -> (K, N) directional derivatives (float64): how the
    target score of each input changes along each CAV at the layer."""
    g = gradients.reshape(gradients.shape[0], -1).double()
    return vectors.reshape(vectors.shape[0], -1).double() @ g.T


def directional_scores(gradients: Tensor, vectors: Tensor) -> Tensor:
    """(N inputs, D) gradients . (K, D) CAVs -> (K,) fraction of inputs with a positive derivative."""
    return (directional_derivatives(gradients, vectors) > 0).double().mean(dim=1)


def magnitude_scores(derivatives: np.ndarray) -> np.ndarray:
    """(K, N) directional derivatives -> (K,) ``sum(max(S, 0)) / sum(|S|)`` per CAV: the share of the
    derivatives' total size that is positive (0.5 when every derivative is zero)."""
    d = np.asarray(derivatives, dtype=np.float64)
    total = np.abs(d).sum(axis=1)
    pos = np.clip(d, 0, None).sum(axis=1)
    return np.where(total > 0, pos / np.where(total > 0, total, 1.0), 0.5)


def tcav(
    model: Any,
    inputs: Any,
    *,
    layer: Any,
    concepts: Mapping[str, Any],
    target: Any = None,
    random_sets: int | Sequence[Any] = 10,
    random: Any = None,
    set_size: int | None = None,
    classifier: str | Callable[[np.ndarray, np.ndarray, int], np.ndarray] = "logistic",
    alpha: float = 0.05,
    test: str = "exchangeable",
    seed: int = 0,
    preprocess: Callable[[Any], Tensor] | None = None,
) -> Any:
    """TCAV scores, p-values and significance of ``concepts`` for ``target`` at ``layer``.

    ``inputs``: examples of the target class (tensor, data loader, folder or list of images).
    ``concepts``: ``{name: images}`` (the same kinds). ``random_sets``: a list of random image
    sets, or a count of sets of ``set_size`` images (default: the smallest concept set) drawn
    without replacement from the ``random=`` pool. ``classifier``: ``"logistic"``, ``"sgd"`` or
    ``fit(X, y, seed) -> w`` (:func:`~perspicio.concepts.cav.fit_cav`). ``test``:
    ``"exchangeable"`` (calibrated) or ``"paper"`` (Kim et al.'s t-test). Seeded: the same call
    gives the same result.

    ``layer``: one layer (name or module) gives a :class:`TCAVResult`; a list of layers gives
    ``{layer name: TCAVResult}``, every layer with the same inputs, concept and random sets.
    """
    t0 = time.perf_counter()
    bundle = unwrap(model, preprocess)
    seed = check_seed(seed)
    classifier = check_classifier(classifier)
    if test not in TESTS:
        raise OptionError(f"test must be one of {', '.join(TESTS)}; got {test!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1:
        raise OptionError(f"alpha must be a number in (0, 1); got {alpha!r}.")
    if not isinstance(concepts, Mapping) or not concepts:
        raise OptionError("concepts must be a non-empty mapping {name: images}.")
    names = [str(c) for c in concepts]
    if len(set(names)) != len(names):
        raise OptionError(f"concept names must be distinct as strings; got {list(concepts)!r}.")
    several = isinstance(layer, (list, tuple))
    if several:
        if not layer:
            raise LayerError("layer is an empty list; give at least one layer.")
        layers = resolve_layers(bundle.model, list(layer))
    else:
        if isinstance(layer, str) and "," in layer:
            named = [n for n, _ in resolve_layers(bundle.model, layer)]
            if len(named) > 1:
                raise LayerError(
                    f"layer {layer!r} names several layers; pass them as a list (layer={named!r}) "
                    "for one TCAV result per layer."
                )
        layers = [layer_module(bundle.model, layer)]
    x = image_set(inputs, bundle, "inputs", minimum=1)
    concept_x = {
        str(c): image_set(v, bundle, f"concept {c!r}", ndim=x.ndim) for c, v in concepts.items()
    }

    # random sets: explicit sets, or index sets into one pool (each pool image computed once)
    pool: Tensor | None = None
    index_sets: list[np.ndarray] = []
    if isinstance(random_sets, int) and not isinstance(random_sets, bool):
        n_sets = check_int("random_sets", random_sets, minimum=2)
        if random is None:
            raise OptionError("random_sets is a count: pass the pool of random images as random=.")
        pool = image_set(random, bundle, "random pool", ndim=x.ndim)
        size = (
            min(len(v) for v in concept_x.values())
            if set_size is None
            else check_int("set_size", set_size, minimum=MIN_SET_SIZE, hint="images, MIN_SET_SIZE")
        )
        if size > len(pool):
            raise InputError(
                f"random sets of {size} images need a pool of at least {size}; the pool has {len(pool)}."
            )
        index_sets = draw_sets(len(pool), n_sets, size, seed)
        random_x: list[Tensor] | None = None
    else:
        if random is not None:
            raise OptionError(
                "give either random_sets as a list of image sets, or random= (a pool) with a count."
            )
        random_x = _as_sets(random_sets, bundle, "random_sets", x.ndim)
        n_sets = len(random_x)
        if n_sets < 2:
            raise OptionError(f"the significance test needs at least 2 random sets; got {n_sets}.")
    load = time.perf_counter() - t0

    results = {
        name: _one_layer(
            bundle,
            name,
            module,
            x,
            concept_x,
            random_x,
            pool,
            index_sets,
            target=target,
            classifier=classifier,
            alpha=float(alpha),
            test=test,
            seed=seed,
            load=load,
        )
        for name, module in layers
    }
    return results if several else next(iter(results.values()))


def _activations_of(
    bundle: Any, name: str, module: Any, v: Tensor, what: str, reference: Tensor
) -> Tensor:
    """The layer's activations of one set, checked to have the inputs' shape at the layer."""
    try:
        a = activations(bundle.model, module, v)
    except RuntimeError as exc:
        if tuple(v.shape[1:]) == tuple(reference.shape[1:]):
            raise
        raise InputError(
            f"the model failed on {what}, whose inputs have shape {tuple(v.shape[1:])} while the "
            f"explained inputs have {tuple(reference.shape[1:])}: give every set at the inputs' size "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return a


def _check_shape(act: Tensor, want: Tensor, what: str, layer: str, v: Tensor, x: Tensor) -> None:
    if act.shape[1:] == want.shape[1:]:
        return
    sizes = (
        f" (its inputs have shape {tuple(v.shape[1:])}, the explained inputs {tuple(x.shape[1:])}: "
        "resize them to the same size, or choose a layer after global pooling)"
        if v.shape[1:] != x.shape[1:]
        else ""
    )
    raise InputError(
        f"{what} gives activations of shape {tuple(act.shape[1:])} at layer {layer!r}, the explained "
        f"inputs {tuple(want.shape[1:])}; a CAV needs one shape{sizes}."
    )


def _fit(a: Tensor, r: Tensor, what: str, classifier: Any, seed: int) -> CAV:
    try:
        return fit_cav(a, r, classifier=classifier, seed=seed)
    except OptionError as exc:
        raise OptionError(f"{what}: {exc}") from None


def _one_layer(
    bundle: Any,
    layer_name: str,
    module: Any,
    x: Tensor,
    concept_x: dict[str, Tensor],
    random_x: list[Tensor] | None,
    pool: Tensor | None,
    index_sets: list[np.ndarray],
    *,
    target: Any,
    classifier: Any,
    alpha: float,
    test: str,
    seed: int,
    load: float,
) -> TCAVResult:
    t1 = time.perf_counter()
    # activations: once per image
    act_inputs, grads, resolved = activations_and_gradients(
        bundle.model, module, x, target, bundle.labels
    )
    concept_acts = {}
    for c, v in concept_x.items():
        what = f"concept {c!r}"
        concept_acts[c] = _activations_of(bundle, layer_name, module, v, what, x)
        _check_shape(concept_acts[c], act_inputs, what, layer_name, v, x)
    if random_x is None:
        assert pool is not None
        pool_acts = _activations_of(bundle, layer_name, module, pool, "the random pool", x)
        _check_shape(pool_acts, act_inputs, "the random pool", layer_name, pool, x)
        random_acts = [pool_acts[torch.from_numpy(ix)] for ix in index_sets]
    else:
        random_acts = []
        for i, v in enumerate(random_x):
            what = f"random_sets[{i}]"
            random_acts.append(_activations_of(bundle, layer_name, module, v, what, x))
            _check_shape(random_acts[-1], act_inputs, what, layer_name, v, x)
    n_sets = len(random_acts)
    t2 = time.perf_counter()

    # CAVs and scores
    with small_blas():
        cavs = {
            c: tuple(
                _fit(a, r, f"concept {c!r} vs random set {i}", classifier, seed)
                for i, r in enumerate(random_acts)
            )
            for c, a in concept_acts.items()
        }
        pairs = null_pairs(n_sets, test)
        random_cavs = tuple(
            _fit(random_acts[i], random_acts[j], f"random set {i} vs {j}", classifier, seed)
            for i, j in pairs
        )
    t3 = time.perf_counter()
    derivatives = {
        c: directional_derivatives(grads, torch.stack([v.vector for v in cs])).numpy()
        for c, cs in cavs.items()
    }
    random_derivatives = directional_derivatives(
        grads, torch.stack([v.vector for v in random_cavs])
    ).numpy()
    concept_scores = {c: (d > 0).mean(axis=1) for c, d in derivatives.items()}
    pair_scores = (random_derivatives > 0).mean(axis=1)
    if test == "paper":
        random_scores = pair_scores
        null_scores = {c: pair_scores for c in concept_scores}
        p_values = {c: t_test(s, random_scores) for c, s in concept_scores.items()}
    else:
        # each random set as a pseudo-concept against the N - 1 other sets and the concept's set:
        # under the null the N + 1 sets are exchangeable, and so are their N + 1 mean scores
        with small_blas():
            reverse = {
                c: tuple(
                    _fit(r, a, f"random set {i} vs concept {c!r}", classifier, seed)
                    for i, r in enumerate(random_acts)
                )
                for c, a in concept_acts.items()
            }
        per_set = pair_scores.reshape(n_sets, n_sets - 1)
        random_scores = per_set.mean(axis=1)
        null_scores = {
            c: (
                per_set.sum(axis=1)
                + directional_scores(grads, torch.stack([v.vector for v in cs])).numpy()
            )
            / n_sets
            for c, cs in reverse.items()
        }
        p_values = {
            c: prediction_t_test(float(np.mean(s)), null_scores[c])
            for c, s in concept_scores.items()
        }
    threshold = alpha / len(concept_x)
    significant = {c: bool(p < threshold) for c, p in p_values.items()}
    t4 = time.perf_counter()

    return TCAVResult(
        layer=layer_name,
        target=describe_target(bundle, resolved),
        concepts=tuple(concept_x),
        scores={c: float(np.mean(s)) for c, s in concept_scores.items()},
        concept_scores=concept_scores,
        random_scores=random_scores,
        null_scores=null_scores,
        p_values=p_values,
        significant=significant,
        alpha=alpha,
        cavs=cavs,
        random_cavs=random_cavs,
        n_inputs=int(x.shape[0]),
        set_sizes={c: int(v.shape[0]) for c, v in concept_x.items()},
        options={
            "classifier": classifier
            if isinstance(classifier, str)
            else getattr(classifier, "__name__", "callable"),
            "random_sets": n_sets,
            "test": test,
            "seed": seed,
            "model": bundle.name,
            "random_set_sizes": [int(len(r)) for r in random_acts],
        },
        timings={"load": load, "activations": t2 - t1, "cavs": t3 - t2, "scores": t4 - t3},
        derivatives=derivatives,
        random_derivatives=random_derivatives,
    )
