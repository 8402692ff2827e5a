"""What the OpenAI front costs per streamed event, and how far one front core goes.

A stub upstream stands in for vLLM: a minimal HTTP/1.1 server on uvloop that answers every
generation request with ``EVENTS`` chat-completion SSE events (vLLM's JSON shape, naming the
model it was asked for), either at token pace (one event every ``PACE`` s per stream) or in a
burst. A load generator (its own process, raw asyncio streams) runs C concurrent streams, either
straight to the stub (the baseline) or through the front, for:

* ``plain``: ``model = lora-a`` (relayed unchanged);
* ``renamed``: ``model = lora-a:svd`` (steered by name: every event's ``model`` rewritten).

For each run: events/s delivered, CPU-us per event of the front's processes (all workers) and
of the stub, the ratio, TTFT and inter-event p50/p99 (through the front minus straight to the
stub is what the hop adds), errors (non-200, refused connections), truncations (a stream without
its ``[DONE]`` or short of events), and the front's RSS. ``--soak S`` adds a run of S seconds at
C=64, token pace, renamed, sampling RSS every 10 s.

vLLM-native model-name steering (the plugin) adds no hop: the request goes to vLLM's own
front, and the plugin acts once per request at admission, never per event.

    python -m benchmarks.front                 # C = 1/16/64/256, workers 1/2/4, ~10 min
    python -m benchmarks.front --soak 600      # plus the 10-minute soak

Writes ``benchmarks/results/front.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cpu_dtype import cpu_kind, cpu_model
from svd_vllm.tools.serve import ChildProcess as Child
from svd_vllm.tools.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EVENTS = 256
PACE = 0.025
BURST_SECONDS = 3.0
KEY = "f" * 32
VOCAB = 64
MODEL = "lora-a"


# -- the stub upstream ------------------------------------------------------------------------
def _event(model: str, i: int) -> bytes:
    data = {
        "id": "chatcmpl-0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1796600000,
        "model": model,
        "choices": [
            {"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None, "finish_reason": None}
        ],
    }
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _Stub(asyncio.Protocol):
    """One connection: parse a request (headers + Content-Length body), answer it."""

    pace = PACE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buf[:head_end].decode("latin-1").split("\r\n")
        length, self.close = 0, False
        for line in head[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
            if k.strip().lower() == "connection" and v.strip().lower() == "close":
                self.close = True
        if len(self.buf) < head_end + 4 + length:
            return
        body, self.buf = self.buf[head_end + 4 : head_end + 4 + length], b""
        method, path = head[0].split(" ")[:2]
        if method == "GET" and path.startswith("/v1/models"):
            models = [{"id": "base", "object": "model", "root": "/m", "parent": None}]
            models.append({"id": MODEL, "object": "model", "root": "/l", "parent": "base"})
            self._send(json.dumps({"object": "list", "data": models}).encode(), "application/json")
            return
        if method == "GET":
            self._send(b"{}", "application/json")
            return
        model = json.loads(body).get("model", "?")
        self.streaming = asyncio.ensure_future(self._stream(model))

    def _send(self, body: bytes, kind: str) -> None:
        self.t.write(
            f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    async def _stream(self, model: str) -> None:
        self.t.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for i in range(EVENTS):
            if self.t.is_closing():
                return  # the client left
            chunk = _event(model, i)
            self.t.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if self.pace:
                await asyncio.sleep(self.pace)
            elif i % 16 == 15:
                await asyncio.sleep(0)  # a burst, but other streams get a turn
        done = b"data: [DONE]\n\n"
        if not self.t.is_closing():
            self.t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            if self.close:
                self.t.close()


def serve_stub(port: int, pace: float) -> None:
    import uvloop

    _Stub.pace = pace

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Stub, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- the load generator -----------------------------------------------------------------------
async def _one_stream(port: int, model: str) -> dict[str, Any]:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    out: dict[str, Any] = {"ok": False, "events": 0, "gaps": [], "ttft": None, "done": False}
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return out
    t0 = time.perf_counter()
    writer.write(head + body)
    status = await reader.readline()
    out["ok"] = b" 200 " in status
    last = None
    async for line in reader:
        if line.startswith(b"data: {"):
            now = time.perf_counter()
            if last is None:
                out["ttft"] = now - t0
            else:
                out["gaps"].append(now - last)
            last = now
            out["events"] += 1
        elif line.startswith(b"data: [DONE]"):
            out["done"] = True
            break
    writer.close()
    return out


async def _load(port: int, model: str, concurrency: int, seconds: float) -> list[dict[str, Any]]:
    """``concurrency`` streams at once, each started again when it ends, for ``seconds`` (0:
    one stream each)."""
    t_end = time.perf_counter() + seconds
    results: list[dict[str, Any]] = []

    async def lane() -> None:
        while True:
            results.append(await _one_stream(port, model))
            if time.perf_counter() >= t_end:
                return

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return results


def run_load(port: int, model: str, concurrency: int, seconds: float) -> list[dict[str, Any]]:
    import uvloop

    return uvloop.run(_load(port, model, concurrency, seconds))


# -- processes and their CPU ------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    out = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += _tree(int(child))
    return out


#: /proc's CPU clock tick, in seconds: a run's CPU is known to about this much.
TICK = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and every descendant alive now."""
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) * TICK
    return total


def rss_mb(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def _registry(root: Path) -> Path:
    """A registry where ``lora-a`` can steer (so ``lora-a:svd`` is admitted)."""
    from svd_vllm.registry import Registry
    from tests.support.artifacts import random_vector

    reg = Registry(root / "registry")
    reg.add(random_vector(MODEL, vocab=VOCAB, mu=-2.0, base_model="stub", adapter=MODEL))
    return reg.root


def start_front(registry: Path, upstream: int, workers: int, logs: Path) -> tuple[Child, int]:
    port = free_port()
    env = {
        **os.environ,
        "SVD_SIDECAR_API_KEY": KEY,
        "SVD_SIDECAR_REGISTRY": str(registry),
        "SVD_SIDECAR_VLLM_URL": f"http://127.0.0.1:{upstream}",
        "SVD_SIDECAR_VOCAB_SIZE": str(VOCAB),
    }
    cmd = [sys.executable, "-m", "svd_sidecar", "--role", "front", "--port", str(port)]
    cmd += ["--workers", str(workers), "--log-level", "warning"]
    front = Child("front", cmd, env, logs / f"front-{port}.log")
    front.wait_http(f"http://127.0.0.1:{port}/healthz", 60, interval=0.2)
    return front, port


def start_stub(pace: float, logs: Path) -> tuple[Child, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.front", "--stub", str(port), str(pace)]
    stub = Child("stub", cmd, dict(os.environ), logs / f"stub-{port}.log")
    stub.wait_http(f"http://127.0.0.1:{port}/v1/models", 60, interval=0.2)
    return stub, port


# -- one measured run --------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(
    port: int, model: str, concurrency: int, seconds: float, watch: dict[str, int]
) -> dict[str, Any]:
    """One load run against ``port``; CPU of each ``watch``ed process over it."""
    before = {k: cpu_seconds(pid) for k, pid in watch.items()}
    t0 = time.perf_counter()
    streams = run_load(port, model, concurrency, seconds)
    wall = time.perf_counter() - t0
    cpu = {k: cpu_seconds(pid) - before[k] for k, pid in watch.items()}
    events = sum(s["events"] for s in streams)
    gaps = [g for s in streams for g in s["gaps"]]
    ttfts = [s["ttft"] for s in streams if s["ttft"] is not None]
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "model": model,
        "streams": len(streams),
        "events": events,
        "wall_s": wall,
        "events_per_s": events / wall,
        "errors": sum(not s["ok"] for s in streams),
        "truncations": sum(s["ok"] and (not s["done"] or s["events"] != EVENTS) for s in streams),
        "ttft_ms": {"p50": 1e3 * (_pct(ttfts, 0.5) or 0), "p99": 1e3 * (_pct(ttfts, 0.99) or 0)},
        "gap_ms": {"p50": 1e3 * (_pct(gaps, 0.5) or 0), "p99": 1e3 * (_pct(gaps, 0.99) or 0)},
    }
    for k, s in cpu.items():
        row[f"{k}_us_per_event"] = 1e6 * s / max(events, 1)
    if "front" in cpu:  # None below 2 clock ticks of the stub's CPU: too few to divide by
        row["ratio"] = cpu["front"] / cpu["stub"] if cpu["stub"] >= 2 * TICK else None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--soak", type=float, default=0, help="seconds of soak at C=64 (0: none)")
    ap.add_argument("--out", type=Path, default=RESULTS / "front")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu_model()} ({cpu_kind()}), {os.cpu_count()} cores, {platform.machine()}",
        "events_per_stream": EVENTS,
        "pace_s": PACE,
        "burst_seconds": BURST_SECONDS,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        registry = _registry(logs)
        for mode, pace in (("pace", PACE), ("burst", 0.0)):
            stub, stub_port = start_stub(pace, logs)
            try:
                # A burst of 256 events takes milliseconds: lanes run streams again for
                # BURST_SECONDS, so the CPU measured is many clock ticks, not a few.
                seconds = 0.0 if pace else BURST_SECONDS
                for c in args.concurrency:
                    row = measure(stub_port, MODEL, c, seconds, {"stub": stub.pid})
                    report["runs"].append({"mode": mode, "via": "stub", **row})
                    print(json.dumps(report["runs"][-1]), flush=True)
                for workers in args.workers:
                    front, port = start_front(registry, stub_port, workers, logs)
                    try:
                        for c in args.concurrency:
                            for model in (MODEL, f"{MODEL}:svd"):
                                watch = {"front": front.pid, "stub": stub.pid}
                                row = measure(port, model, c, seconds, watch)
                                row["front_rss_mb"] = rss_mb(front.pid)
                                report["runs"].append(
                                    {"mode": mode, "via": f"front x{workers}", **row}
                                )
                                print(json.dumps(report["runs"][-1]), flush=True)
                    finally:
                        front.stop()
                if args.soak and mode == "pace":
                    report["soak"] = soak(registry, stub_port, stub.pid, args.soak, logs)
            finally:
                stub.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(args.out.with_suffix(".md").read_text())
    return 0


def soak(
    registry: Path, stub_port: int, stub_pid: int, seconds: float, logs: Path
) -> dict[str, Any]:
    """C=64, token pace, renamed: ``WARMUP`` s to fill the pools and caches, then ``seconds``
    measured, sampling RSS every 10 s (flat means no growth once the front is warm)."""
    front, port = start_front(registry, stub_port, 1, logs)
    rss: list[float] = []
    stop = False

    def sample() -> None:
        while not stop:
            rss.append(rss_mb(front.pid))
            time.sleep(10)

    import threading

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        cold = rss_mb(front.pid)
        run_load(port, f"{MODEL}:svd", 64, WARMUP)
        sampler.start()
        row = measure(port, f"{MODEL}:svd", 64, seconds, {"front": front.pid, "stub": stub_pid})
    finally:
        stop = True
        front.stop()
    row["rss_mb"] = rss
    row["rss_cold_mb"] = cold
    row["rss_growth"] = (max(rss) - rss[0]) / rss[0] if rss else None
    return row


#: Seconds of load before the soak is measured.
WARMUP = 60.0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# The OpenAI front's cost per streamed event",
        "",
        f"Generated by `benchmarks/front.py` on {report['created']} ({report['machine']}). "
        f"Each stream: {report['events_per_stream']} chat-completion SSE events from a stub "
        f"upstream (uvloop), one every {1e3 * report['pace_s']:.0f} ms (`pace`: one stream per "
        "lane, all starting at once, so TTFT at high C includes every stream's set-up queueing "
        "behind the others') or as fast as it can write them (`burst`: each lane runs streams "
        f"one after another for {report.get('burst_seconds', BURST_SECONDS):g} s, so the CPU "
        "measured is many clock ticks). `ratio` = the front's CPU per event / the stub's "
        "(goal: at most 2; empty where the stub used under two clock ticks of CPU, too few to "
        "divide by). Latencies are as the client sees them; the hop adds the difference to the "
        "`stub` row. Load generator, stub and front share the machine's cores.",
        "",
        "| mode | via | model | C | events/s | front CPU us/event | stub CPU us/event | ratio "
        "| TTFT p50/p99 ms | gap p50/p99 ms | errors | truncations | front RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        front = r.get("front_us_per_event")
        ratio = r.get("ratio")
        lines.append(
            f"| {r['mode']} | {r['via']} | {r['model']} | {r['concurrency']} | "
            f"{r['events_per_s']:.0f} | {'' if front is None else f'{front:.1f}'} | "
            f"{r['stub_us_per_event']:.1f} | {'' if ratio is None else f'{ratio:.2f}'} | "
            f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} | "
            f"{r['gap_ms']['p50']:.1f} / {r['gap_ms']['p99']:.1f} | {r['errors']} | "
            f"{r['truncations']} | {r.get('front_rss_mb', float('nan')):.0f} |"
        )
    s = report.get("soak")
    if s:
        lines += [
            "",
            f"**Soak** ({s['wall_s'] / 60:.1f} min after {WARMUP:.0f} s of warm-up, C=64, token "
            f"pace, `{s['model']}`, 1 worker): {s['streams']} streams, {s['events']} events, "
            f"{s['errors']} errors, {s['truncations']} truncations; front "
            f"{s['front_us_per_event']:.1f} us/event vs stub {s['stub_us_per_event']:.1f} (ratio "
            f"{s['ratio']:.2f}); RSS {s['rss_cold_mb']:.0f} MB idle before the warm-up, "
            f"{s['rss_mb'][0]:.0f} -> {s['rss_mb'][-1]:.0f} MB over the soak (max growth "
            f"{100 * s['rss_growth']:.1f}% over its first sample; samples every 10 s: "
            f"{', '.join(f'{x:.0f}' for x in s['rss_mb'])}).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stub"]:
        serve_stub(int(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.exit(main())
