"""Adversarial examples: FGSM and PGD (L-infinity and L2), targeted or untargeted, and how
another explanation method's map changes under the attack.

Attacks work in pixel space [0, 1] (for zoo models the preprocessing's mean/std maps
pixels to model inputs), so ``epsilon`` is in pixel units, e.g. 2/255. The perturbed
image always stays in [0, 1] and inside the norm ball: after every step the
perturbation is projected onto the ball, and the final image is nudged by one float ulp
where rounding put a pixel outside, so ``|x_adv - x| <= epsilon`` holds exactly.

Untargeted attacks increase the cross-entropy of the reference class (the given
``target``, default the predicted class); targeted attacks decrease the cross-entropy of
``target`` (Goodfellow et al., ICLR 2015; Madry et al., ICLR 2018).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.guard import model_guard
from ..core.inputs import as_batch
from ..core.options import check_choice, check_float, check_int
from ..core.registry import METHODS as METHOD_REGISTRY
from ..core.targets import resolve_target
from ..errors import OptionError, TargetError
from ..methods.base import build
from ._common import ModelBundle, make_generator, unwrap

NORMS = ("linf", "l2")
METHODS = ("fgsm", "pgd")


@dataclass(frozen=True)
class AttackResult:
    """``pixels`` / ``adversarial`` images in [0, 1]; ``inputs`` the adversarial model inputs;
    ``perturbation`` = adversarial - pixels; ``linf`` / ``l2`` its norms per image;
    ``label`` the attacked (untargeted) or aimed-at (targeted) class; ``before`` / ``after``
    predicted classes and their probabilities; ``success`` per image."""

    method: str
    norm: str
    epsilon: float
    targeted: bool
    pixels: Tensor
    adversarial: Tensor
    inputs: Tensor
    perturbation: Tensor
    linf: Tensor
    l2: Tensor
    label: Tensor
    before: Tensor
    before_prob: Tensor
    after: Tensor
    after_prob: Tensor
    label_prob_before: Tensor
    label_prob_after: Tensor
    success: Tensor
    options: dict[str, Any]


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    eps = _radius(eps, delta)
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def _radius(eps: float, like: Tensor) -> float:
    """The largest number of ``like``'s dtype that is <= ``eps`` (so float32 checks are exact)."""
    t = torch.tensor(eps, dtype=like.dtype)
    if float(t) > eps:
        t = torch.nextafter(t, torch.zeros_like(t))
    return float(t)


def _exact(x: Tensor, adv: Tensor, eps: float, norm: str) -> Tensor:
    """Make the final image satisfy the constraint exactly despite float rounding."""
    adv = adv.clamp(0, 1)
    eps = _radius(eps, x)
    if norm == "linf":
        for _ in range(4):
            bad = (adv - x).abs() > eps
            if not bool(bad.any()):
                break
            adv = torch.where(bad, torch.nextafter(adv, x), adv)
        return adv
    for _ in range(8):
        n = (adv - x).flatten(1).norm(dim=1)
        bad = n > eps
        if not bool(bad.any()):
            break
        shrink = torch.where(bad, eps / n * (1 - 1e-6), torch.ones_like(n)).view(-1, 1, 1, 1)
        adv = (x + (adv - x) * shrink).clamp(0, 1)
    return adv


def _loss(bundle: ModelBundle, pixels: Tensor, label: Tensor, targeted: bool) -> Tensor:
    out = bundle.model(bundle.space.to_model(pixels))
    ce = F.cross_entropy(out, label, reduction="sum")
    return -ce if targeted else ce  # ascend this


def attack(
    model: Any,
    inputs: Tensor,
    *,
    method: str = "pgd",
    epsilon: float = 2 / 255,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    target: Any = None,
    targeted: bool = False,
    random_start: bool = True,
    seed: int | None = 0,
) -> AttackResult:
    """Attack ``inputs`` (N, C, H, W, model space) with FGSM or PGD.

    ``epsilon`` is the radius of the L-inf or L2 ball in pixel units; ``step_size``
    defaults to 2.5 * epsilon / steps; ``random_start`` draws the PGD start uniformly in the
    L-inf ball (or on a random L2 direction) from a generator seeded by ``seed``.
    ``target``: the class to move away from (untargeted; default: predicted) or towards
    (``targeted=True``; required).
    """
    bundle = unwrap(model)
    net = bundle.model
    check_choice("method", method, METHODS)
    check_choice("norm", norm, NORMS)
    eps = check_float("epsilon", epsilon, minimum=0)
    steps = 1 if method == "fgsm" else check_int("steps", steps, minimum=1)
    alpha = eps if method == "fgsm" else check_float("step_size", step_size, minimum=0, strict=True) if step_size is not None else 2.5 * eps / steps
    if targeted and target is None:
        raise TargetError("a targeted attack needs target=<class index or name>.")
    x = as_batch(inputs, net)
    pixels = bundle.space.to_pixels(x).detach()
    if bundle.preprocess is not None:
        pixels = pixels.clamp(0, 1)
    elif float(pixels.min()) < -1e-6 or float(pixels.max()) > 1 + 1e-6:
        raise OptionError("attacks work on images in [0, 1]; pass a zoo model (its preprocess maps pixels) "
                          "or inputs in [0, 1] to a plain module.")
    gen = make_generator(seed, pixels.device)
    with model_guard(net):
        with torch.no_grad():
            out0 = net(bundle.space.to_model(pixels))
        tgt = resolve_target(target, out0, bundle.labels)
        if tgt.indices is None:
            raise TargetError("attacks need a class target (an index or a class name), not a callable.")
        label = tgt.indices.to(out0.device)
        if method == "pgd" and random_start and eps > 0:
            if norm == "linf":
                delta = (torch.rand(pixels.shape, generator=gen, device=pixels.device) * 2 - 1) * eps
            else:
                d = torch.randn(pixels.shape, generator=gen, device=pixels.device)
                r = torch.rand((pixels.shape[0],), generator=gen, device=pixels.device) * eps
                delta = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r.view(-1, 1, 1, 1)
        else:
            delta = torch.zeros_like(pixels)
        adv = (pixels + delta).clamp(0, 1)
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_loss(bundle, adv, label, targeted), adv)
            if norm == "linf":
                step = alpha * g.sign()
            else:
                step = alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = _project(adv.detach() + step - pixels, eps, norm)
            adv = (pixels + delta).clamp(0, 1)
        adv = _exact(pixels, adv.detach(), eps, norm)
        with torch.no_grad():
            x_adv = bundle.space.to_model(adv)
            p0 = out0.softmax(dim=1)
            p1 = net(x_adv).softmax(dim=1)
    before, after = p0.argmax(dim=1), p1.argmax(dim=1)
    diff = adv - pixels
    success = (after == label) if targeted else (after != label)
    return AttackResult(
        method=method, norm=norm, epsilon=eps, targeted=bool(targeted), pixels=pixels, adversarial=adv,
        inputs=x_adv, perturbation=diff, linf=diff.flatten(1).abs().amax(dim=1), l2=diff.flatten(1).norm(dim=1),
        label=label, before=before, before_prob=p0.gather(1, before[:, None])[:, 0],
        after=after, after_prob=p1.gather(1, after[:, None])[:, 0],
        label_prob_before=p0.gather(1, label[:, None])[:, 0], label_prob_after=p1.gather(1, label[:, None])[:, 0],
        success=success,
        options={"method": method, "norm": norm, "epsilon": eps, "steps": steps, "step_size": alpha,
                 "targeted": bool(targeted), "random_start": bool(random_start), "seed": seed},
    )


def minimal_epsilon(model: Any, inputs: Tensor, epsilons: list[float], **kw: Any) -> tuple[float | None, AttackResult | None]:
    """The smallest of ``epsilons`` (tried in increasing order) whose attack succeeds on every
    image, with its result; (None, None) if none does."""
    for eps in sorted(float(e) for e in epsilons):
        res = attack(model, inputs, epsilon=eps, **kw)
        if bool(res.success.all()):
            return eps, res
    return None, None


@dataclass(frozen=True)
class ExplanationChange:
    """Explanations of the clean and the adversarial image by another method.

    ``clean`` explains the original prediction on the clean image; ``adversarial_same``
    the same class on the adversarial image; ``adversarial_new`` the new prediction on
    it. ``correlation`` is the Pearson correlation of the clean map with each."""

    method: str
    clean: Any
    adversarial_same: Any
    adversarial_new: Any
    correlation_same: float
    correlation_new: float


def _pearson(a: Tensor, b: Tensor) -> float:
    a = a.flatten().double()
    b = b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    d = a.norm() * b.norm()
    return float((a @ b) / d) if d > 0 else 0.0


def explanation_change(model: Any, result: AttackResult, method: str = "gradcam", index: int = 0, **options: Any) -> ExplanationChange:
    """Explain the clean and adversarial image ``index`` with a registered ``method``."""
    explainer = build(METHOD_REGISTRY.get(method).cls, model, **options)
    x0 = result.inputs.new_tensor(0)  # device/dtype anchor
    bundle = unwrap(model)
    clean_x = bundle.space.to_model(result.pixels[index:index + 1]).to(x0)
    adv_x = result.inputs[index:index + 1]
    before, after = int(result.before[index]), int(result.after[index])
    clean = explainer(clean_x, target=before)
    same = explainer(adv_x, target=before)
    new = explainer(adv_x, target=after)
    return ExplanationChange(
        method=method, clean=clean, adversarial_same=same, adversarial_new=new,
        correlation_same=_pearson(clean.attributions, same.attributions),
        correlation_new=_pearson(clean.attributions, new.attributions),
    )


__all__ = ["AttackResult", "ExplanationChange", "attack", "explanation_change", "minimal_epsilon"]
