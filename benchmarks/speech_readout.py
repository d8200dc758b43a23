"""What a model's audio connector transcribes by itself: greedy CTC decoding of its speech tokens, scored by WER.

    .venv/bin/python benchmarks/speech_readout.py --model DIR [DIR ...] --world DIR [--blank FILE]
        [--splits test oot] [--limit 100] [--out benchmarks/results/speech_readout.json]

For the tiny world's ASR clips (`asr` records of each split), each of the audio connector's content tokens is read
as its nearest row of the LLM's input-embedding table or as CTC's blank (cosine, as the `ctc` objective scores them),
runs merge, blanks drop (`omniola.training.ctc.greedy_readout`), and the token ids are detokenized: the connector's
own transcript, with no LLM. Its word error rate (the evaluation's English normaliser, micro-averaged like `omniola
eval`) says how much of the speech reaches the LLM as its own words: the gap to the model's ASR WER (`omniola eval
--task tiny --kinds asr`) is what the LLM loses reading them, the gap to Whisper's own decoder (the anchor) what the
connector loses. Beside it: the share of the references' words that no training transcript of the world has
(`train_asr*.json`), words a connector aligned by CTC onto its transcripts was never taught to say.

The blank is the one a `ctc` stage saves beside its model (`RUN/NN-speech-ctc/ctc_blank.safetensors`); by default it
is looked for next to each `--model` (`DIR/../ctc_blank.safetensors`). A model trained further after the CTC stage
(its connector moved by the LLM's loss) is read with the CTC stage's blank, given with `--blank`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readout(model_dir: Path, blank_path: Path, world: Path, splits: list[str], limit: int) -> dict:
    import torch
    from tqdm import tqdm

    from omniola.evaluation import english_normalizer, word_error_rate
    from omniola.inference import load_model
    from omniola.training.ctc import clip_content_tokens, greedy_readout, load_ctc_blank

    model, processor = load_model(model_dir)
    blank = load_ctc_blank(blank_path)
    table = model.get_input_embeddings().weight.detach().float()
    specials = torch.tensor(processor.tokenizer.all_special_ids)
    normalizer = english_normalizer(model_dir)
    trained = {w for f in sorted(world.glob("train_asr*.json")) for r in json.loads(f.read_text())
               for w in normalizer(r["conversations"][-1]["value"]).split()}
    result = {}
    for split in splits:
        records = json.loads((world / f"{split}_asr.json").read_text())[:limit]
        references, hypotheses = [], []
        for record in tqdm(records, desc=f"{model_dir.name} {split}"):
            ids = greedy_readout(table, blank, clip_content_tokens(model, processor, world / record["audio"]), specials)
            references.append(record["conversations"][-1]["value"])
            hypotheses.append(" ".join(processor.tokenizer.decode(ids).split()))
        scores = word_error_rate(references, hypotheses, normalizer=normalizer)
        said = [w for r in references for w in normalizer(r).split()]
        unseen = sum(w not in trained for w in said) / max(len(said), 1)
        result[split] = {**scores, "unseen_words": round(unseen, 4), "examples": [{"reference": r, "readout": h}
                                                for r, h in zip(references[:3], hypotheses[:3])]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, nargs="+", required=True)
    parser.add_argument("--world", type=Path, required=True, help="a built tiny world")
    parser.add_argument("--blank", type=Path, default=None,
                        help="the CTC stage's ctc_blank.safetensors (default: beside each model folder)")
    parser.add_argument("--splits", nargs="+", default=["test", "oot"])
    parser.add_argument("--limit", type=int, default=100, help="ASR clips per split")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speech_readout.json")
    args = parser.parse_args()
    blanks = {m: args.blank or m.parent / "ctc_blank.safetensors" for m in args.model}
    needed = [args.world / "manifest.json", *(args.world / f"{s}_asr.json" for s in args.splits),
              *(m / "config.json" for m in args.model), *blanks.values()]
    for path in needed:
        if not path.is_file():
            sys.exit(f"error: {path} does not exist")
    results = {str(m): {"blank": str(blanks[m]), **readout(m, blanks[m], args.world, args.splits, args.limit)}
               for m in args.model}
    print("| model | split | readout WER | clips | words never in a training transcript | e.g. reference -> readout |")
    print("|---|---|---:|---:|---:|---|")
    for model, row in results.items():
        for split in args.splits:
            example = row[split]["examples"][0]
            print(f"| {model} | {split} | {row[split]['wer']:.1%} | {row[split]['utterances']} | "
                  f"{row[split]['unseen_words']:.1%} | {example['reference']} -> {example['readout']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
