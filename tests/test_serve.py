"""The inference server, for real: uvicorn on a free loopback port in front of a tiny exported bundle.

Predictions equal the offline recognizer's; turns of one conversation stay in order under concurrency
while different conversations share model calls; bad input gets a JSON error and the server goes on;
state is bounded; a full queue answers 503 + Retry-After; /metrics is Prometheus text; the clients work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("websockets")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from erc_distill.cli import main  # noqa: E402
from erc_distill.client import AsyncErcClient, ErcClient, ServerError, ServerOverloaded  # noqa: E402
from erc_distill.data import load_corpus  # noqa: E402
from erc_distill.data.corpora import CORPORA  # noqa: E402
from erc_distill.errors import ConfigError, DataError  # noqa: E402
from erc_distill.runtime import Bundle, StreamingRecognizer  # noqa: E402
from erc_distill.serve.app import bind_socket, create_app, uvicorn_server  # noqa: E402
from erc_distill.serve.settings import ServeConfig, load_serve_config  # noqa: E402

from conftest import FIXTURES, make_tiny_bundle  # noqa: E402

MAX_TEXT = 300
MAX_BODY = 4096


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("serve") / "bundle")[0]


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory) -> list:
    """Every dialogue of the small fixture corpora (MELD, EmoryNLP, IEMOCAP train)."""
    root = tmp_path_factory.mktemp("data")
    out = []
    for name in ("meld", "emorynlp", "iemocap"):
        spec = CORPORA[name]
        (root / spec.folder).mkdir(parents=True)
        for split, file in spec.files.items():
            shutil.copyfile(FIXTURES / f"{name}_{split}.csv", root / spec.folder / file)
        out += load_corpus(name, "train", root).dialogues
    assert len(out) >= 4
    return out


@contextlib.contextmanager
def running(app, cfg: ServeConfig):
    """uvicorn serving ``app`` on a free loopback port in a background thread; yields the base URL."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn_server(app, cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def base(exported):
    cfg = ServeConfig(max_wait_ms=25.0, max_text_chars=MAX_TEXT, max_body_bytes=MAX_BODY, threads=1)
    with running(create_app(exported, cfg), cfg) as url:
        yield url


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client


def offline(exported: Path, turns: list[tuple[str, str]]) -> list:
    recognizer = StreamingRecognizer(Bundle.load(exported, threads=1), max_text_chars=MAX_TEXT)
    return [recognizer.push(s, t, "c") for s, t in turns]


def assert_same(served: list[dict], expected: list) -> None:
    assert [o["turn"] for o in served] == [p.turn for p in expected]
    assert [o["label"] for o in served] == [p.label for p in expected]
    for o, p in zip(served, expected):
        assert o["probabilities"].keys() == p.probabilities.keys()
        assert np.allclose(list(o["probabilities"].values()), list(p.probabilities.values()), atol=1e-5, rtol=0)


def metrics(http) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of /metrics, parsed as Prometheus text."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


async def _post_all(base: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/turns", json=b) for b in bodies))


# -- predictions, order, batching -------------------------------------------------------------------

def test_concurrent_conversations_get_the_offline_predictions(base, exported, dialogues):
    async def replay(client: httpx.AsyncClient, conversation: str, d) -> list[dict]:
        out = []
        for t in d.turns:  # one conversation: each turn after the previous answer
            r = await client.post("/v1/turns", json={"conversation": conversation, "speaker": t.speaker,
                                                     "text": t.text})
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out

    async def run() -> list[list[dict]]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await asyncio.gather(*(replay(client, f"offline-{i}", d) for i, d in enumerate(dialogues)))

    served = asyncio.run(run())
    for i, (d, answers) in enumerate(zip(dialogues, served)):
        assert {o["conversation"] for o in answers} == {f"offline-{i}"}
        assert_same(answers, offline(exported, [(t.speaker, t.text) for t in d.turns]))
        assert all(o["model_ms"] > 0 and o["queue_ms"] >= 0 and o["batch_size"] >= 1 for o in answers)


def test_turns_of_one_conversation_sent_at_once_stay_in_order(base, exported):
    # 8 turns of ONE conversation sent concurrently: each is built from exactly the turns the server
    # answered before it (the answers' turn numbers give the server's order)
    turns = [(f"S{i}", f"Turn number {i}: Oh my God!" + " no" * i) for i in range(8)]
    answers = [r.json() for r in asyncio.run(_post_all(base, [{"conversation": "order", "speaker": s, "text": t}
                                                               for s, t in turns]))]
    assert sorted(o["turn"] for o in answers) == list(range(8))
    by_turn = sorted(answers, key=lambda o: o["turn"])
    text_of = dict(turns)
    assert_same(by_turn, offline(exported, [(o["speaker"], text_of[o["speaker"]]) for o in by_turn]))


def test_eight_conversations_at_once_share_model_calls(base, http):
    before = metrics(http)
    answers = [r.json() for r in asyncio.run(_post_all(
        base, [{"conversation": f"batch-{i}", "speaker": "Ross", "text": f"Hi number {i}"} for i in range(8)]))]
    after = metrics(http)
    assert max(o["batch_size"] for o in answers) > 1
    calls = after[("erc_serve_batch_size_count", ())] - before[("erc_serve_batch_size_count", ())]
    turns = after[("erc_serve_batch_size_sum", ())] - before[("erc_serve_batch_size_sum", ())]
    assert turns == 8 and calls < 8  # 8 turns in fewer model calls


def test_websocket_answers_in_order_and_survives_junk(base, exported):
    turns = [("Ross", "We were on a break!"), ("Rachel", "Oh my God!"), ("Ross", "Is that a puppy?")]
    url = base.replace("http", "ws") + "/v1/stream?conversation=ws-order"
    answers = []
    with connect(url) as ws:
        ws.send(json.dumps({"speaker": turns[0][0], "text": turns[0][1]}))
        answers.append(json.loads(ws.recv()))
        for junk, status, field in [("not json", 400, None), ('{"speaker": "Ross"}', 422, "text"),
                                    ('[1, 2]', 422, None), ('{"speaker": 1, "text": "x"}', 422, "speaker"),
                                    (json.dumps({"speaker": "R", "text": "x" * (MAX_TEXT + 1)}), 422, "text"),
                                    ('{"conversation": "other", "speaker": "R", "text": "x"}', 422, "conversation")]:
            ws.send(junk)
            error = json.loads(ws.recv())
            assert error["status"] == status and error["field"] == field and error["error"], junk
        for s, t in turns[1:]:  # pipelined: sent before reading, answered in order
            ws.send(json.dumps({"speaker": s, "text": t}))
        answers += [json.loads(ws.recv()) for _ in turns[1:]]
    assert_same(answers, offline(exported, turns))


# -- bad input --------------------------------------------------------------------------------------

BAD = [
    ({"json": {"speaker": 3, "text": "Hi"}}, 422, "speaker"),
    ({"json": {"speaker": "Ross", "text": None}}, 422, "text"),
    ({"json": {"conversation": [1], "speaker": "Ross", "text": "Hi"}}, 422, "conversation"),
    ({"json": {"conversation": True, "speaker": "Ross", "text": "Hi"}}, 422, "conversation"),
    ({"json": {"speaker": "Ross"}}, 422, "text"),
    ({"json": {"text": "Hi"}}, 422, "speaker"),
    ({"json": ["Ross", "Hi"]}, 422, None),
    ({"json": {"speaker": "Ross", "text": "x" * (MAX_TEXT + 1)}}, 422, "text"),
    ({"content": b'{"speaker": "Ross", "text": "\\ud800"}'}, 422, "text"),  # a lone surrogate
    ({"content": b'{"speaker": "Ross", "text": "caf\xe9"}'}, 400, None),  # Latin-1, not UTF-8
    ({"content": b"speaker=Ross&text=Hi"}, 400, None),
    ({"content": b""}, 400, None),
    ({"content": b"[" * 100_000}, 413, None),  # over max_body_bytes by Content-Length
    ({"content": iter([b'{"speaker": "Ross", "text": "', b"x" * MAX_BODY, b'"}'])}, 413, None),  # chunked
]


@pytest.mark.parametrize("request_kwargs, status, field", BAD, ids=[f"{s}-{f}-{i}" for i, (_, s, f) in enumerate(BAD)])
def test_bad_turns_get_a_json_error_and_the_server_goes_on(http, request_kwargs, status, field):
    http.post("/v1/turns", json={"conversation": "bad", "speaker": "Ross", "text": "Hi"})
    before = http.get("/healthz").json()["conversations"]
    response = http.post("/v1/turns", **{"json" if "json" in request_kwargs else "content":
                                         next(iter(request_kwargs.values()))})
    body = response.json()
    assert response.status_code == status and set(body) == {"error", "field"} and body["field"] == field
    assert isinstance(body["error"], str) and body["error"]
    if status == 413:
        assert f"{MAX_BODY}" in body["error"]
    if field == "text" and status == 422 and "x" * 10 in str(request_kwargs):
        assert f"limit of {MAX_TEXT}" in body["error"]
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json()["ok"] and health.json()["conversations"] == before
    r = http.post("/v1/turns", json={"conversation": "bad", "speaker": "Ross", "text": "Still there?"})
    assert r.status_code == 200


def test_a_rejected_turn_leaves_its_conversation_unchanged(http):
    assert http.post("/v1/turns", json={"conversation": "keep", "speaker": "Ross", "text": "Hi"}).json()["turn"] == 0
    assert http.post("/v1/turns", json={"conversation": "keep", "speaker": "Ross", "text": 5}).status_code == 422
    assert http.post("/v1/turns", json={"conversation": "keep", "speaker": "R", "text": "Hi"}).json()["turn"] == 1


def test_unknown_routes_and_methods_answer_the_error_shape(http):
    for response, status in [(http.get("/nope"), 404), (http.get("/v1/turns"), 405)]:
        assert response.status_code == status and set(response.json()) == {"error", "field"}


@pytest.mark.parametrize("query, code", [("", 1008), ("?conversation=", 1008), ("?conversation=" + "c" * 201, 1008)])
def test_websocket_without_a_valid_conversation_is_closed_with_a_reason(base, query, code):
    with connect(base.replace("http", "ws") + "/v1/stream" + query) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
    assert info.value.rcvd.code == code and "conversation" in info.value.rcvd.reason


@pytest.mark.parametrize("frame, code", [(b'{"speaker": "Ross", "text": "Hi"}', 1003),
                                         (json.dumps({"speaker": "Ross", "text": "x" * MAX_BODY}), 1009)])
def test_websocket_binary_or_oversized_frames_close_the_socket(base, http, frame, code):
    with connect(base.replace("http", "ws") + "/v1/stream?conversation=ws-close") as ws:
        ws.send(frame)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
    assert info.value.rcvd.code == code and info.value.rcvd.reason
    assert http.get("/healthz").json()["ok"]


# -- bounded state, overload ------------------------------------------------------------------------

def test_conversations_are_evicted_by_the_limit_and_ended_on_delete(exported):
    cfg = ServeConfig(max_conversations=2, max_wait_ms=0, threads=1)
    with running(create_app(exported, cfg), cfg) as url, httpx.Client(base_url=url, timeout=30) as http:
        for c in ("a", "b", "c"):  # c evicts a, the least recently used
            assert http.post("/v1/turns", json={"conversation": c, "speaker": "Ross", "text": "Hi"}).json()["turn"] == 0
        health = http.get("/healthz").json()
        assert health["conversations"] == 2 and health["evicted"] == 1
        assert http.post("/v1/turns", json={"conversation": "a", "speaker": "R", "text": "Back"}).json()["turn"] == 0
        assert http.post("/v1/turns", json={"conversation": "c", "speaker": "R", "text": "Again"}).json()["turn"] == 1
        assert http.delete("/v1/conversations/c").json() == {"conversation": "c", "ended": True}
        assert http.delete("/v1/conversations/c").json() == {"conversation": "c", "ended": False}
        m = metrics(http)
        assert m[("erc_serve_conversations_dropped_total", (("reason", "evicted"),))] == 2  # a, then b
        assert m[("erc_serve_conversations_dropped_total", (("reason", "ended"),))] == 1
        assert m[("erc_serve_conversations", ())] == 1


def test_a_full_queue_answers_503_with_retry_after(exported):
    bundle = Bundle.load(exported, threads=1)
    slow, fast = dataclasses.replace(bundle), bundle.probabilities
    slowing, entered, release = threading.Event(), threading.Event(), threading.Event()

    def slowed(inputs):  # a model held up until released, so that the queue fills: the queue policy is under test
        if slowing.is_set():
            entered.set()
            release.wait(10)
        return fast(inputs)

    slow.probabilities = slowed
    turns = [("Ross" if i % 2 else "Rachel", f"turn {i} is a duck") for i in range(11)]  # the window prunes
    cfg = ServeConfig(queue_size=1, max_batch=1, max_wait_ms=0)
    with running(create_app(slow, cfg), cfg) as url, httpx.Client(base_url=url, timeout=30) as http:
        for s, t in turns[:-1]:
            assert http.post("/v1/turns", json={"conversation": "keep", "speaker": s, "text": t}).status_code == 200
        slowing.set()

        async def flood() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                def post(i: int) -> asyncio.Task:
                    return asyncio.create_task(client.post("/v1/turns", json={"conversation": f"q{i}", "speaker": "R",
                                                                              "text": "Hi"}))

                deadline = time.monotonic() + 10
                first = [post(0)]
                while not entered.is_set():  # q0 is in the model
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                first += [post(i) for i in range(1, 6)]
                while sum(t.done() for t in first) < 4:  # q1..q5: one queued, four refused
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                assert (await client.get("/healthz")).json()["queue_depth"] == 1
                keep = await client.post("/v1/turns", json={"conversation": "keep", "speaker": "R", "text": "Hi"})
                release.set()
                return list(await asyncio.gather(*first)), keep

        responses, keep = asyncio.run(flood())
        slowing.clear()
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 503, 503, 503, 503], codes
        assert keep.status_code == 503
        for r in [*responses, keep]:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and set(r.json()) == {"error", "field"}
                assert "queue is full" in r.json()["error"]
        # the refused turn left "keep" as it was: its next turn is turn 10, with the offline context
        last = http.post("/v1/turns", json={"conversation": "keep", "speaker": turns[-1][0], "text": turns[-1][1]})
        assert_same([last.json()], offline(exported, turns)[-1:])
        with ErcClient(url) as client:
            assert client.health()["ok"] and client.turn("Ross", "Calm again", "q-after")["turn"] == 0
        served = [r.json()["conversation"] for r in responses if r.status_code == 200]
        assert http.get("/healthz").json()["conversations"] == len(served) + 2  # refused new ones kept nothing
        m = metrics(http)
        assert m[("erc_serve_requests_total", (("route", "/v1/turns"), ("status", "503")))] == codes.count(503) + 1


# -- metrics, clients, command line -----------------------------------------------------------------

def test_metrics_are_prometheus_text_and_move(http):
    before = metrics(http)
    for i in range(3):
        assert http.post("/v1/turns", json={"conversation": "m", "speaker": "Ross", "text": f"Hi {i}"}).status_code == 200
    http.post("/v1/turns", content=b"junk")
    after = metrics(http)
    ok = ("erc_serve_requests_total", (("route", "/v1/turns"), ("status", "200")))
    bad = ("erc_serve_requests_total", (("route", "/v1/turns"), ("status", "400")))
    assert after[ok] - before.get(ok, 0) == 3 and after[bad] - before.get(bad, 0) == 1
    latency = ("erc_serve_request_seconds_count", (("route", "/v1/turns"),))
    assert after[latency] - before.get(latency, 0) == 4
    for name in ("erc_serve_model_seconds_count", "erc_serve_queue_wait_seconds_count", "erc_serve_batch_size_count"):
        assert after[(name, ())] - before.get((name, ()), 0) == 3
    assert after[("erc_serve_queue_depth", ())] == 0 and after[("erc_serve_conversations", ())] >= 1
    assert after[("erc_serve_request_seconds_sum", (("route", "/v1/turns"),))] > 0


def test_sync_client(base, exported):
    turns = [("Ross", "Hi!"), ("Rachel", "Oh my God!")]
    with ErcClient(base, timeout=30) as client:
        health = client.health()
        assert health["ok"] and health["model_file"] == "model.onnx" and len(health["labels"]) == 7
        answers = [client.turn(s, t, conversation="sync") for s, t in turns]
        assert_same(answers, offline(exported, turns))
        with client.stream("sync-ws") as live:
            assert_same([live.send(s, t) for s, t in turns], offline(exported, turns))
            with pytest.raises(ServerError) as info:
                live.send("Ross", "x" * (MAX_TEXT + 1))
            assert info.value.status == 422 and info.value.field == "text"
            assert live.send("Ross", "still open")["turn"] == 2
        with pytest.raises(ServerError) as info:
            client.turn("Ross", 42, conversation="sync")
        assert info.value.status == 422 and info.value.field == "text" and not isinstance(info.value, ServerOverloaded)
        with pytest.raises(ServerError) as info, client.stream("c" * 500) as live:
            live.send("Ross", "Hi")
        assert info.value.status == 1008
        assert client.end("sync") is True and client.end("sync") is False
        assert "erc_serve_requests_total" in client.metrics()


def test_async_client(base, exported):
    turns = [("Ross", "Hi!"), ("Rachel", "Oh my God!"), ("Ross", "A duck.")]

    async def run():
        async with AsyncErcClient(base, timeout=30) as client:
            assert (await client.health())["ok"]
            answers = [await client.turn(s, t, conversation="async") for s, t in turns]
            async with client.stream("async-ws") as live:
                streamed = [await live.send(s, t) for s, t in turns]
            with pytest.raises(ServerError) as info:
                await client.turn("Ross", "Hi", conversation=["no"])
            assert info.value.field == "conversation"
            ended = await client.end("async")
            return answers, streamed, ended, await client.metrics()

    answers, streamed, ended, text = asyncio.run(run())
    assert_same(answers, offline(exported, turns))
    assert_same(streamed, offline(exported, turns))
    assert ended is True and "erc_serve_batch_size" in text


def test_client_overloaded_carries_retry_after():
    from erc_distill.client import _error

    err = _error(503, {"error": "the queue is full", "field": None}, "2")
    assert isinstance(err, ServerOverloaded) and err.retry_after_s == 2.0 and "retry after 2 s" in str(err)


def test_serve_config_from_a_file_and_the_command_line(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("max_batch: 16\nmax-wait-ms: 2\nidle_ttl_s: null\nport: 9000\n")
    cfg = load_serve_config(path, port=0, threads=None)
    assert (cfg.max_batch, cfg.max_wait_ms, cfg.idle_ttl_s, cfg.port, cfg.threads) == (16, 2.0, None, 0, None)
    for text, field in [("max_batch: 0\n", "max_batch"), ("queue_size: many\n", "queue_size"), ("nope: 1\n", "nope"),
                        ("model_file: ../x.onnx\n", "model_file")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_serve_config(path)
        assert str(path) in str(info.value) and field in str(info.value)
    path.write_text("- a list\n")
    with pytest.raises(DataError, match="mapping"):
        load_serve_config(path)
    with pytest.raises(DataError, match="not found"):
        load_serve_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="command line: port"):
        load_serve_config(None, port=70000)


def test_serve_command_prints_its_url_and_serves(exported, tmp_path, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text("max_batch: 4\nthreads: 1\n")
    done = main(["serve", "--bundle", str(exported), "--config", str(config), "--port", "-1"])
    assert done == 1 and "port" in capsys.readouterr().err
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erc_distill.cli", "serve", "--bundle", str(exported), "--port", "0",
                             "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("erc-distill serve: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        with ErcClient(url, timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert client.health()["ok"]
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert client.turn("Ross", "Hi!", "cli")["batch_size"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in err


def test_responses_are_not_held_back_by_nagle(base, http):
    # the listening socket must say IPPROTO_TCP, or asyncio leaves Nagle on for its connections and a
    # response written in two parts waits out the client's delayed ACK (about 40 ms a request)
    import socket
    import statistics

    with contextlib.closing(bind_socket("127.0.0.1", 0)) as sock:
        assert sock.proto == socket.IPPROTO_TCP
    times = []
    for _ in range(15):
        start = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        times.append(1000 * (time.perf_counter() - start))
    assert statistics.median(times) < 30, times


def test_the_web_stack_is_imported_only_by_serve(exported, monkeypatch, capsys):
    code = ("import sys, erc_distill.cli, erc_distill.serve.settings, erc_distill.serve.batcher\n"
            "loaded = [m for m in ('fastapi', 'uvicorn', 'starlette', 'httpx', 'websockets') if m in sys.modules]\n"
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as on the robot install: no serve extra
    assert main(["serve", "--bundle", str(exported)]) == 1
    assert 'pip install "erc-distill[serve]"' in capsys.readouterr().err


def test_end_on_a_turn_ends_its_conversation(http, base):
    first = http.post("/v1/turns", json={"conversation": "ending", "speaker": "Ross", "text": "Hi!", "end": True})
    assert first.status_code == 200 and first.json()["ended"] is True and first.json()["turn"] == 0
    again = http.post("/v1/turns", json={"conversation": "ending", "speaker": "Ross", "text": "Hi again!"})
    assert again.json()["turn"] == 0  # a new conversation under the same id
    bad = http.post("/v1/turns", json={"conversation": "ending", "speaker": "Ross", "text": "x", "end": "yes"})
    assert bad.status_code == 422 and bad.json()["field"] == "end"
