"""A Serve model replica SIGKILLed during 16 concurrent streams, for benchmarks/faults.py.

The real application (serve/app.py: HTTP proxy -> FastAPI ingress -> the model deployment) on
loopback, with a small untrained byte-patch model and the gate open (the weights do not matter
here; an open gate keeps every stream long). Each round starts ``streams`` streaming
completions of ``max_tokens`` bytes from as many threads (raw HTTP, so nothing is hidden),
waits until every one has received text, SIGKILLs the replica's process (its pid from
``/health``), and reads each stream to its end. A stream ends in one of four ways:

- ``complete``: a final chunk with a ``finish_reason``, then ``data: [DONE]``;
- ``explicit_error``: an error event (``data: {"error": ...}``) or an HTTP error status;
- ``silent_truncation``: the connection ends without either (must never happen);
- ``hang``: nothing for ``read_timeout`` seconds, or no end after ``deadline`` (must never).

Then, once ``/health`` answers from a new replica (another pid), as many requests again, half
streamed, must all succeed. Every client has a timeout; every loop is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPEN_GATE = {"c_floor": 0.0, "s_floor": 0.0, "burn_in": 0, "max_retries": 0}


def _read_stream(port: int, body: dict, started: threading.Event, read_timeout: float, deadline: float) -> dict:
    """One streaming completion read to its end; its outcome (see the module docstring)."""
    t0 = time.time()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=read_timeout)
    chunks, finish, done, error = 0, None, False, None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return {"outcome": "explicit_error", "status": resp.status, "chunks": 0}
        while time.time() - t0 < deadline:
            line = resp.readline()
            if not line:
                break  # the server ended the response
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"].get("code") or "error"
                continue
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
                if choice.get("text"):
                    chunks += 1
                    started.set()
        else:
            return {"outcome": "hang", "why": f"no end after {deadline} s", "chunks": chunks}
    except TimeoutError:  # socket.timeout is TimeoutError
        return {"outcome": "hang", "why": f"nothing for {read_timeout} s", "chunks": chunks}
    except (http.client.HTTPException, ConnectionError) as e:  # the connection broke: was it said?
        outcome = "explicit_error" if error else "silent_truncation"
        return {"outcome": outcome, "error": error, "broken": type(e).__name__, "chunks": chunks}
    finally:
        started.set()  # an early end releases the killer too
        conn.close()
    if error is not None:
        return {"outcome": "explicit_error", "error": error, "chunks": chunks}
    if done and finish is not None:
        return {"outcome": "complete", "finish_reason": finish, "chunks": chunks}
    return {"outcome": "silent_truncation", "done": done, "finish_reason": finish, "chunks": chunks}


def _health(port: int) -> dict | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def _later(port: int, i: int, read_timeout: float, deadline: float) -> bool:
    """A request after the restore: streamed (even i) or not; True when it succeeded."""
    body = {"model": "bitlm", "prompt": "After the restart", "max_tokens": 32, "seed": i}
    if i % 2 == 0:
        out = _read_stream(port, {**body, "stream": True}, threading.Event(), read_timeout, deadline)
        return out["outcome"] == "complete"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=read_timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        return resp.status == 200 and payload["choices"][0]["finish_reason"] in ("length", "stop", "content_filter")
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return False
    finally:
        conn.close()


def _round(port: int, r: int, streams: int, max_tokens: int, read_timeout: float, deadline: float) -> dict:
    pid = _health(port)["pid"]
    started = [threading.Event() for _ in range(streams)]
    body = {"model": "bitlm", "prompt": "The quick brown fox", "max_tokens": max_tokens, "stream": True}
    with ThreadPoolExecutor(streams) as pool:
        futures = [
            pool.submit(_read_stream, port, {**body, "seed": 100 * r + i}, started[i], read_timeout, deadline)
            for i in range(streams)
        ]
        wait_until = time.time() + deadline
        for e in started:
            e.wait(max(0.0, wait_until - time.time()))
        streaming = sum(not f.done() for f in futures)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        outcomes = [f.result() for f in futures]
    restored = None
    while time.time() - killed_at < 300:
        health = _health(port)
        if health is not None and health["pid"] != pid:
            restored = round(time.time() - killed_at, 1)
            break
        time.sleep(0.5)
    with ThreadPoolExecutor(streams) as pool:
        later = list(pool.map(lambda i: _later(port, i, read_timeout, deadline), range(streams)))
    counts = {k: sum(o["outcome"] == k for o in outcomes) for k in ("complete", "explicit_error")}
    counts |= {k: sum(o["outcome"] == k for o in outcomes) for k in ("silent_truncation", "hang")}
    return {
        "streams": streams,
        "streaming_when_killed": streaming,
        **counts,
        "error_codes": sorted({str(o.get("error") or o.get("status")) for o in outcomes if o["outcome"] == "explicit_error"}),
        "seconds_to_new_replica": restored,
        "later_requests": len(later),
        "later_ok": sum(later),
        "odd_outcomes": [o for o in outcomes if o["outcome"] in ("silent_truncation", "hang")][:5],
    }  # fmt: skip


def replica_killed(rounds: int, streams: int = 16, max_tokens: int = 512) -> dict:
    import ray
    import torch
    from ray import serve

    from bitlm import BitTransformerLM
    from pipelines.common import init_ray
    from serve.app import build

    read_timeout, deadline = 60.0, 180.0
    torch.manual_seed(0)
    model = BitTransformerLM(
        d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=576, arch="byte_patch", patch_bytes=4
    )
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        init_ray(quiet=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"checkpoint": d, "gate": OPEN_GATE, "max_batch_size": streams, "batch_wait_timeout_s": 0.5}
        args["max_tokens"] = max_tokens
        serve.run(build(args), name="bitlm", route_prefix="/")
        try:
            for _ in range(120):
                if _health(port) is not None:
                    break
                time.sleep(1)
            results = [_round(port, r, streams, max_tokens, read_timeout, deadline) for r in range(rounds)]
        finally:
            serve.shutdown()
    total = {k: sum(r[k] for r in results) for k in ("streams", "complete", "explicit_error", "silent_truncation")}
    total |= {k: sum(r[k] for r in results) for k in ("hang", "later_requests", "later_ok")}
    return {
        "rounds": rounds,
        "max_tokens": max_tokens,
        "client_read_timeout_s": read_timeout,
        "client_deadline_s": deadline,
        **total,
        "per_round": results,
        "ray": ray.__version__,
    }
