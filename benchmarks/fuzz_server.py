"""Adversarial requests against `omniola serve` on loopback: decompression bombs, malformed bodies, SSRF URLs, ...

    python benchmarks/fuzz_server.py                          # micro random model, 760 requests, at most 10 min
    python benchmarks/fuzz_server.py --model DIR --requests 1000 --time-limit 900

Starts `omniola serve` as a subprocess bound to 127.0.0.1 (with `--allow-remote-media`, so the SSRF rules are what
refuses the loopback and private URLs sent to it), then:

1. bombs: each decompression bomb of issue 21 alone, with the server's peak memory above its resident memory before
   (the kernel's high-water mark, reset through /proc/PID/clear_refs before each case); then all of them at once;
2. fuzz: `--requests` adversarial requests (bombs, malformed JSON, junk fields, unsupported parameters, marker
   strings in text, tiny temperatures, SSRF URLs in every spelling, corrupt media), four at a time;
3. load: a text request's latency alone, then while 8 requests with large (allowed) media are in flight.

Prints a summary table and writes benchmarks/results/fuzz_server.json. A 5xx, a dead server or a bomb over
`--max-bomb-mib` is a failure (exit status 1). The bomb builders are imported by tests/test_hostile.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import importlib.util
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import wave
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KEY = "fuzz-key"
# What the server under test is started with (tests/test_hostile.py uses the same through `server_settings`).
SERVER_LIMITS = dict(max_audio_seconds=120.0, max_prompt_tokens=4000, max_tokens=16, default_max_tokens=16)


# ------------------------------------------------------------------------------------------------------ media
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wav_1hz() -> bytes:
    """The audit's 39 KB WAV at 1 Hz: 20,000 samples, 5.5 hours; resampled to 16 kHz it would be 1.28 GB."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(1)
        w.writeframes(np.zeros(20_000, np.int16).tobytes())
    return buf.getvalue()


def wav_lying_header() -> bytes:
    """A WAV whose header claims 2 GiB of 16 kHz samples (18 hours) over 1 KB of data."""
    data = wav_16k_silence(0.03)
    return data[:40] + struct.pack("<I", 2**31) + data[44:]


def wav_16k_silence(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(int(seconds * 16000), np.int16).tobytes())
    return buf.getvalue()


def flac_hour() -> bytes:
    """One hour of 16 kHz silence as FLAC (~180 KB); decoded, 230 MB of float32, before any copy."""
    import soundfile

    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", samplerate=16000, channels=1, format="FLAC") as f:
        minute = np.zeros(16000 * 60, np.float32)
        for _ in range(60):
            f.write(minute)
    return buf.getvalue()


def video_huge_frame(side: int = 8176) -> bytes:
    """A one-frame H.264 MP4 of `side` x `side` pixels (~200 KB); one RGB frame is 200 MB."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width = stream.height = side
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast"}
        frame = av.VideoFrame(side, side, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buf.getvalue()


def video_long_track(seconds: int = 3600) -> bytes:
    """One 64x64 frame with a `seconds`-long silent FLAC sound track, in Matroska (~1 MB for an hour)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        video = container.add_stream("libx264", rate=1)
        video.width = video.height = 64
        video.pix_fmt, video.options = "yuv420p", {"preset": "ultrafast"}
        audio = container.add_stream("flac", rate=16000)
        audio.layout = "mono"
        frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        for packet in [*video.encode(frame), *video.encode()]:
            container.mux(packet)
        block = np.zeros((1, 4608), np.int16)
        for start in range(0, 16000 * seconds, 4608):
            chunk = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            for packet in audio.encode(chunk):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    """A black grey-scale PNG of `width` x `height` made by Pillow (compresses to almost nothing)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header (IHDR, CRC fixed) claims `width` x `height` pixels."""
    data = bytearray(png(16, 16))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


@functools.cache
def bombs() -> list[tuple[str, dict]]:
    """The audit's decompression bombs as request bodies (each must be refused with a 400 before decoding)."""

    def user(part: dict) -> dict:
        return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}],
                "max_tokens": 2}

    def audio(data: bytes, fmt: str) -> dict:
        return user({"type": "input_audio", "input_audio": {"data": _b64(data), "format": fmt}})

    def image(data: bytes) -> dict:
        return user({"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(data)}})

    def video(data: bytes, mime: str) -> dict:
        return user({"type": "video", "video": {"url": f"data:{mime};base64," + _b64(data)}})

    return [
        ("wav at 1 Hz (39 KB)", audio(wav_1hz(), "wav")),
        ("flac, 1 h of silence", audio(flac_hour(), "flac")),
        ("video 8176x8176", video(video_huge_frame(), "video/mp4")),
        ("video frame + 1 h sound track", video(video_long_track(), "video/x-matroska")),
        ("png 8x2097152", image(png(8, 2_097_152))),
        ("png header claiming 100000x100000", image(png_claiming(100_000, 100_000))),
        ("30 MB of text", {"messages": [{"role": "user", "content": "a " * (15 * 1024 * 1024)}], "max_tokens": 2}),
    ]


# ---------------------------------------------------------------------------------------------- adversarial
SSRF_URLS = [
    "http://127.0.0.1/", "http://localhost/", "http://127.1/", "http://0.0.0.0/", "http://0/", "http://2130706433/",
    "http://0x7f000001/", "http://017700000001/", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
    "http://[0:0:0:0:0:ffff:7f00:1]/", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/",
    "http://192.168.1.1/", "http://172.16.0.1/", "http://224.0.0.1/", "http://[fe80::1]/", "http://100.64.0.1/",
    "http://user:secret@127.0.0.1:22/", "http://localhost.:8000/", "https://127.0.0.1:1/x.png", "ftp://example.com/",
    "file:///etc/passwd", "gopher://127.0.0.1:25/", "http://[::]/", "http://%31%32%37.0.0.1/", "http://127.0.0.1.nip.io/",
]


def adversarial(seed: int, count: int) -> list[tuple[str, dict | bytes]]:
    """`count` hostile request bodies: fixed cases first, then random mutations of a valid request."""
    rng = random.Random(seed)
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def user(*parts) -> dict:
        return {**ok, "messages": [{"role": "user", "content": list(parts)}]}

    small_png = "data:image/png;base64," + _b64(png(40, 30))
    cases: list[tuple[str, dict | bytes]] = [(name, body) for name, body in bombs()]
    cases += [("ssrf " + url, user({"type": "image_url", "image_url": {"url": url}})) for url in SSRF_URLS]
    cases += [("ssrf video " + url, user({"type": "video", "video": {"url": url}})) for url in SSRF_URLS[:8]]
    cases += [
        # libsndfile trusts the data, not the header's length: this is a valid 30 ms clip, answered 200
        ("wav header claiming 18 h", user({"type": "input_audio", "input_audio": {"data": _b64(wav_lying_header()),
                                                                                "format": "wav"}})),
        ("literal markers", {**ok, "messages": [{"role": "user", "content": "Is <image> an HTML tag? <video><audio>"}]}),
        ("literal markers in parts", user({"type": "text", "text": "<image><image><audio>"})),
        ("marker and image", user({"type": "text", "text": "<image>"}, {"type": "image_url", "image_url": {"url": small_png}})),
        ("tools", {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("response_format", {**ok, "response_format": {"type": "json_object"}}),
        ("logprobs", {**ok, "logprobs": True, "top_logprobs": 3}),
        ("logit_bias", {**ok, "logit_bias": {"1": 5}}),
        ("presence_penalty", {**ok, "presence_penalty": 1.5}),
        ("video path traversal", user({"type": "video", "video": {"path": "../../etc/passwd"}})),
        ("data url no base64", user({"type": "image_url", "image_url": {"url": "data:image/png,abc"}})),
        ("gif", user({"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlhAQABAAAAACw="}})),
    ]
    cases += [(f"temperature {t}", {**ok, "temperature": t}) for t in (1e-45, 1e-38, 1e-30, 1e-6, 0.0, 5e-324)]
    junk = [None, -1, 0, 10**30, "", "x" * 1000, [], {}, [1, 2], {"type": None}, True, 3.5, "data:,", "<image>",
            float("1e308"), -0.0, "\u0000", "\ud800" * 0 + "\U0001F600"]
    keys = ["messages", "max_tokens", "temperature", "top_p", "stop", "stream", "modalities", "audio", "seed", "n",
            "stream_options", "max_completion_tokens", "tools", "logprobs", "response_format", "tool_choice"]
    part_types = ["text", "image_url", "input_audio", "video", "video_url", "?"]
    media = [small_png, "data:image/png;base64,@@", "data:audio/wav;base64," + _b64(wav_16k_silence(0.2)),
             "http://127.0.0.1:8000/v1/models", "data:video/mp4;base64,AAAA"]
    while len(cases) < count:
        body: dict | bytes = json.loads(json.dumps(ok))
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.35:
                body[rng.choice(keys)] = rng.choice(junk)
            elif roll < 0.75:
                kind = rng.choice(part_types)
                part = {"type": kind, "text": rng.choice(junk), "image_url": {"url": rng.choice(media)},
                        "input_audio": {"data": rng.choice([_b64(wav_16k_silence(0.1)), "!!", ""]),
                                        "format": rng.choice(["wav", "mp3", "flac", "aiff"])},
                        "video": {"url": rng.choice(media)}, "video_url": {"path": rng.choice(["a.mp4", "/etc"])}}
                body["messages"] = [{"role": rng.choice(["user", "system", "assistant", "tool", 5, None]),
                                     "content": rng.choice([[part], [part, part], rng.choice(junk)])}]
            else:
                raw = json.dumps(body).encode()
                cut = rng.randint(0, len(raw))
                body = raw[:cut] + bytes([rng.randint(0, 255)]) + raw[cut + 1:]
                break
        cases.append(("random", body))
    return cases[:count] if count >= len(cases) else cases


# ------------------------------------------------------------------------------------------------ the server
def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident memory now and its high-water mark, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def reset_peak(pid: int) -> None:
    """Resets the kernel's resident high-water mark (VmHWM) of `pid` to its current resident memory."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def micro_model_dir(path: Path) -> Path:
    """The tests' micro random model (tests/conftest.py), saved as a model directory."""
    spec = importlib.util.spec_from_file_location("omniola_tests_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    model, processor = conftest.micro_model()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def start_server(model_dir: Path, media_workers: int = 2) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "omniola.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--api-key", KEY, "--allow-remote-media", "--remote-timeout-s", "3",
           "--media-workers", str(media_workers),
           "--max-audio-seconds", str(SERVER_LIMITS["max_audio_seconds"]),
           "--max-prompt-tokens", str(SERVER_LIMITS["max_prompt_tokens"]), "--max-tokens", str(SERVER_LIMITS["max_tokens"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            sys.exit("the server did not come up")
        time.sleep(0.2)


async def send(client, body: dict | bytes) -> tuple[int, float]:
    start = time.perf_counter()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        r = await client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
        status = r.status_code
        if status >= 400:
            error = r.json()["error"]  # every error is OpenAI's error JSON
            assert set(error) == {"message", "type", "param", "code"}, error
            assert "/tmp/" not in error["message"] and "omniola-" not in error["message"], error
            assert "secret" not in error["message"], error
    except (AssertionError, ValueError, KeyError) as err:
        return -2, time.perf_counter() - start  # a malformed error body
    except Exception:  # noqa: BLE001 - connection reset, timeout: counted as a crash of the request
        return -1, time.perf_counter() - start
    return status, time.perf_counter() - start


async def run(args) -> dict:
    import httpx

    report: dict = {"command": " ".join(["python", "benchmarks/fuzz_server.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or micro_model_dir(Path(tmp) / "micro")
        server, url = start_server(model_dir, args.media_workers)
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                                         timeout=120) as client:
                await send(client, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2})
                # 1. bombs, one at a time, then all at once
                rows = []
                for name, body in bombs():
                    await asyncio.sleep(0.2)
                    reset_peak(server.pid)
                    before = memory_kib(server.pid)["VmRSS"]
                    status, seconds = await send(client, body)
                    peak = memory_kib(server.pid)["VmHWM"]
                    rows.append({"bomb": name, "status": status, "seconds": round(seconds, 2),
                                 "peak_over_rss_mib": round((peak - before) / 1024, 1)})
                reset_peak(server.pid)
                before = memory_kib(server.pid)["VmRSS"]
                together = await asyncio.gather(*[send(client, body) for _, body in (bombs() * 2)[:12]])
                peak = memory_kib(server.pid)["VmHWM"]
                rows.append({"bomb": "12 at once", "status": sorted({s for s, _ in together}),
                             "seconds": round(max(t for _, t in together), 2),
                             "peak_over_rss_mib": round((peak - before) / 1024, 1)})
                report["bombs"] = rows
                # 2. the fuzz, four at a time, within the time limit
                statuses: dict[str, int] = {}
                cases = adversarial(args.seed, args.requests)
                reset_peak(server.pid)
                rss0 = memory_kib(server.pid)["VmRSS"]
                failures = []
                for i in range(0, len(cases), 4):
                    if time.monotonic() - started > args.time_limit:
                        break
                    batch = cases[i : i + 4]
                    results = await asyncio.gather(*(send(client, body) for _, body in batch))
                    for (name, body), (status, _) in zip(batch, results):
                        statuses[str(status)] = statuses.get(str(status), 0) + 1
                        if status >= 500 or status < 0:
                            failures.append({"case": name, "status": status, "body": str(body)[:200]})
                    if server.poll() is not None:
                        break
                report["fuzz"] = {"requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
                                  "5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
                                  "failed": failures[:20], "server_alive": server.poll() is None,
                                  "peak_over_rss_mib": round((memory_kib(server.pid)["VmHWM"] - rss0) / 1024, 1)}
                # 3. a text request's latency, alone and beside 8 requests with large media
                text = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
                alone = [(await send(client, text))[1] for _ in range(5)]
                big = [{"messages": [{"role": "user", "content": [
                    {"type": "input_audio", "input_audio": {"data": _b64(wav_16k_silence(110)), "format": "wav"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(png(4000, 4000))}}]}],
                    "max_tokens": 2}] * 8
                heavy = [asyncio.ensure_future(send(client, body)) for body in big]
                await asyncio.sleep(0.5)
                loaded = []
                while not all(h.done() for h in heavy) or len(loaded) < 3:
                    loaded.append((await send(client, text))[1])
                    if len(loaded) >= 10:
                        break
                heavy_results = await asyncio.gather(*heavy)
                report["load"] = {"text_alone_s": round(float(np.median(alone)), 3),
                                  "text_beside_8_media_s": round(float(np.median(loaded)), 3),
                                  "text_requests_beside": len(loaded),
                                  "media_statuses": sorted({s for s, _ in heavy_results}),
                                  "media_seconds_max": round(max(t for _, t in heavy_results), 2)}
        finally:
            report["server_alive"] = server.poll() is None
            server.terminate()
            server.wait(timeout=30)
    return report


def summary(report: dict) -> str:
    lines = ["| bomb | status | seconds | peak over RSS (MiB) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['bomb']} | {r['status']} | {r['seconds']} | {r['peak_over_rss_mib']} |" for r in report["bombs"]]
    fuzz = report["fuzz"]
    lines += ["", "| requests | statuses | 5xx | crashes | server alive | peak over RSS (MiB) |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| {fuzz['requests']} | {', '.join(f'{k}: {v}' for k, v in fuzz['statuses'].items())} | {fuzz['5xx']} | "
              f"{sum(v for k, v in fuzz['statuses'].items() if k.startswith('-'))} | {report['server_alive']} | "
              f"{fuzz['peak_over_rss_mib']} |"]
    load = report["load"]
    lines += ["", f"text latency: {load['text_alone_s']} s alone, {load['text_beside_8_media_s']} s beside 8 media "
                  f"requests (median of {load['text_requests_beside']}; media answered {load['media_statuses']}, "
                  f"the slowest in {load['media_seconds_max']} s)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: a micro random model)")
    parser.add_argument("--requests", type=int, default=760, help="adversarial requests in the fuzz phase")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds before the fuzz phase stops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--media-workers", type=int, default=2, help="the server's --media-workers")
    parser.add_argument("--max-bomb-mib", type=float, default=300.0, help="peak memory a bomb may add")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_server.json")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    bad = [r for r in report["bombs"] if r["peak_over_rss_mib"] > args.max_bomb_mib
           or any(s not in (400, 429) for s in (r["status"] if isinstance(r["status"], list) else [r["status"]]))]
    if bad or report["fuzz"]["5xx"] or report["fuzz"]["failed"] or not report["server_alive"]:
        sys.exit(f"FAILED: {bad or report['fuzz']['failed'][:3] or 'server died'}")


if __name__ == "__main__":
    main()
