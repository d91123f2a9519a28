"""Base class of all attribution methods.

A method is constructed with the model and its options, and called on a batch
of inputs and a target. The base class owns what every method shares: input
validation, the model guard, the batching engine, target resolution and the
provenance recorded in the :class:`~perspicio.Explanation`. Subclasses override
one function, :meth:`Method._explain`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.batching import Engine, check_progress
from ..core.blackbox import unwrap_model
from ..core.explanation import Explanation
from ..core.guard import checked_before, model_guard, shared_walk
from ..core.inputs import as_batch, check_model_usable
from ..core.options import RecordsOptions
from ..core.outputs import OutputSelector
from ..core.targets import normalize_target, split_multi_target, target_names
from ..errors import ModelError, OptionError


class Method(RecordsOptions):
    """Base of attribution methods; subclasses implement :meth:`_explain`."""

    _options_exclude: ClassVar[tuple[str, ...]] = ("self", "model")
    name: ClassVar[str] = "method"
    input_ndim: ClassVar[int | None] = 4
    #: True for methods that explain several targets per input ([[3, 5]] or an (N, T) target)
    #: with ONE forward pass per input and T backward passes: their ``_explain`` is then called
    #: with ``targets_per_input=T`` (the input still repeated T times, rows input-major)
    shares_forward_across_targets: ClassVar[bool] = False
    #: False for methods whose ``targets`` are not classes of the output (the neuron methods
    #: report the explained channel there): ``__call__`` then gives them no class names
    targets_are_classes: ClassVar[bool] = True
    #: False for methods that never differentiate (every pass runs without gradients): the guard
    #: then leaves ``requires_grad`` as it is instead of freezing each parameter for the call
    freezes_parameters: ClassVar[bool] = True
    #: True for methods that change the backward pass only at rectifiers (ReLU, ReLU6,
    #: clamp(min=0)): on a model that runs none they refuse (the result would be plain saliency)
    needs_rectifiers: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        progress: bool | Callable[[int, int, str], None] = False,
        labels: Sequence[str] | None = None,
        compile: bool = False,
        output: Any = None,
    ) -> None:
        """Common options of every method.

        Args:
            output: which tensor of the model's output to explain when the model does not return
                one tensor: a key (``"logits"``), an index (``0``), a path of keys/indices
                (``("hidden_states", -1)``) or a callable (``perspicio.detections``); see
                :mod:`perspicio.core.outputs`.
        """
        unit = getattr(model, "score_unit", None)  # a ZooModel says what its outputs are ("logit")
        #: what the explained scores are, recorded in provenance["score_unit"] (None: not known)
        self.score_unit = unit if isinstance(unit, str) and output is None and self.targets_are_classes else None
        model, zoo_labels = unwrap_model(model)
        if not isinstance(model, nn.Module):
            raise ModelError(f"{self.name} needs a torch nn.Module; got {type(model).__name__}.")
        check_model_usable(model)
        if getattr(model, "is_black_box", False) and not self.accepts_black_box():
            from ..core.registry import METHODS

            agnostic = sorted(e.name for e in METHODS.entries() if e.model_agnostic and not e.needs_gradients)
            raise ModelError(
                f"{self.name} needs a torch nn.Module (gradients or layers); got the black-box callable "
                f"{model.description}. Model-agnostic methods accept it: {', '.join(agnostic)}."
            )
        self.model = model
        self.labels = labels if labels is not None else zoo_labels
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.progress = check_progress(progress)
        if not isinstance(compile, bool):
            raise OptionError(f"compile must be True or False; got {compile!r}.")
        self.compile = compile
        self.output = output
        self._select = OutputSelector(output)  # validates the spec
        self.options: dict[str, Any] = {}
        Engine(model, batch_size=batch_size, memory_budget=memory_budget)  # validates the two options

    @classmethod
    def accepts_black_box(cls) -> bool:
        """True for registered model-agnostic methods (they only need model outputs)."""
        from ..core.registry import METHODS

        entry = METHODS._entries.get(getattr(cls, "name", ""))
        return bool(entry is not None and entry.cls is cls and entry.model_agnostic and not entry.needs_gradients)

    def _prepare_inputs(self, inputs: Any) -> Any:
        """Validate ``inputs`` at the boundary (override for non-tensor inputs such as text)."""
        return as_batch(inputs, self.model, ndim=self.input_ndim)

    def __call__(self, inputs: Tensor, target: Any = None) -> Explanation:
        """Explain ``inputs`` (N, C, H, W) for ``target`` (see :func:`perspicio.core.targets.resolve_target`)."""
        # the guard is entered first: its walk of the model serves the input checks and layer look-ups
        with model_guard(self.model, freeze=self.freezes_parameters):
            checked_before(self.model)  # __init__ scanned every tensor; the call re-checks the device only
            x = self._prepare_inputs(inputs)
            target = normalize_target(target)  # logits.argmax() (a 0-d tensor), numpy integers
            # several targets per input ([[3, 5]] or an (N, T) tensor): N*T rows, input-major
            multi = split_multi_target(target, len(x)) if isinstance(x, Tensor) else None
            shared: dict[str, int] = {}
            if multi is not None:
                target, per_input = multi
                x = x.repeat_interleave(per_input, dim=0)
                if self.shares_forward_across_targets:
                    shared["targets_per_input"] = per_input
            engine = Engine(self.model, batch_size=self.batch_size, memory_budget=self.memory_budget,
                            progress=self.progress, compile=self.compile, output=self._select)
            t0 = time.perf_counter()
            result = self._explain(x, target, engine, **shared)
            elapsed = time.perf_counter() - t0
        from .. import __version__

        provenance = {
            "perspicio": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(getattr(x, "device", "cpu")),
            "dtype": str(getattr(x, "dtype", "str")),
            "seconds": round(elapsed, 6),
            **engine.stats(),
            **dict(result.provenance),
        }
        if multi is not None:
            provenance["targets_per_input"] = per_input
        if self.score_unit is not None:
            provenance.setdefault("score_unit", self.score_unit)
        names = result.target_names  # the one place class names are given (a method may set better ones)
        if names is None and self.targets_are_classes and isinstance(result.targets, Tensor):
            names = target_names(self.labels, result.targets)
        return result.replace(method=self.name, options=self.options, provenance=provenance, target_names=names,
                              inputs=x if isinstance(x, Tensor) else result.inputs)

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        raise NotImplementedError  # abstract: every registered subclass overrides it


def check_option_names(cls: type[Method], options: Mapping[str, Any]) -> None:
    """An OptionError (with suggestions) if ``options`` names an option ``cls`` does not take."""
    allowed = cls.option_names()
    unknown = [k for k in options if k not in allowed]
    if unknown:
        from ..errors import suggest

        raise OptionError(
            f"method {cls.name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}."
            + suggest(unknown[0], allowed)
        )


def build(cls: type[Method], model: Any, **options: Any) -> Method:
    """Construct ``cls`` with ``options``, turning unknown option names into a clear error."""
    check_option_names(cls, options)
    with shared_walk(unwrap_model(model)[0]):  # the constructors' model check and layer searches walk it once
        return cls(model, **options)
