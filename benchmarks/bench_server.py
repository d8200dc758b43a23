"""Load test of `omniola serve` on loopback: N concurrent streaming clients, text and spoken answers.

    python benchmarks/bench_server.py                       # default model, concurrency 1 4 16 64
    python benchmarks/bench_server.py --model DIR --concurrency 1 4 --requests 8 --max-tokens 32

Starts the server as a subprocess on a free 127.0.0.1 port (so its memory can be read from /proc), then for each
concurrency level runs a bounded number of streaming requests and reports requests/s, time to first token and to
first audio (p50/p95), errors, 429s, and the server's resident memory before and after. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 4)


async def one_request(client, body: dict) -> dict:
    start = time.perf_counter()
    first_token = first_audio = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    audio = delta.get("audio") or {}
                    if first_token is None and (delta.get("content") or audio.get("transcript")):
                        first_token = time.perf_counter() - start
                    if first_audio is None and audio.get("data"):
                        first_audio = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - counted as an error
        return {"status": -1, "error": repr(err)}
    return {"status": 200, "ttft": first_token, "ttfa": first_audio, "total": time.perf_counter() - start}


async def run_level(url: str, concurrency: int, requests: int, body: dict) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue = list(range(requests))
        results = []

        async def worker():
            while queue:
                queue.pop()
                results.append(await one_request(client, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "rate_limited_429": sum(r["status"] == 429 for r in results),
        "errors": sum(r["status"] not in (200, 429) for r in results),
        "requests_per_s": round(len(ok) / elapsed, 3),
        "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
        "ttft_p95_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.95),
        "ttfa_p50_s": pct([r["ttfa"] for r in ok if r["ttfa"] is not None], 0.5),
        "ttfa_p95_s": pct([r["ttfa"] for r in ok if r["ttfa"] is not None], 0.95),
        "elapsed_s": round(elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--audio", action="store_true", help="ask for spoken answers (pcm16, Piper voice)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="server's --max-concurrent")
    parser.add_argument("--max-waiting", type=int, default=64, help="server's --max-waiting")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "omniola.cli", "serve", "--port", str(port), "--max-concurrent",
           str(args.max_concurrent), "--max-waiting", str(args.max_waiting)]
    if args.model:
        cmd += ["--model", str(args.model)]
    env = {k: v for k, v in os.environ.items() if k != "OMNIOLA_API_KEY"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 1800  # the first run may build the default model
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the server did not come up")
            time.sleep(0.5)
        body = {"messages": [{"role": "user", "content": "Describe the sea in three sentences."}],
                "max_tokens": args.max_tokens, "stream": True, "temperature": 0}
        if args.audio:
            body |= {"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"}}
        report = {"rss_before_mib": round(rss_mib(server.pid), 1), "levels": []}
        for c in args.concurrency:
            level = asyncio.run(run_level(url, c, args.requests or 2 * c, body))
            level["rss_after_mib"] = round(rss_mib(server.pid), 1)
            report["levels"].append(level)
            print(json.dumps(level), flush=True)
        report["rss_after_mib"] = round(rss_mib(server.pid), 1)
        print(json.dumps({k: v for k, v in report.items() if k != "levels"}))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
