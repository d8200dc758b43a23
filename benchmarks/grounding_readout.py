"""What a model's visual tokens say, read off against the LLM's own word embeddings.

    .venv/bin/python benchmarks/grounding_readout.py --model DIR [DIR ...] --records FILE [--limit 200]
        [--data-root DIR] [--out benchmarks/results/grounding_readout.json]

`--records`: grounding records (a picture each, its objects' words and boxes as the answer, `omniola.data.boxes`),
e.g. the tiny world's `val_ground.json`. Each object token (a token whose block an object's box covers, the rule of
the `ground` objective, `omniola.training.grounding`) is read out per word place of the objects' names: for "red
circle", place 1 is the colour and place 2 the kind. The token counts as saying a word when that word's input
embedding is its nearest among the words seen at that place in the records (chance: 1 / their number). Also the
token's distance to its target (the mean of its words' embeddings) relative to the target's size.

A token that names its object's colour but not its kind cannot let the LLM pick the object out by its kind (the video
ladder's `bind` rung), however long the LLM trains: this separates what the vision side delivers from what the LLM
learns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readout(model_dir: Path, records: list[dict], root: Path) -> dict:
    import torch
    from PIL import Image

    from omniola.data.boxes import parse_boxes
    from omniola.inference import load_model
    from omniola.training.grounding import GroundingObjective

    model, processor = load_model(model_dir)
    objective = GroundingObjective(model, processor.tokenizer)
    parsed = [parse_boxes(r["conversations"][-1]["value"]) for r in records]
    places = max(len(words.split()) for objects in parsed for words, _ in objects)
    vocab = [sorted({words.split()[i] for objects in parsed for words, _ in objects if len(words.split()) > i})
             for i in range(places)]
    tables = [torch.stack([objective.phrase(w) for w in words]) for words in vocab]
    right, seen, distance = [0] * places, [0] * places, []
    for record, objects in zip(records, parsed):
        image = Image.open(root / record["image"]).convert("RGB")
        inputs = processor("<image>", images=[image])
        grids = [tuple(g) for g in inputs["image_grid_hw"].tolist()]
        with torch.no_grad():
            views = model.model.vision_tower(inputs["pixel_values"], inputs["image_grid_hw"])
            tokens = model.model.vision_connector.spatial_tokens(views, grids)[0].float()
        names, index = objective.targets(objects, tokens.shape[0], tokens.shape[1])
        for h, i in zip(tokens.reshape(-1, tokens.shape[-1]), index.flatten().tolist()):
            if i == 0:  # background
                continue
            target = objective.phrase(names[i])
            distance.append(float((h - target).norm() / target.norm()))
            for place, word in enumerate(names[i].split()):
                nearest = int(torch.cdist(h[None], tables[place]).argmin())
                right[place] += int(vocab[place][nearest] == word)
                seen[place] += 1
    return {"model": str(model_dir), "object_tokens": len(distance),
            "places": [{"words": vocab[p], "nearest_is_right": right[p] / max(seen[p], 1),
                        "chance": 1 / len(vocab[p])} for p in range(places)],
            "distance_over_size": sum(distance) / max(len(distance), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="+", required=True)
    parser.add_argument("--records", type=Path, required=True, help="grounding records (JSON list)")
    parser.add_argument("--data-root", type=Path, help="folder of the records' media (default: the file's folder)")
    parser.add_argument("--limit", type=int, default=200, help="first N records")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grounding_readout.json")
    args = parser.parse_args()
    for m in args.model:
        if not (m / "config.json").is_file():
            parser.error(f"--model {m}: not a model directory (no config.json)")
    if not args.records.is_file():
        parser.error(f"--records {args.records}: no such file")
    if args.limit < 1:
        parser.error("--limit must be positive")
    try:
        records = json.loads(args.records.read_text())[: args.limit]
    except json.JSONDecodeError as err:
        parser.error(f"--records {args.records}: not JSON ({err})")
    if not records or not all(isinstance(r, dict) and "image" in r and r.get("conversations") for r in records):
        parser.error(f"--records {args.records}: expected a list of grounding records, each with an image")
    results = [readout(m, records, args.data_root or args.records.parent) for m in args.model]
    rows = ["| model | object tokens | " + " | ".join(f"word {i + 1} right (chance)" for i in
                                                       range(len(results[0]["places"]))) + " | distance / size |"]
    rows.append("|---|---:|" + "---:|" * (len(results[0]["places"]) + 1))
    for r in results:
        cells = [f"{100 * p['nearest_is_right']:.1f}% ({100 * p['chance']:.0f}%)" for p in r["places"]]
        rows.append(f"| {r['model']} | {r['object_tokens']} | " + " | ".join(cells)
                    + f" | {r['distance_over_size']:.2f} |")
    print("\n".join(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"records": str(args.records), "limit": args.limit, "results": results}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
