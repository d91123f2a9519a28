"""Command-line interface: a thin layer over the registry, the zoo and the viz package.

Errors the user can fix print one line (``error: ...``) and exit with status 2;
unexpected failures print one line and exit 1. ``--debug`` shows the traceback.
Each command group lives in its own module listed in :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from ..core.allocator import tune_allocator
from ..errors import PerspicioError

#: modules that add commands to :data:`cli` (each defines ``register(group)``)
COMMAND_MODULES = ["explain", "features", "evaluate", "tabular", "surrogate", "run", "concepts", "serve"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="perspicio")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """perspicio: explain why a model made a prediction, and score the explanation."""
    ctx.obj = {"debug": debug}


for _name in COMMAND_MODULES:
    importlib.import_module(f".{_name}", __name__).register(cli)


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``perspicio`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if argv is None:  # our own process: let it reuse freed tensor buffers (core/allocator.py)
        tune_allocator()
    try:
        with warnings.catch_warnings():
            if not debug:  # one line per warning, like the errors (--debug: Python's format with the source line)
                warnings.showwarning = _one_line_warning
            cli.main(args=args, prog_name="perspicio", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except PerspicioError as exc:
        if debug:
            raise
        # one line even when the message carries a library's multi-line report (e.g. xgboost's
        # native backtrace after its own message)
        text = str(exc).strip()
        click.echo(f"error: {text.splitlines()[0] if text else type(exc).__name__}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback with --debug
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: {type(exc).__name__}: {msg} (run with --debug for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
