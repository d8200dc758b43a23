"""Streaming speech vs "generate everything, then synthesise", side by side on the default model.

    .venv/bin/python benchmarks/bench_speech.py [--model DIR] [--repeats 3]

For a prompt whose answer runs to about three sentences, each round measures, in alternation:
  streaming      `Engine.submit(..., voice=PiperBackend())`: time to first audio (sentence by sentence while
                 generation continues)
  non-streaming  generate the whole answer, then synthesise it in one call: the first audio exists only then
Both generate the same greedy answer of exactly --tokens tokens (about three sentences). Target: streaming time to first audio <= 40% of the
non-streaming time. Writes benchmarks/results/speech.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me three facts about the moon, one short sentence each."
TARGET_RATIO = 0.4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=60, help="answer length (min = max, so both paths match)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speech.json")
    args = parser.parse_args()

    from omniola.cli import ensure_default_model
    from omniola.generation import Engine, GenerationOptions
    from omniola.inference import load_model
    from omniola.speech import PiperBackend

    model, processor = load_model(args.model or ensure_default_model(), device="cpu")
    backend = PiperBackend()
    backend.synthesize("Warm up.")  # load the voice before timing
    inputs = processor.apply_chat_template([{"role": "user", "content": PROMPT}])

    engine = Engine(model, processor, max_batch=1)
    options = GenerationOptions(max_new_tokens=args.tokens, ignore_eos=True)
    engine.generate(inputs, options)  # warm-up
    streaming, whole, answer = [], [], ""
    for _ in range(args.repeats):
        streaming.append(engine.submit(inputs, options, voice=backend).result().timings)
        start = time.perf_counter()
        answer = engine.generate(inputs, options).text
        generated = time.perf_counter()
        backend.synthesize(answer)
        whole.append({"generate_s": generated - start, "time_to_first_audio_s": time.perf_counter() - start})

    ttfa_stream = statistics.median(t["time_to_first_audio_s"] for t in streaming)
    ttfa_whole = statistics.median(t["time_to_first_audio_s"] for t in whole)
    summary = {
        "answer": answer,
        "sentences": streaming[-1]["num_chunks"],
        "streaming_time_to_first_token_s": statistics.median(t["time_to_first_token_s"] for t in streaming),
        "streaming_time_to_first_audio_s": ttfa_stream,
        "streaming_total_s": statistics.median(t["total_s"] for t in streaming),
        "non_streaming_time_to_first_audio_s": ttfa_whole,
        "ratio": ttfa_stream / ttfa_whole,
        "target_ratio": TARGET_RATIO,
    }
    print(f"answer ({summary['sentences']} spoken pieces): {answer!r}")
    print(f"{'path':<15} {'first token s':>14} {'first audio s':>14} {'total s':>9}")
    print(f"{'streaming':<15} {summary['streaming_time_to_first_token_s']:>14.2f} {ttfa_stream:>14.2f} "
          f"{summary['streaming_total_s']:>9.2f}")
    print(f"{'non-streaming':<15} {'':>14} {ttfa_whole:>14.2f} {ttfa_whole:>9.2f}")
    print(f"time to first audio: streaming / non-streaming = {summary['ratio']:.2f} (target <= {TARGET_RATIO})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary,
                                    "streaming": streaming, "non_streaming": whole}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
