"""Why a weight format changes some greedy answers: fp32's logit margin where the format's answer parts from fp32's.

    .venv/bin/python benchmarks/flip_margins.py --model MODEL --quality-dir QDIR --formats gguf-q8_0 gguf-lora

QDIR holds `omniola eval --task tiny --model MODEL --weights FORMAT --out QDIR/FORMAT` outputs, `fp32` among them
(as for `bench_decode.py --quality-dir`). For every test-split question whose answer under a format differs from
fp32's, the fp32 model reads the question and fp32's answer in one forward pass, and the margin at the first token
where the two answers part is reported: fp32's logit for its own token minus its logit for the format's. Beside it,
for the answers that agree, fp32's smallest margin between its first and second choice along the answer. Flips at
margins far below the agreeing answers' are near-ties that any rounding of the computation breaks; flips at large
margins would be a broken kernel. Writes `benchmarks/results/flip_margins.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _answers(quality_dir: Path, fmt: str) -> dict[str, dict]:
    path = quality_dir / fmt / "tiny.predictions.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: missing; run omniola eval --task tiny --weights {fmt} --out {path.parent} first")
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["id"]: r for r in rows if r.get("split") == "test" and r.get("prediction") is not None}


def _margins(model, processor, sample, answer: list[int]):
    """fp32's logits `(len(answer), V)` at each answer position, reading the question and `answer`."""
    import torch

    inputs = processor.apply_chat_template([sample.get_messages()], add_generation_prompt=True,
                                           use_audio_in_video=sample.use_audio_in_video)
    extra = torch.tensor([answer])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    start = inputs["input_ids"].shape[1] - len(answer) - 1
    return logits[start:start + len(answer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--quality-dir", type=Path, required=True)
    parser.add_argument("--formats", nargs="+", required=True)
    parser.add_argument("--data", type=Path, default=None, help="the tiny world (default: $OMNIOLA_HOME's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flip_margins.json")
    args = parser.parse_args()

    from omniola.evaluation.tasks import load_tiny
    from omniola.inference import load_model

    reference = _answers(args.quality_dir, "fp32")
    formats = {fmt: _answers(args.quality_dir, fmt) for fmt in args.formats}
    model, processor = load_model(args.model, weights="fp32")
    tokenizer = processor.tokenizer
    end = model.generation_config.eos_token_id
    end = end[0] if isinstance(end, list) else end
    samples = {s.id: s for s in load_tiny(args.data, split="test").samples}
    ids = sorted(set(reference) & set().union(*map(set, formats.values())) & set(samples))

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [end]

    agreeing, flips = {}, {fmt: [] for fmt in formats}
    for qid in ids:
        ours = tokens(reference[qid]["prediction"])
        logits = _margins(model, processor, samples[qid], ours)
        top2 = logits.topk(2, dim=-1).values
        agreeing[qid] = float((top2[:, 0] - top2[:, 1]).min())
        for fmt, answers in formats.items():
            if qid not in answers or answers[qid]["prediction"] == reference[qid]["prediction"]:
                continue
            theirs = tokens(answers[qid]["prediction"])
            k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            if k is None:  # the same tokens (answers that differ in spacing only)
                continue
            flips[fmt].append({"id": qid, "kind": reference[qid]["kind"], "position": k,
                               "fp32": reference[qid]["prediction"], fmt: answers[qid]["prediction"],
                               "margin": round(float(logits[k, ours[k]] - logits[k, theirs[k]]), 4)})
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": str(args.model), "questions": len(ids),
              "agreeing_min_margin": {q: round(m, 4) for q, m in agreeing.items()}, "flips": flips}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    margins = sorted(agreeing.values())
    print(f"fp32's smallest top-1/top-2 margin along each of {len(ids)} test answers: median "
          f"{statistics.median(margins):.2f}, 10th percentile {margins[len(margins) // 10]:.2f}, "
          f"under 0.5: {sum(m < 0.5 for m in margins)}")
    print("| format | answers changed | fp32 margin at the parting token: median | max | answers with a smaller "
          "margin somewhere |")
    print("|---|---:|---:|---:|---:|")
    for fmt, rows in flips.items():
        if not rows:
            print(f"| {fmt} | 0 of {len(ids)} | | | |")
            continue
        values = sorted(r["margin"] for r in rows)
        below = sum(m <= values[-1] for m in margins)
        print(f"| {fmt} | {len(rows)} of {len(ids)} | {statistics.median(values):.3f} | {values[-1]:.3f} | "
              f"{below} of {len(ids)} |")


if __name__ == "__main__":
    main()
