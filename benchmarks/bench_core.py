"""Core inference benchmark on the default offline model: per modality, where the time and memory go.

    .venv/bin/python benchmarks/bench_core.py [--model DIR] [--repeats 3] [--decode-tokens 32]

For each case (text, image, 3 s audio, 30 s audio, 8-frame video with its sound track) a fresh subprocess loads the
model, warms up once, and measures (median of --repeats):
  encode_s   media encoders + connectors (`embed_multimodal`)
  prefill_s  one LLM forward over the whole prompt with a KV cache
  ttft_s     time to first token through the generation engine (encode + prefill + first step)
  decode_tps tokens/s after the first token (greedy, exactly --decode-tokens tokens)
  peak_rss   peak resident memory of that subprocess
The decode bound set by memory bandwidth is (measured read bandwidth) / (bytes of LLM weights read per token);
`decode_vs_bound` is the measured rate over that bound. Also printed: LLM tokens of a 3 s clip, variable-length vs
Ola's fixed 30 s padding. Writes benchmarks/results/core.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CASES = ["text", "image", "audio_3s", "audio_30s", "video_8f"]
TARGETS = {"ttft_audio_3s_s": 0.5, "decode_vs_bound": 0.5, "audio_3s_token_ratio": 1 / 8}


def _speech(seconds: float) -> np.ndarray:
    """The example spoken question, repeated (with short pauses) to `seconds` at 16 kHz."""
    from omniola.media import load_audio

    q = load_audio(EXAMPLES / "question.wav")
    unit = np.concatenate([q, np.zeros(int(0.3 * 16000), np.float32)])
    reps = int(np.ceil(seconds * 16000 / len(unit)))
    return np.tile(unit, reps)[: int(seconds * 16000)]


def _messages(case: str) -> list[dict]:
    content = {
        "text": [{"type": "text", "text": "Name three primary colours and say one thing about each."}],
        "image": [{"type": "image", "image": str(EXAMPLES / "shapes.png")},
                  {"type": "text", "text": "Describe the picture."}],
        "audio_3s": [{"type": "audio", "audio": (_speech(3.0), 16000)}],
        "audio_30s": [{"type": "audio", "audio": (_speech(30.0), 16000)}],
        "video_8f": [{"type": "video", "video": str(EXAMPLES / "clip.mp4")},
                     {"type": "text", "text": "What happens in this video?"}],
    }[case]
    return [{"role": "user", "content": content}]


def _llm_bytes_per_token(model) -> int:
    """Bytes of weights the LLM reads to decode one token: every matrix except the embedding lookup, plus the head."""
    lm = model.model.language_model
    embed = lm.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embed)
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def _read_bandwidth_gbs() -> float:
    import torch

    x = torch.ones(256 * 1024 * 1024 // 4 * 4, dtype=torch.float32)  # 1 GiB
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def _gemv_bandwidth_gbs(model) -> float:
    """Bandwidth torch's own matrix-vector product reaches on the LM head alone: the kernel's ceiling for decoding."""
    import torch
    import torch.nn.functional as F

    weight = model.lm_head.weight.detach()
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(10):
            t = time.perf_counter()
            F.linear(x, weight)
            best = min(best, time.perf_counter() - t)
    return weight.numel() * weight.element_size() / best / 1e9


def run_case(case: str, model_dir: Path, repeats: int, decode_tokens: int) -> dict:
    import torch

    from omniola.generation import Engine, GenerationOptions
    from omniola.inference import load_model
    from omniola.modeling_ola import PREFILL_ONLY_INPUTS

    torch.manual_seed(0)
    model, processor = load_model(model_dir, device="cpu")
    inputs = processor.apply_chat_template(_messages(case))
    media = {k: inputs[k] for k in PREFILL_ONLY_INPUTS if k in inputs}
    engine = Engine(model, processor, max_batch=1)
    options = GenerationOptions(max_new_tokens=decode_tokens, ignore_eos=True)
    encode, prefill, ttft, tps = [], [], [], []
    for i in range(repeats + 1):  # the first round warms up
        with torch.inference_mode():
            t0 = time.perf_counter()
            embeds = model.model.embed_multimodal(inputs["input_ids"], **media)
            t1 = time.perf_counter()
            model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=True)
            t2 = time.perf_counter()
        timings = engine.generate(inputs, options).timings
        if i:
            encode.append(t1 - t0)
            prefill.append(t2 - t1)
            ttft.append(timings["time_to_first_token_s"])
            tps.append(timings["tokens_per_s"])
    return {
        "case": case,
        "prompt_tokens": processor.modality_token_counts(inputs["input_ids"]),
        "encode_s": statistics.median(encode),
        "prefill_s": statistics.median(prefill),
        "ttft_s": statistics.median(ttft),
        "decode_tps": statistics.median(tps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "llm_bytes_per_token": _llm_bytes_per_token(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "core.json")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.model is None:
        from omniola.cli import ensure_default_model

        args.model = ensure_default_model()
    if args.case:
        print(json.dumps(run_case(args.case, args.model, args.repeats, args.decode_tokens)))
        return

    from omniola.inference import load_model

    bandwidth = _read_bandwidth_gbs()
    rows = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--model", str(args.model), "--repeats", str(args.repeats),
               "--decode-tokens", str(args.decode_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["decode_bound_tps"] = bandwidth * 1e9 / row["llm_bytes_per_token"]
        row["decode_vs_bound"] = row["decode_tps"] / row["decode_bound_tps"]
        rows.append(row)
        print(f"  measured {case}", file=sys.stderr)

    model, processor = load_model(args.model, device="cpu")
    gemv = _gemv_bandwidth_gbs(model)
    variable = processor.num_audio_tokens(3 * 16000)
    fixed = type(processor)(processor.tokenizer, processor.feature_extractor, processor.settings,
                            audio_padding="fixed").num_audio_tokens(3 * 16000)

    header = f"{'case':<10} {'tokens (mm/text)':>17} {'encode s':>9} {'prefill s':>10} {'TTFT s':>8} " \
             f"{'decode tok/s':>13} {'bound tok/s':>12} {'vs bound':>9} {'peak RSS MB':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        counts = r["prompt_tokens"]
        tokens = f"{counts['image'] + counts['video'] + counts['audio']}/{counts['text']}"
        print(f"{r['case']:<10} {tokens:>17} "
              f"{r['encode_s']:>9.3f} {r['prefill_s']:>10.3f} {r['ttft_s']:>8.3f} {r['decode_tps']:>13.1f} "
              f"{r['decode_bound_tps']:>12.1f} {r['decode_vs_bound']:>9.0%} {r['peak_rss_mb']:>12.0f}")
    audio3 = next(r for r in rows if r["case"] == "audio_3s")
    summary = {
        "read_bandwidth_gbs": bandwidth,
        "gemv_bandwidth_gbs": gemv,
        "llm_bytes_per_token": rows[0]["llm_bytes_per_token"],
        "audio_3s_tokens_variable": variable,
        "audio_3s_tokens_fixed_30s": fixed,
        "audio_3s_token_ratio": variable / fixed,
        "ttft_audio_3s_s": audio3["ttft_s"],
        "decode_vs_bound": min(r["decode_vs_bound"] for r in rows),
    }
    print(f"\nmemory read bandwidth {bandwidth:.1f} GB/s (torch sum); torch's matrix-vector product alone reaches "
          f"{gemv:.1f} GB/s; LLM weights read per token {summary['llm_bytes_per_token'] / 1e6:.0f} MB")
    print(f"3 s clip: {variable} LLM tokens variable-length vs {fixed} with Ola's 30 s padding "
          f"(ratio {variable / fixed:.3f}, target <= {TARGETS['audio_3s_token_ratio']:.3f})")
    print(f"TTFT 3 s audio question {audio3['ttft_s']:.3f} s (target < {TARGETS['ttft_audio_3s_s']} s); "
          f"worst decode vs bandwidth bound {summary['decode_vs_bound']:.0%} (target >= 50%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
            "model": str(args.model), "repeats": args.repeats, "decode_tokens": args.decode_tokens}
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "targets": TARGETS, "cases": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
