"""Quality of the embedded default model: the tiny world's held-out test split, and forgetting of plain text.

    .venv/bin/python benchmarks/quality_default.py [--model DIR] [--limit 100] [--out benchmarks/results]

Scores (`omniola.evaluation`, greedy, seed 0) per kind of the tiny world's test split — exact match for QA, word
error rate for ASR — against the issue's targets, and the LLM's perplexity on a fixed English text sample
(`benchmarks/text_sample.txt`, general prose unrelated to the tiny world) for the trained model and for the
untrained assembly of the same pretrained parts (`omniola build` with the recipe's build spec), so catastrophic
forgetting would show. Writes `quality_default.json` and the per-sample predictions under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {  # kind: (metric, target, higher is better)
    "image_qa": ("accuracy", 0.90, True),
    "asr": ("wer", 0.15, False),
    "video_visual_qa": ("accuracy", 0.80, True),
    "video_cross_qa": ("accuracy", 0.80, True),
}


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """Token-level perplexity of `text` under the model's LLM (non-overlapping windows)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1][None]
        out = model(input_ids=chunk, labels=chunk)
        n = chunk.shape[1] - 1
        nll += float(out.loss) * n
        count += n
    return math.exp(nll / count)


def main() -> None:
    from omniola.components import BuildSpec, build_model
    from omniola.evaluation import evaluate
    from omniola.inference import default_model_dir, load_model
    from omniola.training import load_recipe
    from omniola.training.recipe import packaged_recipe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="trained model (default: the default model)")
    parser.add_argument("--data", type=Path, default=None, help="tiny world (default: <omniola home>/data/tiny)")
    parser.add_argument("--limit", type=int, default=100, help="questions per kind")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model_dir = args.model or default_model_dir()
    model, processor = load_model(model_dir)
    start = time.perf_counter()
    result = evaluate(model, processor, "tiny", data=args.data, batch_size=args.batch_size, limit=args.limit,
                      out=args.out / "quality_default_eval")
    eval_s = time.perf_counter() - start
    text = (ROOT / "benchmarks" / "text_sample.txt").read_text()
    ppl_trained = perplexity(model, processor.tokenizer, text)
    del model
    base, base_processor = build_model(BuildSpec(**load_recipe(packaged_recipe("tiny")).model["build"]))
    ppl_base = perplexity(base.float().eval(), base_processor.tokenizer, text)

    rows = []
    for kind, score in sorted(result["scores"].items()):
        metric, value = score["metric"], score["score"]
        target = TARGETS.get(kind)
        met = None if target is None or value is None else (value >= target[1] if target[2] else value <= target[1])
        rows.append({"kind": kind, "metric": metric, "value": value, "n": score["evaluated"],
                     "target": None if target is None else target[1], "met": met})
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": str(model_dir),
        "limit_per_kind": args.limit,
        "scores": rows,
        "perplexity": {"untrained_assembly": ppl_base, "trained": ppl_trained,
                       "text": "benchmarks/text_sample.txt"},
        "eval_wall_s": round(eval_s, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_default.json").write_text(json.dumps(report, indent=2))
    print(f"\nquality of {model_dir} on the tiny world's test split ({args.limit} questions per kind)\n")
    print(f"| {'kind':18} | {'metric':8} | {'value':>6} | {'n':>4} | {'target':>7} | met |")
    print(f"|{'-' * 20}|{'-' * 10}|{'-' * 8}|{'-' * 6}|{'-' * 9}|-----|")
    for r in rows:
        target = "" if r["target"] is None else (f"<= {r['target']:.2f}" if r["metric"] == "wer"
                                                 else f">= {r['target']:.2f}")
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"| {r['kind']:18} | {r['metric']:8} | {r['value']:6.3f} | {r['n'] or '':>4} | {target:>7} | {met:3} |")
    print(f"\nLLM perplexity on benchmarks/text_sample.txt: untrained assembly {ppl_base:.2f}, trained "
          f"{ppl_trained:.2f} (ratio {ppl_trained / ppl_base:.3f})")
    print(f"evaluation took {eval_s:.0f} s; wrote {args.out / 'quality_default.json'}")


if __name__ == "__main__":
    main()
