"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
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
        flag = v.strip().lower()
        if flag in ("true", "false", "none"):  # shell users write true/false as often as True/False
            out[k.strip()] = {"true": True, "false": False, "none": None}[flag]
            continue
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


# ----------------------------------------------------------------------------- output paths


def _write_problem(exc: OSError) -> str:
    if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way (the path or one of its parents is a file, not a directory)"
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return "no permission to write there"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return f"{exc.strerror or exc}"


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create the output directory ``path`` and test-write a file in it, so an unwritable ``--out``
    fails before any computation (OptionError naming the reason)."""
    out = Path(path)
    try:
        if out.exists() and not out.is_dir():
            raise FileExistsError(errno.EEXIST, "not a directory", str(out))
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".perspicio-write-test-"):
            pass
    except OSError as exc:
        raise OptionError(f"cannot write to {flag} {str(out)!r}: {_write_problem(exc)}.") from None
    return out


def check_out_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Like :func:`check_out_dir` for an output file: its directory must be writable and the path
    must not be a directory."""
    out = Path(path)
    if out.is_dir():
        raise OptionError(f"cannot write to {flag} {str(out)!r}: it is a directory; give a file name.")
    check_out_dir(out.parent if str(out.parent) else ".", flag=f"{flag} directory")
    return out


def out_dir_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback: check a --out directory at parse time, before the command runs."""
    if value is not None:
        check_out_dir(value)
    return value


def out_file_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback: check a --out file at parse time, before the command runs."""
    if value is not None:
        check_out_file(value)
    return value


def out_dir_flag(default: str | None = "perspicio-out", help: str = "Output directory (created and test-written before any work).") -> Callable:
    """The ``--out/-o DIRECTORY`` option of every command that writes files, checked at parse time."""
    return click.option("--out", "-o", "out_dir", default=default, show_default=default is not None,
                        type=click.Path(file_okay=False), callback=out_dir_option, help=help)


#: the ``--target/-t`` option of the commands that explain one class per image
target_flag = click.option(
    "--target", "-t", default=None, help="Class index or name to explain (default: the predicted class)."
)

#: the ``--output KEY|INDEX`` option: which tensor of a dict/tuple/ModelOutput to explain
output_flag = click.option(
    "--output", "output", default=None, metavar="KEY|INDEX",
    help="For models that return a dict, tuple or ModelOutput: the key (e.g. logits) or index (e.g. 0) of the tensor to explain.",
)


def output_names(sources: Sequence[str]) -> list[str]:
    """One distinct file-name stem per input: ``a/x.png`` -> ``x``; a later input with the same
    stem (``b/x.png``, ``x.jpg``) -> ``x-2``, ``x-3``, ... (never a name an earlier input got)."""
    names: list[str] = []
    used: set[str] = set()
    for source in sources:
        p = Path(source)
        base = p.stem if p.suffix else source.replace("/", "_").replace(os.sep, "_")
        name, k = base, 2
        while name.lower() in used:  # case-insensitive file systems would merge X and x
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def check_family(family: str | None, families: Sequence[str], what: str) -> str | None:
    """--family of ``perspicio methods``/``metrics``: one of ``families`` (UnknownNameError with
    suggestions otherwise, instead of an empty table and exit status 0)."""
    from ..errors import UnknownNameError, suggest

    if family is None:
        return None
    value = family.strip().lower()
    if value not in families:
        raise UnknownNameError(
            f"unknown {what} family {family!r}; expected one of: {', '.join(sorted(families))}."
            + suggest(value, families)
        )
    return value


def parse_output(value: str | None) -> Any:
    """--output: an integer selects by index ('0', '-1'), anything else is a key ('logits')."""
    if value is None:
        return None
    v = value.strip()
    if not v:
        raise OptionError("--output must be a key (e.g. logits) or an index (e.g. 0); got an empty string.")
    if v.lstrip("-").isdigit():
        return int(v)
    return v
