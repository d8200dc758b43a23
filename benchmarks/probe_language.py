"""Perception removed: how well the LLM alone answers the tiny world's picture questions, in training phrasings and
in out-of-template ones, when the picture is given as a perfect text description.

    .venv/bin/python benchmarks/probe_language.py [--steps 200] [--batch-size 16] [--questions 240]

The pictures are the tiny world's drawn ones (`omniola.data.pictures`), described by their exact caption ("a small
red circle at the top left and a big blue triangle at the right"); the questions come from `omniola.data.language`
(11 intents). Two measurements of SmolLM2-135M-Instruct, the default model's LLM:

1. *untrained*: the likeliest answer among the intent's candidates (yes / no, the 8 colours, the 3 shapes, 1-3,
   left / right), scored by the LLM's log-likelihood after the chat prompt;
2. *LoRA-trained on text*: LoRA (r 16 on every projection, as the recipes) trained for `--steps` steps on
   description + training-phrased question -> answer, then greedy answers to new pictures asked in training
   phrasings and in out-of-template phrasings (exact match).

What the second leaves is the LLM's own generalisation to phrasings it never saw; the gap between it and the
default model's scores is what perception (the vision tower, the connector and the LLM's reading of visual tokens)
costs. Writes `probe_language.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {"color": "colors", "color_of": "colors", "shape": "shapes", "shape_of": "shapes", "count": "counts",
              "side": "sides"}


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from omniola.components import load_llm
    from omniola.data import language
    from omniola.data.pictures import caption, plan_picture
    from omniola.evaluation.metrics import exact_match
    from omniola.training.recipe import LoraSpec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="LoRA steps on text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--questions", type=int, default=240, help="per phrasing family")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    llm, tok = load_llm("smollm2")
    answers = {"colors": language.COLOR_WORDS, "shapes": language.SHAPE_WORDS, "counts": ("1", "2", "3"),
               "sides": ("left", "right"), "yes_no": ("yes", "no")}

    def chat(picture: dict, text: str) -> str:
        messages = [{"role": "system", "content": ""},
                    {"role": "user", "content": f"The picture shows {caption(picture)}.\n{text}"}]
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def questions(family: str, seed: int, n: int) -> list[tuple[dict, language.Question]]:
        rng, out = random.Random(seed), []
        for _ in range(n):
            picture = plan_picture(rng, "train")
            out.append((picture, language.ask_about(picture, family, rng, n=1)[0]))
        return out

    def tally(results: dict, family: str, intent: str, right: bool) -> None:
        for key in (family, f"{family}/{intent}"):
            results[key][0] += int(right)
            results[key][1] += 1

    @torch.no_grad()
    def likeliest(prompt: str, options: tuple[str, ...]) -> str:
        n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
        enc = tok([prompt + o for o in options], return_tensors="pt", padding=True, add_special_tokens=False)
        logp = llm(**enc).logits.log_softmax(-1)
        scores = [sum(float(logp[i, t - 1, enc.input_ids[i, t]])
                      for t in range(n_prompt, int(enc.attention_mask[i].sum())))
                  for i in range(len(options))]
        return options[max(range(len(options)), key=scores.__getitem__)]

    tok.padding_side = "right"
    llm.eval()
    untrained: dict = defaultdict(lambda: [0, 0])
    for family in language.GRAMMARS:
        for picture, q in questions(family, 7, args.questions):
            options = answers[CANDIDATES.get(q.intent, "yes_no")]
            tally(untrained, family, q.intent, likeliest(chat(picture, q.text), options) == q.answer)

    model = get_peft_model(llm, LoraConfig(r=16, lora_alpha=32, target_modules=LoraSpec().targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    rng, start = random.Random(1), time.perf_counter()
    for step in range(args.steps):
        prompts, texts = [], []
        for _ in range(args.batch_size):
            picture = plan_picture(rng, "train")
            q = language.ask_about(picture, "train", rng, n=1)[0]
            prompts.append(chat(picture, q.text))
            texts.append(prompts[-1] + q.answer + tok.eos_token)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        for i, prompt in enumerate(prompts):
            labels[i, : len(tok(prompt, add_special_tokens=False).input_ids)] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - start

    model.eval()
    tok.padding_side = "left"
    trained: dict = defaultdict(lambda: [0, 0])
    for family in language.GRAMMARS:
        items = questions(family, 99, args.questions)
        for i in range(0, len(items), 16):
            chunk = items[i : i + 16]
            enc = tok([chat(p, q.text) for p, q in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=6, do_sample=False)
            for (_, q), ids in zip(chunk, out[:, enc.input_ids.shape[1] :]):
                answer = tok.decode(ids, skip_special_tokens=True).strip()
                tally(trained, family, q.intent, exact_match(answer, q.answer))

    def table(results: dict) -> dict:
        return {k: {"right": r, "of": n, "accuracy": r / n} for k, (r, n) in sorted(results.items())}

    report = {"llm": "SmolLM2-135M-Instruct", "questions_per_family": args.questions, "lora_steps": args.steps,
              "batch_size": args.batch_size, "lora_train_s": round(train_s, 1),
              "untrained_choice": table(untrained), "lora_trained_generation": table(trained)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_language.json").write_text(json.dumps(report, indent=2))
    print("\n| phrasing | untrained LLM, likeliest answer | LLM after LoRA on text |\n|---|---:|---:|")
    for family in language.GRAMMARS:
        u, t = report["untrained_choice"][family], report["lora_trained_generation"][family]
        print(f"| {family} | {100 * u['accuracy']:.1f}% | {100 * t['accuracy']:.1f}% |")
    print(f"\nwrote {args.out / 'probe_language.json'}")


if __name__ == "__main__":
    main()
