"""`perspicio serve`: the web app (see docs/serve.md)."""

from __future__ import annotations

import ipaddress
import math
import os
from pathlib import Path

import click

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(group: click.Group) -> None:
    group.add_command(serve_cmd)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_table(specs: tuple[str, ...]) -> dict[str, str]:
    """Model id shown in the page -> spec; the bundled model first, then each ``--model``. A
    TorchScript file is shown by its file name (its path never reaches the page)."""
    from ..errors import OptionError

    table = {"efficientnet_lite0": "efficientnet_lite0"}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.suffix and path.exists():
            key = path.name
            spec = str(path.resolve())
        elif path.suffix.lower() in (".pt", ".pth", ".ts", ".torchscript"):
            raise OptionError(f"--model {spec!r}: no such file.")
        else:
            key = spec
        if key in table and table[key] != spec:
            raise OptionError(f"two --model values are both shown as {key!r}; rename one file.")
        table[key] = spec
    return table


@click.command("serve")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Anything but loopback needs --allow-remote.",
)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    help="Another model to offer (repeatable): torchvision:NAME, timm:NAME (cached weights), a TorchScript file, package.module:factory. The bundled efficientnet_lite0 is always offered.",
)
@click.option("--workers", type=int, default=None, help="Worker processes (default: one per core).")
@click.option(
    "--queue",
    "queue_limit",
    type=int,
    default=32,
    show_default=True,
    help="Jobs that may wait; more get 503 with Retry-After.",
)
@click.option(
    "--time-limit",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds a job may run before its worker is stopped.",
)
@click.option(
    "--max-upload-mb", type=float, default=10.0, show_default=True, help="Largest upload in MiB."
)
@click.option(
    "--max-megapixels",
    type=float,
    default=25.0,
    show_default=True,
    help="Largest image (width x height), checked before decoding.",
)
@click.option(
    "--cache-mb",
    type=float,
    default=128.0,
    show_default=True,
    help="Result cache for identical requests, in MiB of JSON (0: off).",
)
@click.option(
    "--cached-models/--no-cached-models",
    default=True,
    show_default=True,
    help="Also offer every torchvision:/timm: classifier whose weights are in the local caches (never downloads).",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow --host to be a non-loopback address (the app has no authentication).",
)
@click.option(
    "--cors-origin",
    "cors",
    multiple=True,
    help="Allow cross-origin requests from this origin (repeatable; default: none).",
)
def serve_cmd(
    host: str,
    port: int,
    models: tuple[str, ...],
    workers: int | None,
    queue_limit: int,
    time_limit: float,
    max_upload_mb: float,
    max_megapixels: float,
    cache_mb: float,
    cached_models: bool,
    allow_remote: bool,
    cors: tuple[str, ...],
) -> None:
    """Start the web app: pick a model and an image, see the explanations and how far to trust them."""
    from ..errors import OptionError

    try:
        import uvicorn

        from ..serve.app import ServeConfig, create_app
    except ImportError:
        raise OptionError(
            "perspicio serve needs the 'serve' extra: pip install 'perspicio[serve]'"
        ) from None
    if not is_loopback(host):
        if not allow_remote:
            raise OptionError(
                f"--host {host} would expose the app beyond this machine; add --allow-remote if you mean it."
            )
        click.echo(
            f"warning: binding {host}: anyone who can reach this address can use the app "
            "(no authentication); put it behind a proxy with access control.",
            err=True,
        )
    for name, value in (("--workers", workers), ("--queue", queue_limit)):
        if value is not None and value < (1 if name == "--workers" else 0):
            raise OptionError(
                f"{name} must be {'at least 1' if name == '--workers' else 'non-negative'}; got {value}."
            )
    if not all(0 < v < math.inf for v in (time_limit, max_upload_mb, max_megapixels)):  # nan too
        raise OptionError(
            "--time-limit, --max-upload-mb and --max-megapixels must be positive finite numbers."
        )
    if not 0 <= cache_mb < math.inf:
        raise OptionError(f"--cache-mb must be a finite number >= 0 (0: off); got {cache_mb}.")
    from ..zoo.sources import check_spec

    for spec in models:  # the workers load them on first use: refuse what they never could
        check_spec(spec)
    config = ServeConfig(
        models=model_table(models),
        workers=workers,
        queue_limit=queue_limit,
        time_limit=time_limit,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=int(max_megapixels * 1e6),
        cors_origins=cors,
        cache_bytes=int(max(0.0, cache_mb) * 2**20),
        cache_entries=64 if cache_mb > 0 else 0,
        cached_models=cached_models,
    )
    app = create_app(config)
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"perspicio serve: open http://{shown}:{port}/ (API docs: /docs); "
        f"{config.workers or os.cpu_count()} worker(s) starting; Ctrl+C stops."
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
