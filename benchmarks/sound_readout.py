"""What a model's audio tokens say about sounds, read off against the LLM's own word embeddings.

    .venv/bin/python benchmarks/sound_readout.py --model DIR [DIR ...] --world DIR [--splits test oot]
        [--limit 150] [--out benchmarks/results/sound_readout.json]

For the tiny world's sound questions (`audio_qa`) and the clips' sound questions (`video_audio_qa` of `move_beeps`
and `change_tone`), each of the audio connector's tokens is read as its nearest word in the LLM's input-embedding
table (cosine, as the `ctc` objective scores it), runs of the same token collapse to one, and the answer is read off
the words: the number of "beep"s, "high" or "low", and the kind (any "beep" -> beeps, "tone" -> tone, "noise" ->
noise). The connector's layout vectors are left out.

A connector grounded by the `ctc` objective on `audio_caption` records says what it hears in words; one trained only
through the LLM's loss need not (its readout says nothing about what the LLM can use, only about grounding). So the
readout separates what the audio side delivers from what the LLM learns to do with it, like `grounding_readout.py`
does for pictures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def words_heard(model, processor, table, audio_path: Path) -> list[str]:
    """The collapsed nearest-word sequence of one clip's audio tokens; `table`: the LLM's input embeddings,
    normalised."""
    import torch.nn.functional as F

    from omniola.training.ctc import clip_content_tokens

    clip = clip_content_tokens(model, processor, audio_path).float()
    nearest = (F.normalize(clip, dim=-1) @ table.T).argmax(-1).tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(nearest)
    return [t.replace("Ġ", "").lower() for j, t in enumerate(tokens) if j == 0 or t != tokens[j - 1]]


def read_answer(words: list[str], question: str, beep: str) -> str:
    """The answer the words give to a sound question of type `question` (count / pitch / kind); `beep` is the first
    token of " beep" (SmolLM2 spells it " be" + "ep")."""
    if question == "count":
        return str(words.count(beep))
    if question == "pitch":
        said = [w for w in words if w in ("high", "low")]
        return said[0] if said else ""
    return "beeps" if beep in words else "tone" if "tone" in words else "noise" if "noise" in words else ""


def questions(world: Path, split: str, limit: int) -> list[tuple[str, Path, str, str]]:
    """`(qtype, audio path, answer, kind)` of a split's sound questions."""
    out = []
    for record in json.loads((world / f"{split}_audio_qa.json").read_text())[:limit]:
        out.append((record["meta"]["qtype"], world / record["audio"], record["conversations"][-1]["value"], "audio_qa"))
    qtype = {"move_beeps": "count", "change_tone": "pitch"}
    for record in json.loads((world / f"{split}_video_audio_qa.json").read_text())[:limit]:
        if record["meta"]["template"] in qtype:
            out.append((qtype[record["meta"]["template"]], world / record["audio"],
                        record["conversations"][-1]["value"], "video_audio_qa"))
    return out


def readout(model_dir: Path, world: Path, splits: list[str], limit: int) -> dict:
    import torch.nn.functional as F
    from tqdm import tqdm

    from omniola.inference import load_model

    model, processor = load_model(model_dir)
    table = F.normalize(model.get_input_embeddings().weight.detach().float(), dim=-1)  # once, not per clip
    beep = processor.tokenizer.tokenize(" beep")[0].replace("Ġ", "").lower()
    result = {}
    for split in splits:
        right, seen, examples = defaultdict(int), defaultdict(int), {}
        for qtype, path, answer, kind in tqdm(questions(world, split, limit), desc=f"{model_dir.name} {split}"):
            words = words_heard(model, processor, table, path)
            key = f"{kind}/{qtype}"
            right[key] += int(read_answer(words, qtype, beep) == answer)
            seen[key] += 1
            examples.setdefault(key, {"answer": answer, "words": " ".join(words)})
        result[split] = {key: {"accuracy": round(right[key] / seen[key], 3), "n": seen[key],
                               "example": examples[key]} for key in sorted(seen)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, nargs="+", required=True)
    parser.add_argument("--world", type=Path, required=True, help="a built tiny world")
    parser.add_argument("--splits", nargs="+", default=["test", "oot"])
    parser.add_argument("--limit", type=int, default=150, help="records per kind and split")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sound_readout.json")
    args = parser.parse_args()
    for path in [args.world / "manifest.json", *(m / "config.json" for m in args.model)]:
        if not path.is_file():
            sys.exit(f"error: {path} does not exist")
    results = {str(m): readout(m, args.world, args.splits, args.limit) for m in args.model}
    for model, splits in results.items():
        print(f"\n{model}")
        print(f"| split | question | readout accuracy | n | e.g. answer: words |\n|---|---|---:|---:|---|")
        for split, rows in splits.items():
            for key, row in rows.items():
                example = row["example"]
                print(f"| {split} | {key} | {row['accuracy']:.1%} | {row['n']} | {example['answer']}: "
                      f"{example['words'][:60]} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
