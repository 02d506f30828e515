"""The robot-facing inference server: HTTP and WebSocket in front of one exported bundle.

Endpoints (every error body is ``{"error": MESSAGE, "field": NAME or null}``):

- ``POST /v1/turns`` ``{"conversation": ID, "speaker": S, "text": T}`` -> ``{"conversation", "turn",
  "speaker", "label", "probabilities", "model_ms", "queue_ms", "batch_size", "latency_ms"}``.
  ``conversation`` is optional (``"default"``; a string or an integer), other keys are ignored.
  Errors: 400 (body not UTF-8, not JSON, bad Content-Length), 413 (body over ``max_body_bytes``, by
  Content-Length or by the bytes actually read), 422 (not an object, a missing or mistyped field, a
  text over ``max_text_chars``: ``field`` names it), 503 + ``Retry-After`` (queue full), 500 (the
  model failed).
  ``"end": true`` on a turn ends its conversation after answering it (the answer carries ``"ended"``).
- ``DELETE /v1/conversations/{id}`` -> ``{"conversation", "ended": BOOL}`` (whether it was open).
- ``WebSocket /v1/stream?conversation=ID``: one conversation per socket; each text frame a JSON turn
  ``{"speaker", "text"}`` answered in order by one text frame (the prediction, or an error object
  with ``"status"``: the socket stays open). A binary frame closes it with 1003, a frame over
  ``max_body_bytes`` with 1009, a missing or invalid conversation id with 1008 (with a reason). The
  conversation's state stays after the socket closes (until ``DELETE``, the LRU or the idle TTL).
- ``GET /healthz``: ok, bundle, model file, labels, live conversations, queue depth, drop counts.
- ``GET /metrics``: Prometheus text (its own registry): requests by route and status, request
  latency inside the server, model time, queue wait, batch size, queue depth, live conversations,
  conversations dropped by reason.

Turns of one conversation stay in order: "build the input from the rolling context -> queue -> wait
for the result -> commit" runs under a per-conversation lock, while different conversations share
model calls (:class:`~erc_distill.serve.batcher.MicroBatcher`). Conversation state lives in a
:class:`~erc_distill.runtime.stream.StreamingRecognizer` (its LRU and idle TTL bound it). The event
loop tokenizes; the model runs in one worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect, WebSocketState

from erc_distill.errors import BundleError, DataError
from erc_distill.runtime.bundle import Bundle, json_type
from erc_distill.runtime.stream import StreamingRecognizer
from erc_distill.serve.batcher import MicroBatcher, Overloaded
from erc_distill.serve.settings import ServeConfig

TURNS = "/v1/turns"
CONVERSATION = "/v1/conversations/{conversation:path}"
STREAM = "/v1/stream"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024)
WS_CLOSE_REASON_BYTES = 123
"""A close frame's reason is at most 123 bytes of UTF-8."""


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message, "field": field}``."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def api_error(err: BaseException) -> ApiError:
    """Any exception of a turn as the HTTP error the client gets."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, DataError):
        return ApiError(422, err.message, err.field)
    if isinstance(err, Overloaded):
        return ApiError(503, err.message, None, {"Retry-After": err.retry_after_header})
    if isinstance(err, BundleError):
        return ApiError(500, f"the model failed: {err}")
    return ApiError(500, f"internal error ({type(err).__name__}: {err})")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.message, "field": err.field}, status_code=err.status, headers=err.headers)


def parse_json(raw: bytes | str) -> Any:
    """A request body or frame as JSON; ApiError 400 when it is not UTF-8 or not JSON."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ApiError(400, f"the body is not UTF-8 ({err.reason} at byte {err.start})") from None
    raw = raw.removeprefix("\ufeff")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise ApiError(400, "not JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ApiError(400, f"not JSON ({err})") from None


def turn_fields(value: Any) -> tuple[Any, Any, Any]:
    """``(speaker, text, conversation)`` of a decoded turn object (types are checked by the recognizer)."""
    if not isinstance(value, dict):
        raise DataError(f"a turn is a JSON object with speaker and text, got {json_type(value)}")
    for key in ("speaker", "text"):
        if key not in value:
            raise DataError(f"missing {key!r} (a turn is {{\"speaker\": ..., \"text\": ...}})", field=key)
    return value["speaker"], value["text"], value.get("conversation", "default")


def wants_end(value: dict) -> bool:
    """``"end": true`` on a turn ends its conversation after answering it (as ``erc-distill stream``)."""
    end = value.get("end", False)
    if not isinstance(end, bool):
        raise DataError(f"must be true or false, got {json_type(end)}", field="end")
    return end


class _Metrics:
    def __init__(self, server: "InferenceServer") -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("erc_serve_requests", "Requests (WebSocket: frames) by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("erc_serve_request_seconds", "Round trip inside the server, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.model = Histogram("erc_serve_model_seconds", "Duration of one model call (a whole batch)",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("erc_serve_queue_wait_seconds", "A turn's wait from queue to model call",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("erc_serve_batch_size", "Turns per model call", buckets=BATCH_BUCKETS, registry=r)
        Gauge("erc_serve_queue_depth", "Turns waiting for the model", registry=r).set_function(
            lambda: server.batcher.depth)
        Gauge("erc_serve_conversations", "Live conversations (rolling contexts kept)", registry=r).set_function(
            lambda: len(server.recognizer.conversations))
        r.register(_DroppedCollector(server.recognizer))

    def on_batch(self, size: int, model_s: float) -> None:
        self.model.observe(model_s)
        self.batch_size.observe(size)


class _DroppedCollector:
    """``erc_serve_conversations_dropped_total{reason}``: the recognizer's own counts."""

    def __init__(self, recognizer: StreamingRecognizer) -> None:
        self.recognizer = recognizer

    def describe(self) -> list:
        return []

    def collect(self):
        family = CounterMetricFamily("erc_serve_conversations_dropped", "Conversations forgotten, by reason",
                                     labels=["reason"])
        for reason in ("evicted", "expired", "ended"):
            family.add_metric([reason], getattr(self.recognizer, reason))
        yield family


class _ConversationLocks:
    """One asyncio.Lock per conversation with turns in flight; removed when the last one is done."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._locks: dict[str, list] = {}

    @contextlib.asynccontextmanager
    async def hold(self, conversation: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(conversation, [asyncio.Lock(), 0])
        if entry[1] >= self.limit:
            raise Overloaded(f"{entry[1]} turns of conversation {conversation!r} are already waiting")
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[conversation]


class InferenceServer:
    """The state behind the app: bundle, recognizer, batcher, locks, metrics."""

    def __init__(self, bundle: Bundle, cfg: ServeConfig) -> None:
        self.bundle, self.cfg = bundle, cfg
        self.recognizer = StreamingRecognizer(bundle, max_text_chars=cfg.max_text_chars,
                                              max_conversations=cfg.max_conversations, idle_ttl_s=cfg.idle_ttl_s)
        self.metrics = _Metrics(self)
        self.batcher = MicroBatcher(lambda inputs: self.bundle.probabilities(inputs), cfg.max_batch, cfg.max_wait_ms,
                                    cfg.queue_size, on_batch=self.metrics.on_batch)
        self.locks = _ConversationLocks(cfg.queue_size)

    async def classify(self, speaker: Any, text: Any, conversation: Any) -> dict[str, Any]:
        """One turn through the context, the queue and the model; raises DataError, Overloaded, ..."""
        conversation = self.recognizer.check_conversation(conversation)
        async with self.locks.hold(conversation):
            pending = self.recognizer.prepare(speaker, text, conversation)
            try:
                result = await self.batcher.submit(pending.input)
            except BaseException:
                self.recognizer.cancel(pending)
                raise
            p = self.recognizer.complete(pending, result.probabilities)
        self.metrics.queue_wait.observe(result.queue_ms / 1000)
        return {"conversation": p.conversation, "turn": p.turn, "speaker": p.speaker, "label": p.label,
                "probabilities": p.probabilities, "model_ms": round(result.model_ms, 3),
                "queue_ms": round(result.queue_ms, 3), "batch_size": result.batch_size,
                "latency_ms": round(p.latency_ms, 3)}

    async def end(self, conversation: Any) -> dict[str, Any]:
        conversation = self.recognizer.check_conversation(conversation)
        async with self.locks.hold(conversation):
            return {"conversation": conversation, "ended": self.recognizer.end(conversation)}

    def health(self) -> dict[str, Any]:
        self.recognizer.expire()
        stats = self.recognizer.stats()
        return {"ok": self.batcher.alive, "bundle": str(self.bundle.folder), "model_file": self.bundle.model_file,
                "labels": list(self.bundle.labels), "conversations": stats["open"],
                "queue_depth": self.batcher.depth, "max_batch": self.cfg.max_batch, "evicted": stats["evicted"],
                "expired": stats["expired"], "ended": stats["ended"], "batches": self.batcher.batches}

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) past ``max_body_bytes`` by Content-Length or by the bytes read."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ApiError(400, f"Content-Length is not an integer: {declared[:40]!r}") from None
            if size > limit:
                raise ApiError(413, f"body of {size} bytes, over the limit of {limit} (max_body_bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"body over the limit of {limit} bytes (max_body_bytes)")
        return bytes(body)

    def warm_up(self) -> None:
        """One model call on a dummy turn, so that the first real turn does not pay for it."""
        self.bundle.probabilities([self.recognizer.builder.stream().push("warm-up", "")])


class _MetricsMiddleware:
    """Counts every HTTP request by route template and status, and times it (ASGI, no buffering)."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def create_app(bundle: str | Path | Bundle, cfg: ServeConfig | None = None) -> FastAPI:
    """The server's ASGI app for a bundle folder (loaded with ``cfg.threads`` and ``cfg.model_file``) or a
    loaded :class:`Bundle`. ``app.state.server`` is the :class:`InferenceServer`."""
    cfg = cfg or ServeConfig()
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle, threads=cfg.threads, model_file=cfg.model_file)
    server = InferenceServer(bundle, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.batcher.start()
        await asyncio.get_running_loop().run_in_executor(None, server.warm_up)
        try:
            yield
        finally:
            await server.batcher.stop()

    app = FastAPI(title="erc-distill inference server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.add_middleware(_MetricsMiddleware, metrics=server.metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(err.status_code, str(err.detail), None, dict(err.headers or {})))

    @app.exception_handler(ApiError)
    async def api_error_handler(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.post(TURNS)
    async def post_turn(request: Request) -> Response:
        try:
            value = parse_json(await server.read_body(request))
            speaker, text, conversation = turn_fields(value)
            end = wants_end(value)
            out = await server.classify(speaker, text, conversation)
            if end:
                out["ended"] = (await server.end(conversation))["ended"]
            return JSONResponse(out)
        except Exception as err:
            return error_response(api_error(err))

    @app.delete(CONVERSATION)
    async def delete_conversation(conversation: str) -> Response:
        try:
            return JSONResponse(await server.end(conversation))
        except Exception as err:
            return error_response(api_error(err))

    @app.get("/healthz")
    async def healthz() -> Response:
        health = server.health()
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        server.recognizer.expire()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.websocket(STREAM)
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        raw = ws.query_params.get("conversation")
        try:
            if not raw:
                raise DataError("missing: connect to /v1/stream?conversation=ID", field="conversation")
            conversation = server.recognizer.check_conversation(raw)
        except DataError as err:
            server.metrics.requests.labels(STREAM, "1008").inc()
            await _close(ws, 1008, f"conversation: {err.message}")
            return
        try:
            await _stream_turns(server, ws, conversation)
        except WebSocketDisconnect:
            pass

    return app


async def _stream_turns(server: InferenceServer, ws: WebSocket, conversation: str) -> None:
    limit = server.cfg.max_body_bytes
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        start = time.perf_counter()
        text = message.get("text")
        if text is None:
            server.metrics.requests.labels(STREAM, "1003").inc()
            await _close(ws, 1003, "binary frames are not accepted: send each turn as a JSON text frame")
            return
        size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            server.metrics.requests.labels(STREAM, "1009").inc()
            await _close(ws, 1009, f"frame over the limit of {limit} bytes (max_body_bytes)")
            return
        try:
            value = parse_json(text)
            speaker, turn_text, other = turn_fields(value)
            if "conversation" in value and server.recognizer.check_conversation(other) != conversation:
                raise DataError(f"this socket streams conversation {conversation!r}", field="conversation")
            end = wants_end(value)
            out, status = await server.classify(speaker, turn_text, conversation), 200
            if end:
                out["ended"] = (await server.end(conversation))["ended"]
        except Exception as err:
            error = api_error(err)
            out, status = {"error": error.message, "field": error.field, "status": error.status}, error.status
            if "Retry-After" in error.headers:
                out["retry_after_s"] = int(error.headers["Retry-After"])
        server.metrics.requests.labels(STREAM, str(status)).inc()
        server.metrics.latency.labels(STREAM).observe(time.perf_counter() - start)
        await ws.send_text(json.dumps(out))


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    if ws.application_state == WebSocketState.CONNECTED:
        await ws.close(code, reason.encode("utf-8")[:WS_CLOSE_REASON_BYTES].decode("utf-8", "ignore"))


# -- running it -------------------------------------------------------------------------------------

def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one; read it back with ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # a response written in two parts waits out the client's delayed ACK (~40 ms a request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: FastAPI, cfg: ServeConfig, **options: Any):
    """A ``uvicorn.Server`` for the app; run it with ``server.run(sockets=[bind_socket(...)])``.

    WebSocket frames up to 4x ``max_body_bytes`` reach the app (which closes with 1009 and a reason
    past ``max_body_bytes``); larger ones are cut off by the protocol layer (also 1009)."""
    import uvicorn

    settings = {"host": cfg.host, "port": cfg.port, "log_level": "warning", "access_log": False, "lifespan": "on",
                "ws_max_size": 4 * cfg.max_body_bytes + 4096, "timeout_graceful_shutdown": 5, **options}
    return uvicorn.Server(uvicorn.Config(app, **settings))
