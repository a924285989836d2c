"""``stx serve``: an HTTP service (FastAPI on uvicorn) that stylises uploaded images.

Endpoints:

* ``GET /`` — a page to try it in a browser: upload a photo, pick a model, see and download the result.
* ``GET /health`` — ``{"status": "ok", "models": [...], "optimize": bool, "style_cache": {...}}``.
* ``POST /stylize/{model}`` — multipart field ``image`` (optional query ``size``: long edge, px);
  answers the stylised image as PNG. Models are loaded once at start (:func:`stx.fast.stylize.load_model`).
* ``POST /optimize`` (with ``--optimize``) — multipart fields ``content`` and ``style`` (optional
  query ``steps`` and ``size``): stx's image optimisation with the loss, encoder and schedule
  of the main config (``stx serve --optimize loss=gatys_tv …``). The style targets are cached
  under (sha256 of the style file, encoder, style layers, style size), so a request with a style
  seen before skips the style pass; the header ``X-Style-Cache`` says ``hit`` or ``miss``.

Limits: the request body (``--max-upload-mb``, 413), pixels per image (``--max-pixels``, 413,
checked from the file header before decoding), ``steps`` and ``size`` (422); an upload sent
without ``size`` is shrunk to ``--max-size`` when larger. A body that is not an image Pillow reads
gets 400; every error body is ``{"detail": "<one paragraph>"}``. Work is bounded: ``--workers``
requests run at once in uvicorn's thread pool and ``--queue`` more wait; beyond that a request
gets 503 with ``Retry-After`` at once. ``/health`` runs on the event loop and answers while
workers are busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import io
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from omegaconf import DictConfig, OmegaConf

from stx.engine.image import MIN_SIZE, image_shape, long_edge_shape, read_image, to_pil
from stx.engine.losses import PerceptualObjective
from stx.errors import ImageError, StxError, TooManyPixelsError
from stx.fast.stylize import Model, checked_output

CACHE_ENTRIES = 64
"""Style targets kept (least recently used dropped first)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_pixels: int
    max_steps: int
    max_size: int
    workers: int = 2
    """Requests stylised or optimised at once (each holds an image's activations in memory)."""
    queue: int = 8
    """Requests that may wait for a worker; beyond ``workers + queue`` a request gets 503."""


class Admission:
    """Bounds the work in flight: at most ``workers`` requests run and ``queue`` wait; any more
    are turned away at once with 503 and ``Retry-After`` instead of piling up in memory."""

    RETRY_AFTER_S = 5

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise StxError(f"--workers {workers} / --queue {queue} are not valid: use workers >= 1 and queue >= 0.")
        self.slots = threading.Semaphore(workers)
        self.capacity = workers + queue
        self.lock = threading.Lock()
        self.admitted = self.rejected = 0

    def __enter__(self) -> None:
        with self.lock:
            if self.admitted >= self.capacity:
                self.rejected += 1
                raise HTTPException(
                    503, f"this service is busy ({self.admitted} requests running or queued, its limit); "
                         f"retry in {self.RETRY_AFTER_S} s.", headers={"Retry-After": str(self.RETRY_AFTER_S)})
            self.admitted += 1
        self.slots.acquire()

    def __exit__(self, *exc) -> None:
        self.slots.release()
        with self.lock:
            self.admitted -= 1


class StyleCache:
    """Thread-safe LRU map from a style key to each style loss's cached targets."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries, self.items = entries, OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> dict[str, Any] | None:
        with self.lock:
            found = self.items.get(key)
            if found is not None:
                self.items.move_to_end(key)
            self.hits += found is not None
            self.misses += found is None
            return found

    def put(self, key: tuple, targets: dict[str, Any]) -> None:
        with self.lock:
            self.items[key] = targets
            while len(self.items) > self.entries:
                self.items.popitem(last=False)


class CachedStyleObjective(PerceptualObjective):
    """A :class:`PerceptualObjective` whose style targets come from ``cache`` under ``key`` +
    the style size when present; ``hit`` records whether the last :meth:`set_styles` used it."""

    def __init__(self, encoder, losses, cache: StyleCache, key: tuple) -> None:
        super().__init__(encoder, losses)
        self.cache, self.key, self.hit = cache, key, False

    def set_styles(self, styles: Sequence[torch.Tensor], style_weights: Sequence[float]) -> None:
        key = (*self.key, tuple(tuple(style.shape[-2:]) for style in styles))
        style_losses = {name: loss for name, loss in self.losses.items() if loss.source == "style"}
        cached = self.cache.get(key)
        self.hit = cached is not None
        if cached is None:
            super().set_styles(styles, style_weights)
            self.cache.put(key, {name: loss.targets for name, loss in style_losses.items()})
        else:
            for name, targets in cached.items():
                style_losses[name].use_targets(targets)


class ImageOptimizer:
    """Image optimisation for the service: the loss set, encoder and schedule of ``cfg`` (the
    main config), the encoder built once and shared by all requests."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        from stx.runs.job import build, build_encoder, build_schedule

        self.cfg, self.device = cfg, device
        self.losses = lambda: {str(n): build(node, f"loss.{n}", "loss") for n, node in cfg.loss.items()}
        probe = self.losses()
        self.layers = frozenset().union(*(loss.layers for loss in probe.values()))
        self.style_layers = tuple(sorted(set().union(*(l.layers for l in probe.values() if l.source == "style"))))
        self.encoder = build_encoder(cfg.encoder, self.layers).to(device)
        self.schedule = build_schedule(cfg)
        encoder = cfg.encoder
        self.encoder_key = f"{encoder._target_}:{encoder.weights}:{encoder.pooling}:{encoder.seed}"
        self.cache = StyleCache()

    def __call__(self, content: torch.Tensor, style: torch.Tensor, style_bytes: bytes, size: int,
                 steps: int) -> tuple[torch.Tensor, bool]:
        """The optimised image (``1×3×H×W``, long edge ``size``) and whether the style cache hit."""
        from stx.engine.optim import PyramidLevel, optimise_image

        key = (hashlib.sha256(style_bytes).hexdigest(), self.encoder_key, self.style_layers)
        objective = CachedStyleObjective(self.encoder, self.losses(), self.cache, key).to(self.device)
        schedule = dataclasses.replace(self.schedule, levels=(PyramidLevel(size, steps),))
        image = optimise_image(objective, content=content.to(self.device), styles=[style.to(self.device)],
                               style_weights=[1.0], schedule=schedule)
        return image, objective.hit


def compose_optimize_config(overrides: Sequence[str]) -> DictConfig:
    """The main config (``conf/config.yaml``) with ``overrides``, as ``stx`` would compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stx.runs.schema import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    OmegaConf.resolve(cfg)
    return cfg


def read_upload(upload: UploadFile, what: str, limits: Limits, size: int,
                shrink_only: bool = False) -> tuple[torch.Tensor, bytes]:
    """The uploaded image as ``1×3×H×W`` in [0, 1] at long edge ``size`` (``shrink_only``: only
    when it is larger) and its bytes; not an image → 400, too many pixels → 413, too thin once
    resized → 400."""
    body = upload.file.read()
    with tempfile.NamedTemporaryFile(suffix=Path(upload.filename or "").suffix) as file:
        file.write(body)
        file.flush()
        try:
            height, width = image_shape(file.name)
        except TooManyPixelsError:  # its header declares more than stx reads at all
            raise HTTPException(413, f"the {what} image's header declares more pixels than this service accepts "
                                     f"({limits.max_pixels} per image): downscale it first.") from None
        except ImageError:
            raise HTTPException(400, f"the {what} file ({len(body)} bytes, {upload.filename!r}) is not an image "
                                     f"Pillow can read; send a PNG, JPEG, WebP, TIFF or other image file.") from None
        if height * width > limits.max_pixels:
            raise HTTPException(413, f"the {what} image is {width}×{height} = {height * width} pixels; this service "
                                     f"accepts at most {limits.max_pixels} pixels per image: downscale it first.")
        if shrink_only and max(height, width) <= size:
            size = max(height, width)
        resized = long_edge_shape(height, width, size)
        if min(height, width) < MIN_SIZE or min(resized) < MIN_SIZE:
            raise HTTPException(400, f"the {what} image is {width}×{height} px ({resized[1]}×{resized[0]} px at "
                                     f"the long edge {size}); both edges must be at least {MIN_SIZE} px there: "
                                     f"send a less elongated image or ask a larger size=.")
        try:
            return read_image(file.name, size), body
        except ImageError as exc:
            raise HTTPException(400, f"the {what} image could not be decoded: {exc}") from None


def png(image: torch.Tensor, **headers: str) -> Response:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png", headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (from Content-Length when
    given, else once the streamed body passes it)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = JSONResponse({"detail": f"the request body is larger than this service's limit of "
                                            f"{self.limit} bytes (--max-upload-mb): send a smaller file."}, 413)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        received, started, exceeded = 0, False, False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                exceeded = True
                raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:  # FastAPI answers any error inside a body it parses with 400: the limit's 413 instead
                if not started:
                    started = True
                    await too_large(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the result, a PNG image"},
    503: {"description": "every worker is busy and the queue is full: try again after Retry-After seconds"},
}
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stx serve</title>
<style>body{font:16px sans-serif;max-width:44em;margin:2em auto;padding:0 1em}img{max-width:100%}
#error{color:#b00}</style></head><body>
<h1>stx serve</h1>
<form id="form"><p><label>Photo <input type="file" name="image" accept="image/*" required></label></p>
<p><label>Model <select name="model">{options}</select></label>
<label>Long edge (px, optional) <input type="number" name="size" min="16"></label></p>
<p><button>Stylise</button></p></form>
<p id="error"></p><p><img id="result" alt=""></p><p><a id="download" download="stylised.png" hidden>Download</a></p>
<p><a href="/docs">API docs</a> · <a href="/openapi.json">API description</a> · <a href="/health">health</a></p>
<script>
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target), body = new FormData(), error = document.getElementById("error");
  body.append("image", form.get("image"));
  const size = form.get("size") ? "?size=" + encodeURIComponent(form.get("size")) : "";
  error.textContent = "working…";
  const answer = await fetch("/stylize/" + encodeURIComponent(form.get("model")) + size, {method: "POST", body});
  if (!answer.ok) { error.textContent = (await answer.json()).detail; return; }
  const url = URL.createObjectURL(await answer.blob());
  error.textContent = "";
  document.getElementById("result").src = url;
  const link = document.getElementById("download"); link.href = url; link.hidden = false;
});
</script></body></html>
"""
"""The page at ``/``: one form, its script inline (nothing is fetched from elsewhere)."""


def create_app(models: Mapping[str, Model], limits: Limits, device: torch.device,
               optimizer: ImageOptimizer | None = None) -> FastAPI:
    """The service's FastAPI app over the loaded ``models`` (name → model) and, when given, the
    image ``optimizer``."""
    app = FastAPIOffline(title="stx", description=__doc__.split("\n\n")[0])  # /docs, /redoc: assets served here
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    admission = Admission(limits.workers, limits.queue)

    @app.exception_handler(RequestValidationError)
    async def one_paragraph(request: Request, error: RequestValidationError) -> JSONResponse:
        """A missing or malformed field or parameter: stx's one paragraph, not FastAPI's list."""
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                             for e in error.errors())
        return JSONResponse({"detail": f"the request to {request.url.path} is not valid ({problems}); see /docs for "
                                       f"the fields and parameters it takes."}, 422)

    @app.get("/", response_class=HTMLResponse, summary="A page to try the service in a browser")
    async def page() -> str:
        """Upload a photo, pick a loaded model, see and download the result (no scripts from elsewhere)."""
        return PAGE.replace("{options}", "".join(f"<option>{html.escape(name)}</option>" for name in sorted(models)))

    @app.get("/health", summary="Whether the service is up, what it serves and how busy it is")
    async def health() -> dict[str, Any]:  # on the event loop: never waits behind the thread pool's work
        """Answers at once, even while every worker is busy: the loaded models, the device, whether
        ``/optimize`` is on, the style cache's counts, requests in flight and requests turned away."""
        cache = optimizer.cache if optimizer else None
        counts = {"hits": cache.hits, "misses": cache.misses, "entries": len(cache.items)} if cache else None
        return {"status": "ok", "models": sorted(models), "device": str(device), "optimize": optimizer is not None,
                "style_cache": counts, "in_flight": admission.admitted, "rejected": admission.rejected}

    @app.post("/stylize/{name}", response_class=Response, responses=PNG_RESPONSE,
              summary="Stylise an uploaded image with a loaded model")
    def stylize(name: str, image: UploadFile = File(..., description="the photo: PNG, JPEG or another format Pillow "
                                                                      "reads"),
                size: int | None = Query(None, ge=MIN_SIZE, le=limits.max_size,
                                         description="long edge of the result, px (default: as uploaded, at most "
                                                     "the service's --max-size)")) -> Response:
        """The result as PNG. 404: no such model; 400: not an image, or too thin; 413: too many
        pixels or bytes; 503: the queue is full (see Retry-After)."""
        model = models.get(name)
        if model is None:
            raise HTTPException(404, f"no model {name!r} is loaded; loaded models: {', '.join(sorted(models))}.")
        with admission:
            tensor, _ = read_upload(image, "uploaded", limits, size or limits.max_size, shrink_only=size is None)
            with torch.no_grad():
                try:
                    return png(checked_output(model(tensor.to(device)), tensor))
                except StxError as exc:
                    raise HTTPException(500, f"model {name!r}: {exc}") from None

    @app.post("/optimize", response_class=Response, responses=PNG_RESPONSE,
              summary="Optimise an image to a content photo and a style image (stx serve --optimize)")
    def optimize(content: UploadFile = File(..., description="the content photo"),
                 style: UploadFile = File(..., description="the style image"),
                 steps: int = Query(50, ge=0, le=limits.max_steps, description="optimisation steps"),
                 size: int = Query(256, ge=MIN_SIZE, le=limits.max_size, description="long edge, px")) -> Response:
        """The result as PNG, with ``X-Style-Cache: hit`` when the style was seen before (its
        targets are reused). 404 when the service runs without ``--optimize``."""
        if optimizer is None:
            raise HTTPException(404, "image optimisation is off on this service; start it with stx serve --optimize.")
        with admission:
            content_image, _ = read_upload(content, "content", limits, size)
            style_image, style_bytes = read_upload(style, "style", limits, optimizer.schedule.style_edge(size))
            try:
                image, hit = optimizer(content_image, style_image, style_bytes, size, steps)
            except StxError as exc:
                raise HTTPException(422, str(exc)) from None
            return png(image, **{"X-Style-Cache": "hit" if hit else "miss"})

    return app


def run(models: Mapping[str, Model], limits: Limits, device: torch.device, optimizer: ImageOptimizer | None,
        host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(models, limits, device, optimizer), host=host, port=port, log_level="info")


def command(args: argparse.Namespace) -> None:
    """``stx serve`` with its parsed arguments: load the models, then serve until stopped."""
    from stx.fast.stylize import load_model
    from stx.runs.job import resolve_device

    device = resolve_device(args.device)
    if not args.model and not args.optimize:
        raise StxError("stx serve needs something to serve: one or more --model [NAME=]MODEL, and/or --optimize.")
    if args.overrides and not args.optimize:
        raise StxError(f"the overrides {' '.join(args.overrides)} configure --optimize, which was not given.")
    models = {}
    for given in args.model:
        name, _, ref = given.rpartition("=")
        name = name or (Path(ref).name.split(".")[0] if Path(ref).exists() else ref.replace("/", "-"))
        if name in models:
            raise StxError(f"two models are named {name!r}; name them with --model NAME=MODEL.")
        models[name] = load_model(ref, args.tracking_uri, device)
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_steps, args.max_size, args.workers,
                    args.queue)
    optimizer = ImageOptimizer(compose_optimize_config(args.overrides), device) if args.optimize else None
    run(models, limits, device, optimizer, args.host, args.port)
