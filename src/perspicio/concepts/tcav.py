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

from ..errors import InputError, OptionError
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


def _as_sets(spec: Any, bundle: Any, what: str) -> list[Tensor]:
    """A list of random sets given as a list of tensors/folders/lists."""
    if isinstance(spec, Tensor) or isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise OptionError(
            f"{what} must be a list of image sets or a count of sets drawn from random=; got {type(spec).__name__}."
        )
    return [image_set(s, bundle, f"{what}[{i}]") for i, s in enumerate(spec)]


def draw_sets(pool_size: int, n_sets: int, set_size: int, seed: int) -> list[np.ndarray]:
    """``n_sets`` index sets of ``set_size`` distinct pool items each (sets may overlap), seeded."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(pool_size, size=set_size, replace=False)) for _ in range(n_sets)]


def directional_scores(gradients: Tensor, vectors: Tensor) -> Tensor:
    """(N inputs, D) gradients . (K, D) CAVs -> (K,) fraction of inputs with a positive derivative."""
    g = gradients.reshape(gradients.shape[0], -1).double()
    return (g @ vectors.double().T > 0).double().mean(dim=0)


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
) -> TCAVResult:
    """TCAV scores, p-values and significance of ``concepts`` for ``target`` at ``layer``.

    ``inputs``: examples of the target class (tensor, folder or list of images). ``concepts``:
    ``{name: images}``. ``random_sets``: a list of random image sets, or a count of sets of
    ``set_size`` images (default: the smallest concept set) drawn without replacement from the
    ``random=`` pool. ``classifier``: ``"logistic"``, ``"sgd"`` or ``fit(X, y, seed) -> w``
    (:func:`~perspicio.concepts.cav.fit_cav`). ``test``: ``"exchangeable"`` (calibrated) or
    ``"paper"`` (Kim et al.'s t-test). Seeded: the same call gives the same result.
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
    layer_name, module = layer_module(bundle.model, layer)
    x = image_set(inputs, bundle, "inputs", minimum=1)
    concept_x = {str(c): image_set(v, bundle, f"concept {c!r}") for c, v in concepts.items()}

    # random sets: explicit sets, or index sets into one pool (each pool image computed once)
    if isinstance(random_sets, int) and not isinstance(random_sets, bool):
        n_sets = check_int("random_sets", random_sets, minimum=2)
        if random is None:
            raise OptionError("random_sets is a count: pass the pool of random images as random=.")
        pool = image_set(random, bundle, "random pool")
        size = (
            min(len(v) for v in concept_x.values())
            if set_size is None
            else check_int("set_size", set_size, minimum=MIN_SET_SIZE)
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
        random_x = _as_sets(random_sets, bundle, "random_sets")
        n_sets = len(random_x)
        if n_sets < 2:
            raise OptionError(f"the significance test needs at least 2 random sets; got {n_sets}.")
    t1 = time.perf_counter()

    # activations: once per image
    act_inputs, grads, resolved = activations_and_gradients(
        bundle.model, module, x, target, bundle.labels
    )
    concept_acts = {c: activations(bundle.model, module, v) for c, v in concept_x.items()}
    if random_x is None:
        pool_acts = activations(bundle.model, module, pool)
        random_acts = [pool_acts[torch.from_numpy(ix)] for ix in index_sets]
    else:
        random_acts = [activations(bundle.model, module, v) for v in random_x]
    t2 = time.perf_counter()

    # CAVs and scores
    with small_blas():
        cavs = {
            c: tuple(fit_cav(a, r, classifier=classifier, seed=seed) for r in random_acts)
            for c, a in concept_acts.items()
        }
        pairs = null_pairs(n_sets, test)
        random_cavs = tuple(
            fit_cav(random_acts[i], random_acts[j], classifier=classifier, seed=seed)
            for i, j in pairs
        )
    t3 = time.perf_counter()
    concept_scores = {
        c: directional_scores(grads, torch.stack([v.vector for v in cs])).numpy()
        for c, cs in cavs.items()
    }
    pair_scores = directional_scores(grads, torch.stack([v.vector for v in random_cavs])).numpy()
    if test == "paper":
        random_scores = pair_scores
        null_scores = {c: pair_scores for c in concept_scores}
        p_values = {c: t_test(s, random_scores) for c, s in concept_scores.items()}
    else:
        # each random set as a pseudo-concept against the N - 1 other sets and the concept's set:
        # under the null the N + 1 sets are exchangeable, and so are their N + 1 mean scores
        with small_blas():
            reverse = {
                c: tuple(fit_cav(r, a, classifier=classifier, seed=seed) for r in random_acts)
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
        alpha=float(alpha),
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
        timings={"load": t1 - t0, "activations": t2 - t1, "cavs": t3 - t2, "scores": t4 - t3},
    )
