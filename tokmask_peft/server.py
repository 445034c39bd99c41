"""The HTTP face of ``tokmask serve``: a Starlette app over an :class:`~tokmask_peft.serving.AdapterPool`.

Routes follow text-embeddings-inference's classifier conventions so its clients fit: ``POST /predict``
takes ``{"inputs": "…" | ["…", …], "raw_scores": false, "truncate": false}`` (plus ``"adapter"``:
a name or a masking rate) and answers ``[{"label", "score"}, …]`` per input, best first; errors are
``{"error", "error_type"}``; a key, when set, is required as ``Authorization: Bearer …`` on every
route but ``/health``. ``GET /adapters`` lists what is served, ``GET /metrics`` is Prometheus text.
A client gets ``read_timeout`` seconds to send a request's headers and as long again for its body; past
that its connection is closed (headers) or answered 408 (body), so idle sockets cannot pile up.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .serving import AdapterPool, Batcher, RequestError, prepare, scored, token_length

ROUTES = ("/predict", "/adapters", "/health", "/metrics")
OPEN_ROUTES = ("/health",)
"""Routes the bearer key does not guard: a load balancer's health check carries no key."""


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status_code=status)


class Telemetry:
    """Prometheus series of one app (its own registry, so two apps in one process never collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("tokmask_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("tokmask_predict_seconds", "time to answer POST /predict", registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("tokmask_batch_texts", "texts per forward pass", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.texts = Counter("tokmask_predicted_texts", "texts predicted, by adapter", ["adapter"],
                             registry=self.registry)
        stages = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
        self.queue = Histogram("tokmask_queue_seconds", "time a request waited for its batch, by adapter", ["adapter"],
                               registry=self.registry, buckets=stages)
        self.tokenize = Histogram("tokmask_tokenize_seconds", "time to tokenise a request, by adapter", ["adapter"],
                                  registry=self.registry, buckets=stages)
        self.inference = Histogram("tokmask_inference_seconds", "time of one forward pass, by adapter", ["adapter"],
                                   registry=self.registry, buckets=stages)
        self.refused = Counter("tokmask_overloaded", "requests refused with 429 (--max-concurrent-requests)",
                               registry=self.registry)


class Guard:
    """ASGI middleware: the bearer key (when set) on every route but /health, and request counts."""

    def __init__(self, app, api_key: str | None, telemetry: Telemetry):
        self.app, self.api_key, self.telemetry = app, api_key, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if self.api_key and scope["path"] not in OPEN_ROUTES and not self._authorised(scope):
            await error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        "Unauthorized")(scope, receive, counted)
        else:
            await self.app(scope, receive, counted)
        self.telemetry.requests.labels(route, str(status.get("code", 500))).inc()

    def _authorised(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused past ``limit`` bytes without reading the rest, or when it takes over ``timeout`` s."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} (--max-body-bytes)")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, f"request body is over the limit of {limit} bytes (--max-body-bytes)")
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s (--read-timeout)",
                           "Timeout") from None
    return bytes(body)


def header_deadline_protocol(timeout: float):
    """uvicorn's h11 protocol with a deadline on request headers, which uvicorn lacks: a connection that
    opens, or starts a next request, and has not sent whole headers ``timeout`` s later is closed.
    Relies on uvicorn's ``H11Protocol`` hooks ``connection_made`` / ``data_received`` and its ``cycle``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.deadline is None and (self.cycle is None or self.cycle.response_complete):
                self.arm()  # bytes of a next request on a kept-alive connection

        def arm(self) -> None:
            waiting_after = self.cycle
            self.deadline = self.loop.call_later(timeout, self.expire, waiting_after)

        def expire(self, waiting_after) -> None:
            self.deadline = None
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()  # no request began since the deadline was set

        def connection_lost(self, exc):
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadline


def check_api_key(key: str | None) -> str | None:
    """The key a server asks for, or None (open). An empty key would turn authentication off without a
    word, and a non-ASCII one could never match (HTTP headers carry ASCII): both are refused."""
    if key is None:
        return None
    if not key.strip():
        raise ValueError("the API key is empty: give a key, or none to serve without one (on loopback only)")
    if not key.isascii() or not key.isprintable():
        raise ValueError("the API key must be printable ASCII: HTTP headers carry nothing else")
    return key


def parse_predict(body: bytes, max_inputs: int, paired=False) -> tuple[dict, list, bool]:
    """(payload, inputs, whether ``inputs`` was a single one), or a RequestError saying what is wrong.
    ``paired``: whether the requested adapter takes sentence pairs (or a function of the payload saying so);
    then ``["a", "b"]`` is one pair and ``[["a", "b"], …]`` a batch of them, as in text-embeddings-inference."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}", "Malformed") from None
    except RecursionError:
        raise RequestError(400, "request body is JSON nested too deeply", "Malformed") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise RequestError(422, 'the body must be a JSON object with "inputs": a string or a list of strings')
    paired = paired(payload) if callable(paired) else paired
    inputs = payload["inputs"]
    single = isinstance(inputs, str) or (paired and _is_pair(inputs))
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not texts:
        raise RequestError(422, '"inputs" must be a string or a non-empty list of strings')
    if not paired:  # TEI's [["…"], …] batch form
        texts = [t[0] if isinstance(t, list) and len(t) == 1 else t for t in texts]
    texts = [check_input(i, text, paired) for i, text in enumerate(texts)]
    if len(texts) > max_inputs:
        raise RequestError(413, f"{len(texts)} inputs in one request; the limit is {max_inputs} (--max-inputs)")
    for flag in ("raw_scores", "truncate"):
        if not isinstance(payload.get(flag, False), bool):
            raise RequestError(422, f'"{flag}" must be true or false')
    return payload, texts, single


def _is_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(t, str) for t in value)


def check_input(i: int, value, paired: bool):
    """One input as the model takes it (a string, or a pair as a tuple), or a 422 naming it."""
    if paired != _is_pair(value) or not (paired or isinstance(value, str)):
        what = json.dumps(value)[:80]
        raise RequestError(422, f"inputs[{i}] is {what}: this adapter takes sentence pairs, each [\"text\", "
                           "\"text\"]" if paired else f"inputs[{i}] is {what}: each input must be one string (this "
                           "adapter was trained on single texts, not pairs)")
    for text in value if paired else [value]:
        if not text.strip():
            raise RequestError(422, f"inputs[{i}] is empty", "Empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(422, f"inputs[{i}] is not valid Unicode (a lone surrogate such as \\ud800)") from None
    return tuple(value) if paired else value


def predict_route(pool: AdapterPool, batcher: Batcher, telemetry: Telemetry, limits: dict):
    """The POST /predict handler: validate, refuse before the model, batch, answer in TEI's shape.
    ``limits``: max_inputs, max_body_bytes, read_timeout, max_concurrent_requests."""
    in_flight = {"n": 0}

    async def predict(request: Request) -> Response:
        if limits["max_concurrent_requests"] and in_flight["n"] >= limits["max_concurrent_requests"]:
            telemetry.refused.inc()
            return error(429, f"{in_flight['n']} requests in flight, the limit (--max-concurrent-requests); "
                         "retry later", "Overloaded")
        in_flight["n"] += 1
        try:
            return await answer(request)
        finally:
            in_flight["n"] -= 1

    async def answer(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = await read_body(request, limits["max_body_bytes"], limits["read_timeout"])
            payload, texts, single = parse_predict(body, limits["max_inputs"],
                                                   lambda p: pool.resolve(p.get("adapter")).paired)
            served = pool.resolve(payload.get("adapter"))
            items, cut = await run_in_threadpool(prepare, served, texts)  # seconds for a long text: off the loop
            telemetry.tokenize.labels(served.name).observe(time.perf_counter() - started)
            if cut and not payload.get("truncate", False):
                limit = served.config["max_length"]
                raise RequestError(413, f"inputs {cut} are longer than the model's max_length ({limit} tokens); "
                                   'send "truncate": true to have them cut')
            rows = await batcher.submit(served.name, items)
        except RequestError as e:
            return error(e.status, str(e), e.kind)
        except Exception as e:  # the model failed: say so, keep serving
            return error(500, f"{type(e).__name__}: {e}", "Backend")
        raw = payload.get("raw_scores", False)
        results = [scored(row, text, served, raw) for row, text in zip(rows, texts)]
        telemetry.texts.labels(served.name).inc(len(texts))
        telemetry.latency.observe(time.perf_counter() - started)
        headers = {"x-tokmask-adapter": served.name}
        if cut:
            headers["x-tokmask-truncated"] = ",".join(map(str, cut))
        return JSONResponse(results[0] if single else results, headers=headers)

    return predict


def create_app(pool: AdapterPool, max_batch: int = 32, max_wait_ms: float = 0.0, max_inputs: int = 64,
               max_body_bytes: int = 1 << 20, api_key: str | None = None, read_timeout: float = 10.0,
               max_batch_tokens: int | None = None, max_concurrent_requests: int | None = None):
    """The ASGI app; uvicorn runs it (``tokmask serve``), tests may too. ``max_batch_tokens`` caps the padded
    tokens of a forward pass; past ``max_concurrent_requests`` requests in flight, /predict answers 429."""
    api_key = check_api_key(api_key)
    for name, value in (("max_batch", max_batch), ("max_inputs", max_inputs), ("max_body_bytes", max_body_bytes),
                        ("max_batch_tokens", max_batch_tokens or 1),
                        ("max_concurrent_requests", max_concurrent_requests or 1)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if not max_wait_ms >= 0:
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
    if not 0 < read_timeout < float("inf"):
        raise ValueError(f"read_timeout must be a number of seconds > 0, got {read_timeout!r}")
    telemetry = Telemetry()
    batcher = Batcher(lambda name, items: pool.predict(pool.served[name], items), max_batch, max_wait_ms / 1000,
                      on_batch=telemetry.batch.observe, max_batch_tokens=max_batch_tokens, length=token_length,
                      on_wait=lambda name, s: telemetry.queue.labels(name).observe(s),
                      on_forward=lambda name, s: telemetry.inference.labels(name).observe(s))
    limits = {"max_inputs": max_inputs, "max_body_bytes": max_body_bytes, "read_timeout": read_timeout,
              "max_concurrent_requests": max_concurrent_requests}
    predict = predict_route(pool, batcher, telemetry, limits)

    async def adapters(request: Request) -> Response:
        listing = [{**s.describe(), "base": pool.classifiers.index(s.classifier), "default": name == pool.default}
                   for name, s in pool.served.items()]
        return JSONResponse({"default": pool.default, "adapters": listing})

    async def health(request: Request) -> Response:
        if not batcher.alive:
            return error(503, "the prediction worker has stopped", "Unhealthy")
        return JSONResponse({"status": "ok", "adapters": len(pool.served)})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    async def http_error(request: Request, e: HTTPException) -> Response:  # the router's 404 / 405, as JSON
        return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                     {404: "NotFound", 405: "MethodNotAllowed"}.get(e.status_code, "Http"))

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/adapters", adapters),
                            Route("/health", health), Route("/metrics", metrics)], lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})
    return Guard(app, api_key, telemetry)
