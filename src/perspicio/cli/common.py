"""Options and helpers shared by CLI commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..errors import OptionError


def model_options(f: Callable) -> Callable:
    """--model, --device, --random-init."""
    f = click.option("--random-init", is_flag=True, help="For torchvision:/timm: models, random weights instead of cached pretrained ones.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda:0.")(f)
    f = click.option(
        "--model", "-m", "model_spec", default="efficientnet_lite0", show_default=True,
        help="Bundled name, torchvision:NAME, timm:NAME, a TorchScript file, or package.module:factory.",
    )(f)
    return f


def load_model(model_spec: str, device: str, random_init: bool) -> Any:
    from ..zoo.sources import resolve_model

    return resolve_model(model_spec, pretrained=not random_init, device=device)


def parse_target(value: str | None) -> Any:
    """'285' -> 285, 'Egyptian cat' -> 'Egyptian cat', None -> None (predicted class)."""
    if value is None:
        return None
    v = value.strip()
    if v.lstrip("-").isdigit():
        return int(v)
    return v


def split_list(values: tuple[str, ...] | list[str] | str | None) -> list[str]:
    """Accept repeated options and comma-separated lists alike."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def parse_extra(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--option key=value pairs with Python-literal values where possible."""
    import ast

    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise OptionError(f"--option expects key=value; got {p!r}.")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out
