"""Clients of the inference server (``erc-distill serve``): sync :class:`ErcClient`, asyncio :class:`AsyncErcClient`.

>>> with ErcClient("http://127.0.0.1:8000") as robot:
...     robot.turn("Ross", "We were on a break!", conversation="c1")["label"]
...     with robot.stream("c2") as live:             # one WebSocket, turns answered in order
...         live.send("Rachel", "Oh my God!")["label"]
...     robot.end("c1")

A 503 (queue full) raises :class:`ServerOverloaded` carrying ``retry_after_s`` (from ``Retry-After``);
any other error answer raises :class:`ServerError` with the server's message, the field it names and
the status (an HTTP status, or a WebSocket close code: 1003, 1008, 1009). Network failures stay
``httpx`` / ``websockets`` / ``OSError`` exceptions. Needs the ``serve`` extra (httpx, websockets).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlencode

try:
    import httpx
    import websockets
    from websockets.asyncio.client import connect as _ws_connect_async
    from websockets.sync.client import connect as _ws_connect
except ImportError as err:  # pragma: no cover - the base install
    raise ImportError(f"the erc-distill client needs httpx and websockets ({err}); "
                      'install them with: pip install "erc-distill[serve]"') from err

DEFAULT_URL = "http://127.0.0.1:8000"


class ServerError(Exception):
    """The server refused a request: ``status`` (HTTP status or WebSocket close code), ``message``, ``field``."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        self.status, self.message, self.field = status, message, field
        super().__init__(f"{status}: " + (f"field {field!r}: " if field else "") + message)


class ServerOverloaded(ServerError):
    """503: the server's queue is full; try again after ``retry_after_s`` seconds (None: not said)."""

    def __init__(self, message: str, retry_after_s: float | None, field: str | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(503, message + (f" (retry after {retry_after_s:g} s)" if retry_after_s is not None else ""),
                         field)


def _retry_after(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date


def _error(status: int, body: Any, retry_after: Any = None) -> ServerError:
    message = body.get("error") if isinstance(body, dict) else None
    field = body.get("field") if isinstance(body, dict) else None
    message = str(message) if message is not None else f"HTTP {status}"
    if status == 503:
        return ServerOverloaded(message, _retry_after(retry_after), field)
    return ServerError(status, message, field)


def _answer(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; ServerError / ServerOverloaded otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:300] or response.reason_phrase}
    if response.is_success:
        return body
    raise _error(response.status_code, body, response.headers.get("retry-after"))


def _frame_answer(frame: str | bytes) -> dict[str, Any]:
    out = json.loads(frame)
    if isinstance(out, dict) and "error" in out:
        raise _error(int(out.get("status") or 400), out, out.get("retry_after_s"))
    return out


def _closed(err: websockets.ConnectionClosed) -> ServerError:
    close = err.rcvd or err.sent
    return ServerError(close.code if close else 1006, (close.reason if close else "") or "the server closed the stream")


def _ws_url(base_url: str, conversation: str) -> str:
    base = base_url.rstrip("/")
    scheme, sep, rest = base.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{scheme}{sep}{rest}/v1/stream?" + urlencode({"conversation": conversation})


def _turn(speaker: str, text: str, conversation: str | int) -> dict[str, Any]:
    return {"conversation": conversation, "speaker": speaker, "text": text}


class TurnStream:
    """One conversation over a WebSocket (from :meth:`ErcClient.stream`)."""

    def __init__(self, connection: Any, conversation: str) -> None:
        self.connection, self.conversation = connection, conversation

    def send(self, speaker: str, text: str) -> dict[str, Any]:
        """Classify the conversation's next turn; an error frame raises ServerError (the stream stays open),
        a close raises ServerError with the close code."""
        try:
            self.connection.send(json.dumps({"speaker": speaker, "text": text}))
            return _frame_answer(self.connection.recv())
        except websockets.ConnectionClosed as err:
            raise _closed(err) from None


class ErcClient:
    """Synchronous client (httpx); ``timeout`` in seconds for each request and the WebSocket handshake."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 10.0) -> None:
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def turn(self, speaker: str, text: str, conversation: str | int = "default") -> dict[str, Any]:
        """``{"conversation", "turn", "speaker", "label", "probabilities", "model_ms", "queue_ms", "batch_size",
        "latency_ms"}`` of the conversation's next turn."""
        return _answer(self._http.post("/v1/turns", json=_turn(speaker, text, conversation)))

    def end(self, conversation: str | int) -> bool:
        """Forget a conversation on the server; True if it was open."""
        return bool(_answer(self._http.delete(f"/v1/conversations/{quote(str(conversation), safe='')}"))["ended"])

    def health(self) -> dict[str, Any]:
        return _answer(self._http.get("/healthz"))

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        response = self._http.get("/metrics")
        if not response.is_success:
            _answer(response)
        return response.text

    @contextlib.contextmanager
    def stream(self, conversation: str | int) -> Iterator[TurnStream]:
        """A WebSocket for one conversation; ``send(speaker, text)`` per turn."""
        try:
            connection = _ws_connect(_ws_url(self.base_url, str(conversation)), open_timeout=self.timeout,
                                     close_timeout=self.timeout)
        except websockets.ConnectionClosed as err:
            raise _closed(err) from None
        with connection:
            yield TurnStream(connection, str(conversation))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ErcClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncTurnStream:
    """One conversation over a WebSocket (from :meth:`AsyncErcClient.stream`)."""

    def __init__(self, connection: Any, conversation: str) -> None:
        self.connection, self.conversation = connection, conversation

    async def send(self, speaker: str, text: str) -> dict[str, Any]:
        try:
            await self.connection.send(json.dumps({"speaker": speaker, "text": text}))
            return _frame_answer(await self.connection.recv())
        except websockets.ConnectionClosed as err:
            raise _closed(err) from None


class AsyncErcClient:
    """asyncio client (httpx.AsyncClient, websockets' asyncio client); the same methods as :class:`ErcClient`."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 10.0) -> None:
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def turn(self, speaker: str, text: str, conversation: str | int = "default") -> dict[str, Any]:
        return _answer(await self._http.post("/v1/turns", json=_turn(speaker, text, conversation)))

    async def end(self, conversation: str | int) -> bool:
        response = await self._http.delete(f"/v1/conversations/{quote(str(conversation), safe='')}")
        return bool(_answer(response)["ended"])

    async def health(self) -> dict[str, Any]:
        return _answer(await self._http.get("/healthz"))

    async def metrics(self) -> str:
        response = await self._http.get("/metrics")
        if not response.is_success:
            _answer(response)
        return response.text

    @contextlib.asynccontextmanager
    async def stream(self, conversation: str | int) -> AsyncIterator[AsyncTurnStream]:
        try:
            connection = await _ws_connect_async(_ws_url(self.base_url, str(conversation)),
                                                 open_timeout=self.timeout, close_timeout=self.timeout)
        except websockets.ConnectionClosed as err:
            raise _closed(err) from None
        async with connection:
            yield AsyncTurnStream(connection, str(conversation))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncErcClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
