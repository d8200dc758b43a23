"""Load test of `omniola serve` on loopback: N concurrent streaming clients, text and spoken answers.

    python benchmarks/bench_server.py                       # default model, concurrency 1 2 4 8 16
    python benchmarks/bench_server.py --model DIR --concurrency 1 4 --requests 8 --max-tokens 32 --audio

Starts the server as a subprocess on a free 127.0.0.1 port (so its memory can be read from /proc), then for each
concurrency level keeps N streaming requests in flight (each client sends its next request when one ends) and
reports, with the metric names of the serving anchors (vLLM's `benchmark_serving`, vllm-omni):
  output_throughput   aggregate completion tokens / s over the level (every answer is exactly --max-tokens long:
                      `ignore_eos`, as vLLM's benchmark sets it)
  ttft p50/p95        time to the first text of an answer
  e2el p50/p95        end-to-end latency of a request
  audio_ttfp p50/p95  time to the first audio packet (--audio)
  audio_rtf           seconds of work per second of speech: end-to-end latency / audio seconds (--audio)
plus requests/s, errors, 429s and the server's resident memory. The summary gives the issue's targets (19): output
throughput at 8 streams >= 4x that of 1, with TTFT p95 at 8 <= 3x that of 1. `--engine-only` then runs the same
load on the engine in this process, which separates the engine's scaling from the HTTP and client costs (the
client shares the machine's cores). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
    tokens, audio_bytes = 0, b""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    audio = delta.get("audio") or {}
                    if first_token is None and (delta.get("content") or audio.get("transcript")):
                        first_token = time.perf_counter() - start
                    if audio.get("data"):
                        if first_audio is None:
                            first_audio = time.perf_counter() - start
                        audio_bytes += base64.b64decode(audio["data"])
    except Exception as err:  # noqa: BLE001 - counted as an error
        return {"status": -1, "error": repr(err)}
    seconds = None
    if audio_bytes[:4] == b"RIFF":  # a streamed WAV: 44-byte header, then 16-bit mono at the header's rate
        seconds = (len(audio_bytes) - 44) / 2 / int.from_bytes(audio_bytes[24:28], "little")
    return {"status": 200, "ttft": first_token, "ttfa": first_audio, "total": time.perf_counter() - start,
            "tokens": tokens, "audio_s": seconds}


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
    spoken = [r for r in ok if r["audio_s"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "rate_limited_429": sum(r["status"] == 429 for r in results),
        "errors": sum(r["status"] not in (200, 429) for r in results),
        "requests_per_s": round(len(ok) / elapsed, 3),
        "output_throughput_tok_s": round(sum(r["tokens"] for r in ok) / elapsed, 2),
        "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
        "ttft_p95_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.95),
        "e2el_p50_s": pct([r["total"] for r in ok], 0.5),
        "e2el_p95_s": pct([r["total"] for r in ok], 0.95),
        "audio_ttfp_p50_s": pct([r["ttfa"] for r in ok if r["ttfa"] is not None], 0.5),
        "audio_ttfp_p95_s": pct([r["ttfa"] for r in ok if r["ttfa"] is not None], 0.95),
        "audio_rtf": round(sum(r["total"] for r in spoken) / sum(r["audio_s"] for r in spoken), 3) if spoken else None,
        "elapsed_s": round(elapsed, 2),
    }


def engine_levels(model_dir: Path | None, levels: list[int], max_tokens: int, prompt: str) -> list[dict]:
    """The same load on `omniola.generation.Engine` in this process (no HTTP, no client in the way): aggregate
    output tokens/s with N requests in flight (2 x N requests per level, each exactly `max_tokens` long)."""
    from omniola.cli import ensure_default_model
    from omniola.generation import Engine, GenerationOptions
    from omniola.inference import load_model

    model, processor = load_model(model_dir or ensure_default_model())
    inputs = processor.apply_chat_template([{"role": "user", "content": prompt}])
    options = GenerationOptions(max_new_tokens=max_tokens, ignore_eos=True)
    rows = []
    for n in levels:
        engine = Engine(model, processor, max_batch=n)
        engine.generate(inputs, options)  # warm-up
        start = time.perf_counter()
        requests = [engine.submit(inputs, options) for _ in range(2 * n)]
        tokens = sum(r.result().usage.completion_tokens for r in requests)
        rows.append({"concurrency": n, "output_throughput_tok_s": round(tokens / (time.perf_counter() - start), 2)})
        engine.close()
        print(json.dumps({"engine_only": rows[-1]}), flush=True)
    return rows


PROMPT = "Describe the sea in three sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: max(8, 4 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--audio", action="store_true", help="ask for spoken answers (wav, the default voice)")
    parser.add_argument("--max-concurrent", type=int, default=8, help="server's --max-concurrent (its batch size)")
    parser.add_argument("--max-waiting", type=int, default=64, help="server's --max-waiting")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--engine-only", action="store_true",
                        help="also run the same load on the engine in this process, after the server is stopped")
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
        body = {"messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": args.max_tokens, "stream": True, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if args.audio:
            body |= {"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"}}
        asyncio.run(run_level(url, 1, 2, body))  # warm-up, not reported
        report = {"settings": vars(args) | {"model": str(args.model or "default")},
                  "rss_before_mib": round(rss_mib(server.pid), 1), "levels": []}
        for c in args.concurrency:
            level = asyncio.run(run_level(url, c, args.requests or max(8, 4 * c), body))
            level["rss_after_mib"] = round(rss_mib(server.pid), 1)
            report["levels"].append(level)
            print(json.dumps(level), flush=True)
        report["rss_after_mib"] = round(rss_mib(server.pid), 1)
        by = {level["concurrency"]: level for level in report["levels"]}
        if 1 in by and 8 in by:
            report["throughput_8_over_1"] = round(by[8]["output_throughput_tok_s"] / by[1]["output_throughput_tok_s"], 2)
            report["ttft_p95_8_over_1"] = round(by[8]["ttft_p95_s"] / by[1]["ttft_p95_s"], 2)
            report["targets_met"] = report["throughput_8_over_1"] >= 4 and report["ttft_p95_8_over_1"] <= 3
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.engine_only:
        report["engine_only"] = engine_levels(args.model, args.concurrency, args.max_tokens, PROMPT)
        by = {row["concurrency"]: row for row in report["engine_only"]}
        if 1 in by and 8 in by:
            report["engine_only_throughput_8_over_1"] = round(
                by[8]["output_throughput_tok_s"] / by[1]["output_throughput_tok_s"], 2)
    print(json.dumps({k: v for k, v in report.items() if k not in ("levels", "settings", "engine_only")}))
    if args.out:
        report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in report["settings"].items()}
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
