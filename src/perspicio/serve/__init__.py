"""``perspicio serve``: a small web app (JSON API + one page) to explain and compare.

The app schedules work and draws results; the explanations and scores are perspicio's Python API
(``perspicio.explain``, ``perspicio.metrics.compare``) run in a bounded pool of worker processes.
Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart); importing this package does not
import them.

    from perspicio.serve import ServeConfig, create_app
    app = create_app(ServeConfig(workers=2))      # an ASGI app: uvicorn.run(app)
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("ServeConfig", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'perspicio.serve' has no attribute {name!r}")
