"""The FastAPI app of ``perspicio serve``: the JSON API, the page, and the safety rules.

* Every error is a JSON body ``{"error": "<one line>"}`` with a 4xx/5xx status; tracebacks go to
  the server log only.
* Uploads: the body is counted while it is read (:class:`BodyLimit`, 413 past the limit), then
  :mod:`.uploads` sniffs the content and reads the pixel count from the header before decoding.
* No user path reaches the file system: models are ids of the server's model table (given on the
  command line at start), samples are names from :data:`perspicio.zoo.SAMPLES`, static files a
  fixed table read at start.
* CORS is off unless origins are given; the page and the API are same-origin.
* Heavy work runs in :class:`~.pool.WorkerPool`; a full queue answers 503 with ``Retry-After``.
* Identical requests are answered from a bounded per-app cache (:class:`ResultCache`).
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations, which name
# classes imported inside create_app (fastapi is an optional dependency)
import asyncio
import hashlib
import importlib.resources
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PerspicioError
from .pool import Busy, Job, WorkerPool
from .uploads import decode_upload
from .work import TRUST_METRICS, one_line

#: files the page needs, served from the package (nothing from a CDN)
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

#: the fields of /api/explain and /api/compare
IMAGE_FIELDS = ("model", "methods", "target", "layer", "sample", "file", "wait")

#: the content types of a POST body the API reads (fields of a form)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

#: methods ticked when the page opens: fast (one backward pass each), one of them signed
DEFAULT_METHODS = ("gradcam", "hirescam", "input_x_gradient")

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass
class ServeConfig:
    """Limits and models of one app.

    ``models`` maps the ids shown in the page to model specs (bundled names, ``torchvision:NAME``,
    a TorchScript file ... given on the command line, never by a client)."""

    models: dict[str, str] = field(
        default_factory=lambda: {"efficientnet_lite0": "efficientnet_lite0"}
    )
    workers: int | None = None
    queue_limit: int = 32
    time_limit: float = 120.0
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    max_methods: int = 8
    cache_entries: int = 64
    cache_bytes: int = 128 * 2**20
    cors_origins: Sequence[str] = ()
    preload: bool = True
    #: the tabular tab; its worker processes compile the TreeSHAP kernels at start, in the background
    tabular: bool = True
    #: also offer every ``torchvision:``/``timm:`` classifier whose weights are in the local caches
    #: (found when the app starts; nothing is downloaded; see :mod:`perspicio.serve.cached`)
    cached_models: bool = True
    #: the text tab (the bundled MiniLM, when transformers and its package are installed)
    text: bool = True
    #: longest text accepted, in characters (a longer one is refused; one over the model's token
    #: limit but under this is truncated with a warning shown in the page)
    max_text_chars: int = 10_000
    #: most zero-shot labels per request
    max_labels: int = 16


class ResultCache:
    """Results of identical requests: a per-app LRU bounded by entries and by bytes (JSON size).

    Kept on the app, not module-level: its lifetime is the server's, it holds JSON (no tensors,
    no models) and it is emptied with the app. An entry larger than the byte budget is not kept."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max(0, int(max_entries))
        self.max_bytes = max(0, int(max_bytes))
        self._data: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: dict[str, Any]) -> None:
        size = len(json.dumps(value))
        with self._lock:
            if self.max_entries == 0 or size > self.max_bytes:
                return
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, size)
            self._bytes += size
            while self._data and (
                len(self._data) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, (_, n) = self._data.popitem(last=False)
                self._bytes -= n

    def info(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


class JobTable:
    """Jobs the page may still follow (progress stream, cancel): the newest ``limit`` by id."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.limit:
                oldest = next(iter(self._jobs))
                if not self._jobs[oldest].terminal and len(self._jobs) <= 4 * self.limit:
                    break
                self._jobs.pop(oldest)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)


class ServeError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class BodyLimit:
    """ASGI middleware: refuse a request body past ``max_bytes`` (413) while it is read - from
    ``Content-Length`` up front, and by counting the chunks of a body sent without one."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > self.max_bytes:
                    await _send_json(
                        send,
                        413,
                        f"the request body has {value.decode(errors='replace')} bytes; "
                        f"the limit is {self.max_bytes}.",
                    )
                    return
        seen = 0
        exceeded = False
        response_started = False
        message_413 = f"the request body is over the limit of {self.max_bytes} bytes."

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            # once the body went over the limit, whatever the app answers (a form parser turns any
            # exception into 400) is replaced by the 413
            nonlocal response_started
            if exceeded:
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await _send_json(send, 413, message_413)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not response_started:
                await _send_json(send, 413, message_413)


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _static(name: str) -> bytes:
    return importlib.resources.files("perspicio.serve").joinpath("static", name).read_bytes()


def _sample_pixels(name: str) -> np.ndarray:
    from ..zoo import SAMPLES, sample

    if name not in SAMPLES:
        raise ServeError(422, f"unknown sample {name!r}; expected one of: {', '.join(SAMPLES)}.")
    return np.asarray(sample(name), dtype=np.uint8)


def create_app(config: ServeConfig | None = None, *, pool: WorkerPool | None = None) -> Any:
    """The ASGI app. Starts a :class:`WorkerPool` (unless one is given) when the app starts and
    stops it when the app stops; ``app.state.pool`` and ``app.state.cache`` expose both."""
    try:
        from fastapi import FastAPI, File, Form, Request, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PerspicioError(
            "perspicio serve needs the 'serve' extra: pip install 'perspicio[serve]'"
        ) from exc
    from contextlib import asynccontextmanager
    from typing import Annotated

    FormStr = Annotated[str | None, Form()]
    FormBool = Annotated[bool, Form()]
    FormFile = Annotated[UploadFile | None, File()]

    from .. import __version__

    cfg = config or ServeConfig()
    cache = ResultCache(cfg.cache_entries, cfg.cache_bytes)
    jobs = JobTable()
    statics = {name: _static(name) for name in STATIC_FILES}
    index_html = _static("index.html")
    docs_html = _static("docs.html")
    own_pool = pool is None
    #: model id -> spec: the configured models, then (at start) the cached torchvision/timm ones
    table: dict[str, str] = dict(cfg.models)
    cached_descriptions: dict[str, str] = {}

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        if app.state.pool is None:
            if cfg.cached_models:
                from .cached import cached_models

                found = await asyncio.to_thread(cached_models)
                for key, description in found.items():
                    if key not in table:
                        table[key] = key
                        cached_descriptions[key] = description
            preload = list(table)[:1] if cfg.preload else []
            app.state.pool = await asyncio.to_thread(
                WorkerPool,
                table,
                workers=cfg.workers,
                queue_limit=cfg.queue_limit,
                time_limit=cfg.time_limit,
                preload=preload,
                warm_tree=cfg.tabular and bool(tabular_models()),
            )
        try:
            yield
        finally:
            if own_pool and app.state.pool is not None:
                await asyncio.to_thread(app.state.pool.close)
                app.state.pool = None

    app = FastAPI(
        title="perspicio",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Explain image classifiers (and the bundled tabular and text models) and "
        "score the explanations. Every error is "
        '`{"error": "<one line>"}`.',
    )
    app.state.pool = pool
    app.state.cache = cache
    app.state.config = cfg
    app.state.jobs = jobs

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
        )
    # the multipart overhead of a form is small; the file itself is checked again exactly
    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes + 64 * 1024)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Any:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(PerspicioError)
    async def _perspicio_error(request: Request, exc: PerspicioError) -> Any:
        return error(getattr(exc, "status", 422), one_line(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> Any:
        import traceback

        traceback.print_exc()
        return error(500, f"internal error ({type(exc).__name__}); see the server log.")

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    # ------------------------------------------------------------------ helpers

    def the_pool() -> WorkerPool:
        p = app.state.pool
        if p is None:
            raise ServeError(503, "the worker pool is not running.", {"Retry-After": "5"})
        return p

    async def check_form(request: Request, allowed: Sequence[str]) -> None:
        """A POST body is a form (a JSON or text body would be read as no fields at all), and every
        field is one the endpoint takes: a misspelt field (``targte``) is refused, not ignored."""
        from ..errors import suggest

        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in FORM_TYPES:
            raise ServeError(
                415,
                f"send the fields as a form ({' or '.join(FORM_TYPES)}), not {ctype}.",
            )
        form = await request.form()
        unknown = sorted(set(form.keys()) - set(allowed))
        if unknown:
            raise ServeError(
                422,
                f"unknown field {unknown[0]!r}; this endpoint takes: {', '.join(allowed)}."
                + suggest(unknown[0], list(allowed)),
            )

    def check_model(model: str) -> str:
        if model not in table:
            from ..errors import suggest

            raise ServeError(
                422,
                f"unknown model {model!r}; this server has: {', '.join(table)}."
                + suggest(model, list(table)),
            )
        return model

    def check_methods(methods: str) -> list[str]:
        from ..core.registry import METHODS

        names = [m.strip() for m in (methods or "").split(",") if m.strip()]
        if not names:
            raise ServeError(422, "choose at least one method.")
        out = []
        for n in names:
            entry = METHODS.get(n)  # UnknownNameError -> 422 with suggestions
            if entry.extra.get("needs"):
                raise ServeError(
                    422,
                    f"method {entry.name!r} needs a {entry.extra['needs']}, not an image classifier.",
                )
            out.append(entry.name)
        out = list(dict.fromkeys(out))
        if len(out) > cfg.max_methods:
            raise ServeError(422, f"at most {cfg.max_methods} methods per request; got {len(out)}.")
        return out

    async def read_image(file: UploadFile | None, sample: str | None) -> tuple[np.ndarray, str]:
        if (file is None) == (not sample):
            raise ServeError(
                422, "send either an image file (field 'file') or a sample name (field 'sample')."
            )
        if sample:
            return await asyncio.to_thread(_sample_pixels, sample), sample
        data = await file.read(cfg.max_upload_bytes + 1)
        pixels = await asyncio.to_thread(
            decode_upload, data, max_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_pixels
        )
        return pixels, "YOUR_IMAGE.png"

    def key_of(kind: str, pixels: np.ndarray | None, **parts: Any) -> str:
        h = hashlib.sha256(kind.encode())
        if pixels is not None:
            h.update(str(pixels.shape).encode())
            h.update(pixels.tobytes())
        h.update(json.dumps(parts, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def submit(kind: str, payload: dict[str, Any], time_limit: float | None = None) -> Job:
        try:
            job = the_pool().submit(kind, payload, time_limit=time_limit)
        except Busy as exc:
            raise ServeError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        jobs.add(job)
        return job

    async def finished(job: Job) -> Job:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] in ("result", "error"):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        job.subscribe(on_event)
        try:
            if not job.terminal:
                await fut
        finally:
            job.unsubscribe(on_event)
        return job

    async def run(kind: str, payload: dict[str, Any], key: str, wait: bool = True) -> Any:
        cached = cache.get(key)
        if cached is not None:
            return (
                JSONResponse({**cached, "cached": True})
                if wait
                else JSONResponse({"job": None, "cached": True, "result": cached})
            )
        job = submit(kind, payload)

        def store(event: dict[str, Any]) -> None:
            if event["type"] == "result" and job.result is not None:
                cache.put(key, job.result)

        job.subscribe(store)
        if not wait:
            return JSONResponse(
                {"job": job.id, "events": f"/api/jobs/{job.id}/events"}, status_code=202
            )
        await finished(job)
        if job.state != "done":
            raise ServeError(job.status, job.message)
        return JSONResponse({**job.result, "cached": False})

    async def compute(kind: str, payload: dict[str, Any], key: str) -> dict[str, Any]:
        """A job's result (from the cache when an identical request was answered), waiting for it."""
        cached = cache.get(key)
        if cached is not None:
            return cached
        job = submit(kind, payload)
        await finished(job)
        if job.state != "done" or job.result is None:
            raise ServeError(job.status, job.message)
        cache.put(key, job.result)
        return job.result

    # ------------------------------------------------------------------ page

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return HTMLResponse(index_html)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return HTMLResponse(docs_html)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Any:
        if name not in statics:
            raise ServeError(404, "not found.")
        return Response(
            statics[name], media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"}
        )

    @app.get("/api/samples/{name}.png", summary="A bundled sample photo as PNG (thumbnail)")
    async def sample_png(name: str) -> Any:
        import io

        from PIL import Image

        pixels = await asyncio.to_thread(_sample_pixels, name)
        img = Image.fromarray(pixels)
        img.thumbnail((256, 256))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return Response(
            buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"}
        )

    # ------------------------------------------------------------------ API

    @app.get("/api/models", summary="Models this server explains, and the bundled samples")
    async def models() -> Any:
        from ..zoo import SAMPLE_DESCRIPTIONS, SAMPLES
        from ..zoo import models as bundled

        desc = bundled()
        return {
            "models": [
                {
                    "id": k,
                    "description": cached_descriptions.get(k)
                    or desc.get(v, "TorchScript file given at start" if k != v else f"model {v}"),
                    "cached": k in cached_descriptions,
                    "default": i == 0,
                }
                for i, (k, v) in enumerate(table.items())
            ],
            "samples": [
                {"name": s, "description": SAMPLE_DESCRIPTIONS.get(s, "")} for s in SAMPLES
            ],
            "limits": {
                "max_upload_bytes": cfg.max_upload_bytes,
                "max_pixels": cfg.max_pixels,
                "max_methods": cfg.max_methods,
                "time_limit": cfg.time_limit,
            },
        }

    @app.get("/api/methods", summary="Registered explanation methods grouped by family")
    async def methods() -> Any:
        from ..core.registry import METHODS

        families: dict[str, list[dict[str, Any]]] = {}
        for e in METHODS.entries():
            if e.extra.get("needs"):
                continue  # tree / linear model explainers: not for image classifiers
            families.setdefault(e.family, []).append(
                {
                    "name": e.name,
                    "summary": e.summary,
                    "needs_gradients": e.needs_gradients,
                    "needs_layer": e.needs_layer,
                    "paper": e.paper,
                }
            )
        return {
            "families": [{"family": f, "methods": ms} for f, ms in families.items()],
            "default": list(DEFAULT_METHODS),
            "metrics": list(TRUST_METRICS),
        }

    @app.get(
        "/api/layers",
        summary="Layers of a model with a spatial output; the default CAM layer marked",
    )
    async def layers(model: str = "efficientnet_lite0") -> Any:
        check_model(model)
        return await run("layers", {"model": model}, key_of("layers", None, model=model))

    @app.get("/api/labels", summary="Class names of a model, in output order")
    async def labels(model: str = "efficientnet_lite0") -> Any:
        check_model(model)
        return await run("labels", {"model": model}, key_of("labels", None, model=model))

    @app.post("/api/predict", summary="Top-5 classes with probabilities")
    async def predict(
        request: Request,
        model: FormStr = "efficientnet_lite0",
        sample: FormStr = None,
        file: FormFile = None,
    ) -> Any:
        await check_form(request, ("model", "sample", "file"))
        check_model(model)
        pixels, label = await read_image(file, sample)
        return await run(
            "predict", {"model": model, "pixels": pixels}, key_of("predict", pixels, model=model)
        )

    async def image_methods_job(
        kind: str,
        model: str,
        methods: str | None,
        target: str | None,
        layer: str | None,
        sample: str | None,
        file: UploadFile | None,
        wait: bool,
        extra: dict[str, Any],
    ) -> Any:
        """Checks and runs an ``explain`` or ``compare`` request: model, methods, then the image;
        blank target and layer mean none. ``extra`` joins the payload (not the cache key)."""
        check_model(model)
        names = check_methods(methods)
        pixels, label = await read_image(file, sample)
        tgt = target.strip() if target and target.strip() else None
        lay = layer.strip() if layer and layer.strip() else None
        payload = {
            "model": model,
            "pixels": pixels,
            "methods": names,
            "target": tgt,
            "layer": lay,
            **extra,
            "image_label": label,
        }
        return await run(
            kind,
            payload,
            key_of(kind, pixels, model=model, methods=names, target=tgt, layer=lay, label=label),
            wait,
        )

    @app.post("/api/explain", summary="Explain the image with one or more methods")
    async def explain(
        request: Request,
        model: FormStr = "efficientnet_lite0",
        methods: FormStr = None,
        target: FormStr = None,
        layer: FormStr = None,
        sample: FormStr = None,
        file: FormFile = None,
        wait: FormBool = True,
    ) -> Any:
        """Returns the display image, per method a coloured map (PNG), its raw channel-summed values
        (base64 float32, row-major), its legend, and the CLI line reproducing the view. With
        ``wait=false``: 202 and a job id whose progress streams at ``/api/jobs/{id}/events``."""
        await check_form(request, IMAGE_FIELDS)
        return await image_methods_job(
            "explain", model, methods, target, layer, sample, file, wait, {}
        )

    @app.post(
        "/api/compare",
        summary="Score the methods with cheap faithfulness metrics, ranked as `perspicio compare`",
    )
    async def compare(
        request: Request,
        model: FormStr = "efficientnet_lite0",
        methods: FormStr = None,
        target: FormStr = None,
        layer: FormStr = None,
        sample: FormStr = None,
        file: FormFile = None,
        wait: FormBool = True,
    ) -> Any:
        await check_form(request, IMAGE_FIELDS)
        return await image_methods_job(
            "compare",
            model,
            methods,
            target,
            layer,
            sample,
            file,
            wait,
            {"metrics": list(TRUST_METRICS)},
        )

    def the_job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise ServeError(404, "no such job (finished long ago, or never submitted).")
        return job

    @app.get("/api/jobs/{job_id}", summary="State of a job; its result once done")
    async def job_state(job_id: str) -> Any:
        job = the_job(job_id)
        if job.state == "done":
            return {"state": "done", "result": job.result}
        if job.terminal:
            return error(job.status, job.message)
        return {"state": job.state, "events": job.events[-1:]}

    @app.get(
        "/api/jobs/{job_id}/events",
        summary="Progress of a job as server-sent events; ends with its result",
    )
    async def job_events(job_id: str) -> Any:
        job = the_job(job_id)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def listener(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(q.put_nowait, event)

        past = job.subscribe(listener)

        async def stream() -> Any:
            try:
                for event in past:
                    yield _sse(job, event)
                    if event["type"] in ("result", "error"):
                        return
                while True:
                    try:
                        event = await asyncio.wait_for(q.get(), timeout=15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield _sse(job, event)
                    if event["type"] in ("result", "error"):
                        return
            finally:
                job.unsubscribe(listener)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.delete(
        "/api/jobs/{job_id}", summary="Cancel a job (its worker is replaced if it is running)"
    )
    async def cancel(job_id: str) -> Any:
        job = the_job(job_id)
        if not job.terminal:
            the_pool().cancel(job)
        return {"job": job.id, "state": "cancelling" if not job.terminal else job.state}

    # ------------------------------------------------------------------ tabular tab

    def check_tabular(model: str) -> str:
        from ..errors import suggest

        models = tabular_models()
        if model not in models:
            raise ServeError(
                422,
                f"unknown tabular model {model!r}; this server has: {', '.join(models) or 'none'}."
                + suggest(model, models),
            )
        return model

    def tabular_models() -> list[str]:
        from .tabular import available_models

        return available_models() if cfg.tabular else []

    @app.get(
        "/api/tabular/models",
        summary="The bundled tabular models, and whether the TreeSHAP kernels are compiled",
    )
    async def tabular_models_api() -> Any:
        """``tree_kernels.state`` is the state in one worker: ``compiling``, ``ready`` or
        ``failed`` (each worker compiles its own copy at start)."""
        from .tabular import DESCRIPTIONS, TABULAR_MODELS

        ids = tabular_models()
        kernels: dict[str, Any] = {"state": "unavailable"}
        if ids:
            job = submit("tabular_status", {})
            await finished(job)
            if job.state == "done" and job.result is not None:
                kernels = job.result["tree_kernels"]
        return {
            "models": [
                {
                    "id": k,
                    "description": DESCRIPTIONS[k],
                    "method": TABULAR_MODELS[k][2],
                    "default": i == 0,
                }
                for i, k in enumerate(ids)
            ],
            "tree_kernels": kernels,
        }

    @app.get("/api/tabular/rows", summary="The test rows of a tabular model, with their labels")
    async def tabular_rows(model: str = "breast_cancer_xgb") -> Any:
        check_tabular(model)
        return await run("tabular_rows", {"model": model}, key_of("tabular_rows", None, m=model))

    @app.post("/api/tabular/explain", summary="One test row: prediction, attributions and plots")
    async def tabular_explain(
        request: Request,
        model: FormStr = "breast_cancer_xgb",
        row: FormStr = None,
        wait: FormBool = True,
    ) -> Any:
        """The row's class probabilities, every feature's value and attribution, the waterfall,
        force and global beeswarm plots (base64 PNG) and the CLI line. Tree models use
        ``tree_shap``: a request made while a worker still compiles its kernels waits for them
        (progress events say so); the MLP uses ``deeplift``. With ``wait=false``: 202 and a job."""
        await check_form(request, ("model", "row", "wait"))
        check_tabular(model)
        text = (row or "").strip()
        if not text.lstrip("-").isdigit():
            raise ServeError(422, f"row must be a whole number (a test-row index); got {row!r}.")
        payload = {"model": model, "row": int(text)}
        return await run(
            "tabular_explain", payload, key_of("tabular_explain", None, **payload), wait
        )

    # ------------------------------------------------------------------ text tab

    def text_model_ids() -> list[str]:
        from .text import available_models

        return available_models() if cfg.text else []

    def check_text_model(model: str) -> str:
        from ..errors import suggest

        ids = text_model_ids()
        if model not in ids:
            raise ServeError(
                422,
                f"unknown text model {model!r}; this server has: {', '.join(ids) or 'none'}."
                + suggest(model, ids),
            )
        return model

    def check_text(text: str | None) -> str:
        value = (text or "").strip()
        if not value:
            raise ServeError(422, "the text is empty: type a sentence to explain.")
        if len(value) > cfg.max_text_chars:
            raise ServeError(
                422,
                f"the text has {len(value)} characters; the limit is {cfg.max_text_chars}.",
            )
        return value

    def check_text_methods(methods: str | None, model: str) -> list[str]:
        from ..core.registry import METHODS
        from .text import text_methods

        names = [m.strip() for m in (methods or "").split(",") if m.strip()]
        if not names:
            raise ServeError(422, "choose at least one method.")
        allowed = [e.name for e in text_methods(model)]
        out = []
        for n in names:
            entry = METHODS.get(n)  # UnknownNameError -> 422 with suggestions
            if entry.name not in allowed:
                why = (
                    f"it acts only at rectifiers (ReLU) and {model} runs none"
                    if getattr(entry.cls, "needs_rectifiers", False)
                    else "it does not take text"
                )
                raise ServeError(
                    422,
                    f"method {entry.name!r} cannot explain {model} ({why}); methods for it: "
                    f"{', '.join(allowed)}.",
                )
            out.append(entry.name)
        out = list(dict.fromkeys(out))
        if len(out) > cfg.max_methods:
            raise ServeError(422, f"at most {cfg.max_methods} methods per request; got {len(out)}.")
        return out

    @app.get(
        "/api/text/models",
        summary="The bundled text models and the registered methods that take text",
    )
    async def text_models_api() -> Any:
        """``families``: the methods :func:`perspicio.text.explain_text` accepts, grouped by family
        (read from the text entry point, so new ones appear by themselves)."""
        from .text import DEFAULT_TEXT_METHODS, MAX_VIEW_TOKENS, TEXT_MODELS, text_methods

        ids = text_model_ids()
        entries = await asyncio.to_thread(text_methods, ids[0]) if ids else []
        families: dict[str, list[dict[str, Any]]] = {}
        for e in entries:
            families.setdefault(e.family, []).append(
                {"name": e.name, "summary": e.summary, "paper": e.paper}
            )
        names = {e.name for e in entries}
        return {
            "models": [
                {
                    "id": k,
                    "description": TEXT_MODELS[k][0],
                    "max_tokens": TEXT_MODELS[k][1],
                    "default": i == 0,
                }
                for i, k in enumerate(ids)
            ],
            "families": [{"family": f, "methods": ms} for f, ms in families.items()],
            "default": [m for m in DEFAULT_TEXT_METHODS if m in names],
            "limits": {
                "max_text_chars": cfg.max_text_chars,
                "max_labels": cfg.max_labels,
                "max_methods": cfg.max_methods,
                "max_view_tokens": MAX_VIEW_TOKENS,
            },
        }

    @app.post("/api/text/explain", summary="Explain a sentence: token heatmaps, attention views")
    async def text_explain(
        request: Request,
        model: FormStr = "minilm",
        text: FormStr = None,
        methods: FormStr = None,
        target: FormStr = None,
        labels: FormStr = None,
        merge_words: FormBool = False,
        wait: FormBool = True,
    ) -> Any:
        """``target``: another sentence (the cosine similarity of the embeddings is explained) or
        ``labels``: zero-shot label sentences separated by '|' or new lines (the most similar one
        is explained). Per method: tokens, raw values, display values and colours, the heatmap as
        PNG (base64) and HTML; the similarities; the attention matrices (PNG) when an attention
        method is chosen; the truncation warning of a text over the model's limit; the CLI line.
        With ``wait=false``: 202 and a job whose progress streams at ``/api/jobs/{id}/events``."""
        from .text import split_labels

        await check_form(
            request, ("model", "text", "methods", "target", "labels", "merge_words", "wait")
        )
        check_text_model(model)
        value = check_text(text)
        names = check_text_methods(methods, model)
        sentence = (target or "").strip() or None
        label_list = split_labels(labels)
        if sentence and label_list:
            raise ServeError(422, "give either a target sentence or zero-shot labels, not both.")
        if not sentence and not label_list:
            raise ServeError(
                422, "give a target: another sentence (target) or zero-shot labels (labels)."
            )
        if label_list and len(label_list) < 2:
            raise ServeError(
                422, "give at least two zero-shot labels, separated by '|' or new lines."
            )
        if len(label_list) > cfg.max_labels:
            raise ServeError(
                422, f"at most {cfg.max_labels} zero-shot labels; got {len(label_list)}."
            )
        if sentence and len(sentence) > cfg.max_text_chars:
            raise ServeError(422, f"the target sentence is over {cfg.max_text_chars} characters.")
        payload = {
            "model": model,
            "text": value,
            "methods": names,
            "sentence": sentence,
            "labels": label_list,
            "merge_words": bool(merge_words),
        }
        return await run("text_explain", payload, key_of("text_explain", None, **payload), wait)

    @app.get(
        "/api/text/lines",
        summary="The lines view of a text's attention: a self-contained HTML page",
    )
    async def text_lines(model: str = "minilm", text: str = "") -> Any:
        """Served with its own Content-Security-Policy: the page's inline script and style allowed
        by hash, nothing else, sandboxed; only the app's page may frame it."""
        from .text import lines_csp

        check_text_model(model)
        value = check_text(text)
        payload = {"model": model, "text": value}
        result = await compute("text_lines", payload, key_of("text_lines", None, **payload))
        document = result["html"]
        return HTMLResponse(
            document,
            headers={"Content-Security-Policy": lines_csp(document), "Cache-Control": "no-cache"},
        )

    @app.get("/api/status", summary="Queue, workers and cache")
    async def status() -> Any:
        p = app.state.pool
        return {
            "workers": p.workers if p else 0,
            "running": p.busy() if p else 0,
            "queued": p.pending() if p else 0,
            "queue_limit": cfg.queue_limit,
            "cache": cache.info(),
            "time_limit": cfg.time_limit,
        }

    return app


def _sse(job: Job, event: dict[str, Any]) -> str:
    if event["type"] == "result":
        data = {"type": "result", "result": job.result}
    else:
        data = event
    return f"event: {event['type']}\ndata: {json.dumps(data)}\n\n"
