"""Loopback load test of ``erc-distill serve``: real MELD test dialogues, open-loop, measured round trips.

    python bench/serve_load.py --bundle runs/NAME/bundle --model-file model-int8-ort-dynamic.onnx \\
        --conversations 8 --rate 3 --seconds 60
    python bench/serve_load.py --bundle runs/NAME/bundle --find-max      # raise the rate until p99 > 100 ms

Starts the server as a subprocess (``python -m erc_distill.cli serve --port 0``) on a free loopback port,
then runs ``--conversations`` conversations at once, each replaying MELD test dialogues in turn (a
finished dialogue is ended with ``DELETE`` and the next one starts as a new conversation), at
``--rate`` turns per second per conversation, for ``--seconds``.

Open-loop: every turn has a scheduled send time (conversation i's turn k at ``i / (rate * N) + k /
rate``), and its latency runs from that time, not from when it was actually sent. With ``--transport
http`` (default) a conversation's next turn goes out at its time or as soon as the previous answer is
in, whichever is later (turns of one conversation must stay in order), so a slow server shows as
latency (the wait counts), not as fewer requests: every turn scheduled within ``--seconds`` is sent,
late if need be, until a drain deadline (``--drain-seconds``; turns still unsent then are reported as
``unsent``). With ``--transport ws`` each conversation is one WebSocket and every frame goes out on
time (the server answers a socket's frames in order).

Reports p50/p95/p99/max round trip (client side, loopback), throughput, errors by status, the server's
own queue wait, model time and batch size (from its answers), the server's RSS before and after the
load and its peak (``VmHWM``), and the machine. ``--find-max`` runs steps of ``--step-seconds`` at
``--rate``, ``--rate * --step-factor``, ... (at most ``--max-steps``) and reports the highest rate whose
p99 stayed within ``--p99-budget-ms`` with under 1% errors. Writes ``serve_load.json`` and
``serve_load.md`` to ``--out`` (default ``bench/results``). The client runs on the same machine as the
server and shares its CPUs: on a small CPU that is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

MAX_STEPS = 12
MAX_SECONDS = 3600


# -- the server process -----------------------------------------------------------------------------

class ServerProcess:
    """``erc-distill serve`` on a free loopback port, as a child process."""

    def __init__(self, bundle: Path, model_file: str | None, threads: int | None, config: Path | None,
                 start_timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "erc_distill.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
               "--port", "0"]
        for flag, value in (("--model-file", model_file), ("--threads", threads), ("--config", config)):
            if value is not None:
                cmd += [flag, str(value)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.line = self._first_line(start_timeout)
        if not self.line.startswith("erc-distill serve: http://"):
            self.stop()
            raise SystemExit(f"the server did not start: {self.line!r}\n{self.proc.stderr.read()[-3000:]}")
        self.url = self.line.split()[2]
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _first_line(self, timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box:
            self.stop()
            raise SystemExit(f"the server printed nothing in {timeout:g} s: {' '.join(self.cmd)}")
        return box[0].strip()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-50:]

    def memory_mb(self) -> dict[str, float]:
        """``VmRSS`` (now) and ``VmHWM`` (peak) of the server process, in MB."""
        out: dict[str, float] = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[{"VmRSS": "rss_mb", "VmHWM": "peak_rss_mb"}[key]] = round(int(value.split()[0]) / 1024, 1)
        except OSError:
            pass
        return out

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# -- one load step ----------------------------------------------------------------------------------

class Turns:
    """Conversation i's turns: MELD test dialogues i, i + N, i + 2N, ... (cycled), each a conversation."""

    def __init__(self, dialogues: list, index: int, stride: int, tag: str) -> None:
        self.dialogues, self.index, self.stride, self.tag = dialogues, index, stride, tag

    def __iter__(self):
        n, k = 0, self.index % len(self.dialogues)
        while True:
            d = self.dialogues[k]
            conversation = f"{self.tag}-c{self.index}-{n}"
            for i, t in enumerate(d.turns):
                yield conversation, t.speaker, t.text, i == len(d.turns) - 1
            n, k = n + 1, (k + self.stride) % len(self.dialogues)


async def run_step(url: str, dialogues: list, conversations: int, rate: float, seconds: float, drain: float,
                   transport: str, tag: str) -> dict[str, Any]:
    import httpx

    period = 1.0 / rate
    per_conversation = max(1, int(np.ceil(seconds * rate)))
    records: list[dict[str, Any]] = []
    errors: Counter = Counter()
    unsent = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    deadline = t0 + seconds + drain

    def schedule(i: int, k: int) -> float:
        return t0 + i * period / conversations + k * period

    def due(i: int, k: int) -> int:
        """Turns of conversation i from its k-th on that fall within ``seconds``."""
        return sum(1 for j in range(k, per_conversation) if schedule(i, j) - t0 < seconds)

    async def http_conversation(client: httpx.AsyncClient, i: int) -> None:
        nonlocal unsent
        turns = iter(Turns(dialogues, i, conversations, tag))
        for k in range(per_conversation):
            at = schedule(i, k)
            if at - t0 >= seconds:
                return
            if loop.time() > deadline:
                unsent += due(i, k)
                return
            conversation, speaker, text, last = next(turns)
            await asyncio.sleep(max(0.0, at - loop.time()))
            try:
                r = await client.post("/v1/turns", json={"conversation": conversation, "speaker": speaker,
                                                         "text": text})
                done = loop.time()
                if r.status_code == 200:
                    records.append({"ms": 1000 * (done - at), "done": done, **_server_side(r.json())})
                else:
                    errors[str(r.status_code)] += 1
            except httpx.HTTPError as err:
                errors[f"transport:{type(err).__name__}"] += 1
            if last:
                try:
                    await client.delete(f"/v1/conversations/{conversation}")
                except httpx.HTTPError as err:
                    errors[f"transport:{type(err).__name__}"] += 1

    async def ws_conversation(i: int) -> None:
        # one socket per dialogue: frames go out on schedule, answers come back in order
        from websockets.asyncio.client import connect

        nonlocal unsent
        turns = iter(Turns(dialogues, i, conversations, tag))
        k = 0
        while k < per_conversation and schedule(i, k) - t0 < seconds:
            conversation, speaker, text, last = next(turns)
            batch = [(speaker, text)]
            while not last:
                _, speaker, text, last = next(turns)
                batch.append((speaker, text))
            batch = batch[: max(0, min(len(batch), per_conversation - k))]
            batch = [b for j, b in enumerate(batch) if schedule(i, k + j) - t0 < seconds]
            ws_url = url.replace("http", "ws", 1) + f"/v1/stream?conversation={conversation}"
            try:
                async with connect(ws_url, max_queue=None) as ws:
                    sent: list[float] = []

                    async def sender() -> None:
                        for j, (s, t) in enumerate(batch):
                            at = schedule(i, k + j)
                            await asyncio.sleep(max(0.0, at - loop.time()))
                            await ws.send(json.dumps({"speaker": s, "text": t}))
                            sent.append(at)

                    task = asyncio.create_task(sender())
                    for j in range(len(batch)):
                        remaining = deadline - loop.time()
                        try:
                            if remaining <= 0:
                                raise TimeoutError
                            out = json.loads(await asyncio.wait_for(ws.recv(), remaining))
                        except (TimeoutError, asyncio.TimeoutError):
                            task.cancel()
                            unsent += due(i, k + j)  # unanswered by the drain deadline, and all after
                            return
                        done = loop.time()
                        if "error" in out:
                            errors[str(out.get("status"))] += 1
                        else:
                            records.append({"ms": 1000 * (done - schedule(i, k + j)), "done": done,
                                            **_server_side(out)})
                    await task
            except Exception as err:  # a closed socket, a refused connection: count it, go on
                errors[f"transport:{type(err).__name__}"] += 1
            k += len(batch)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                await client.delete(f"/v1/conversations/{conversation}")

    if transport == "http":
        limits = httpx.Limits(max_connections=conversations + 4, max_keepalive_connections=conversations + 4)
        async with httpx.AsyncClient(base_url=url, timeout=max(10.0, drain), limits=limits) as client:
            await asyncio.gather(*(http_conversation(client, i) for i in range(conversations)))
    else:
        await asyncio.gather(*(ws_conversation(i) for i in range(conversations)))
    return summarize(records, errors, unsent, rate, conversations, seconds, t0)


def _server_side(out: dict[str, Any]) -> dict[str, Any]:
    return {"queue_ms": out.get("queue_ms", 0.0), "model_ms": out.get("model_ms", 0.0),
            "batch": out.get("batch_size", 1), "server_ms": out.get("latency_ms", 0.0)}


def summarize(records: list[dict], errors: Counter, unsent: int, rate: float, conversations: int, seconds: float,
              t0: float) -> dict[str, Any]:
    ms = np.array([r["ms"] for r in records]) if records else np.array([np.nan])
    pct = lambda a, q: round(float(np.percentile(a, q)), 2) if len(records) else None  # noqa: E731
    elapsed = max((r["done"] for r in records), default=t0 + seconds) - t0
    n_err = sum(errors.values())
    out = {
        "rate_per_conversation": rate, "offered_turns_per_s": round(rate * conversations, 3), "seconds": seconds,
        "completed": len(records), "errors": dict(errors), "error_count": n_err, "unsent": unsent,
        "error_rate": round((n_err + unsent) / max(1, len(records) + n_err + unsent), 4),
        "throughput_turns_per_s": round(len(records) / max(elapsed, 1e-9), 2),
        "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99),
        "max_ms": round(float(ms.max()), 2) if records else None,
        "mean_ms": round(float(ms.mean()), 2) if records else None,
    }
    if records:  # the server's own view, from its answers
        for key, name in (("queue_ms", "server_queue"), ("model_ms", "server_model"), ("server_ms", "server_total")):
            a = np.array([r[key] for r in records])
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = pct(a, 50), pct(a, 99)
        out["mean_batch_size"] = round(float(np.mean([r["batch"] for r in records])), 2)
        out["max_batch_size"] = int(max(r["batch"] for r in records))
    return out


# -- report -----------------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    from erc_distill.machine import machine_summary

    lines = [f"# Serve load: {result['bundle']} ({result['model_file'] or 'bundle default'}), "
             f"{result['conversations']} conversations over {result['transport']}", "",
             "| rate/conv | offered turns/s | done | errors | unsent | p50 ms | p95 ms | p99 ms | max ms | turns/s "
             "| mean batch | server queue p50/p99 ms | model p50 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        lines.append(f"| {r['rate_per_conversation']:g} | {r['offered_turns_per_s']:g} | {r['completed']} | {errors} "
                     f"| {r['unsent']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} "
                     f"| {r['throughput_turns_per_s']} | {r.get('mean_batch_size')} | {r.get('server_queue_p50_ms')}"
                     f"/{r.get('server_queue_p99_ms')} | {r.get('server_model_p50_ms')} |")
    m = result["server_memory"]
    lines += ["", f"Server RSS: {m.get('before_mb')} MB before the load, {m.get('after_mb')} MB after, "
              f"peak {m.get('peak_mb')} MB (VmHWM)."]
    if result.get("find_max"):
        f = result["find_max"]
        held = (f"{f['highest_rate_held']:g} turns/s per conversation ({f['turns_per_s_held']:g} turns/s in all)"
                if f["highest_rate_held"] is not None else "none (the first step already missed it)")
        lines.append(f"Highest rate held with p99 <= {f['p99_budget_ms']:g} ms and < 1% errors: {held}.")
    s = result["server_config"]
    lines += [f"Server: {s}. Latency: client-side round trip on loopback, from each turn's scheduled send time "
              "(open-loop).", f"Machine: {machine_summary(result['machine'])}; {result['date']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--model-file", default=None, help="graph in the bundle, e.g. model-int8-ort-dynamic.onnx")
    p.add_argument("--threads", type=int, default=None, help="the server's ONNX Runtime threads")
    p.add_argument("--config", type=Path, default=None, help="the server's settings file (max_batch, max_wait_ms...)")
    p.add_argument("--data-dir", type=Path, default=None, help="corpora folder (default: $ERC_DISTILL_DATA)")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--rate", type=float, default=3.0, help="turns per second per conversation")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--drain-seconds", type=float, default=None, help="after --seconds, how long late turns may still "
                   "go out and be answered (default: min(30, seconds))")
    p.add_argument("--transport", choices=("http", "ws"), default="http")
    p.add_argument("--find-max", action="store_true", help="raise the rate step by step until p99 > budget")
    p.add_argument("--p99-budget-ms", type=float, default=100.0)
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--step-factor", type=float, default=1.5)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    if not (1 <= args.conversations <= 1000 and 0 < args.rate <= 1000 and 0 < args.seconds <= MAX_SECONDS
            and 1 <= args.max_steps <= MAX_STEPS and args.step_factor > 1 and 0 < args.step_seconds <= MAX_SECONDS):
        p.error(f"need 1 <= conversations <= 1000, 0 < rate <= 1000, 0 < seconds <= {MAX_SECONDS}, "
                f"1 <= max-steps <= {MAX_STEPS}, step-factor > 1")

    from erc_distill.atomic import write_json, write_text
    from erc_distill.data import load_corpus
    from erc_distill.machine import machine_info
    from erc_distill.serve.settings import load_serve_config

    dialogues = [d for d in load_corpus("meld", "test", args.data_dir).dialogues if len(d.turns)]
    server_cfg = load_serve_config(args.config, model_file=args.model_file, threads=args.threads)
    server = ServerProcess(args.bundle, args.model_file, args.threads, args.config)
    print(server.line, flush=True)
    runs: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    health: dict[str, Any] = {}
    find_max = None
    try:
        import httpx

        with httpx.Client(base_url=server.url, timeout=30) as client:
            health = client.get("/healthz").json()
            for i in range(3):  # a few untimed turns
                client.post("/v1/turns", json={"conversation": "warm-up", "speaker": "Ross", "text": "Hi"})
            client.delete("/v1/conversations/warm-up")
        memory["before_mb"] = server.memory_mb().get("rss_mb")
        if args.find_max:
            rate, held = args.rate, None
            seconds = args.step_seconds
            for step in range(args.max_steps):
                drain = args.drain_seconds if args.drain_seconds is not None else min(30.0, seconds)
                r = asyncio.run(run_step(server.url, dialogues, args.conversations, rate, seconds, drain,
                                         args.transport, f"s{step}"))
                runs.append(r)
                print(json.dumps({k: r[k] for k in ("rate_per_conversation", "completed", "error_count", "unsent",
                                                    "p50_ms", "p99_ms", "throughput_turns_per_s")}), flush=True)
                ok = r["p99_ms"] is not None and r["p99_ms"] <= args.p99_budget_ms and r["error_rate"] < 0.01
                if not ok:
                    break
                held = rate
                rate = round(rate * args.step_factor, 3)
            find_max = {"p99_budget_ms": args.p99_budget_ms, "highest_rate_held": held,
                        "turns_per_s_held": None if held is None else round(held * args.conversations, 3),
                        "steps": len(runs), "step_seconds": args.step_seconds}
        else:
            drain = args.drain_seconds if args.drain_seconds is not None else min(30.0, args.seconds)
            r = asyncio.run(run_step(server.url, dialogues, args.conversations, args.rate, args.seconds, drain,
                                     args.transport, "run"))
            runs.append(r)
        after = server.memory_mb()
        memory.update(after_mb=after.get("rss_mb"), peak_mb=after.get("peak_rss_mb"))
    finally:
        code = server.stop()
    result = {
        "bench": "serve_load", "date": date.today().isoformat(), "bundle": str(args.bundle),
        "model_file": health.get("model_file", args.model_file),
        "transport": args.transport, "conversations": args.conversations, "dialogues": len(dialogues),
        "server_config": {k: v for k, v in vars(server_cfg).items() if k not in ("host", "port")},
        "server_exit_code": code, "server_memory": memory, "runs": runs, "find_max": find_max,
        "machine": machine_info(),
    }
    write_json(args.out / "serve_load.json", result)
    write_text(args.out / "serve_load.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
