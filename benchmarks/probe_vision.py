"""What the vision side of a model sees: linear probes on its vision tower and connector features.

    .venv/bin/python benchmarks/probe_vision.py [--model DIR] [--out benchmarks/results]

Draws single shapes on 64x64 white pictures exactly as the tiny world's videos do (random shape, colour and place),
encodes them as the model encodes a picture, and fits a linear classifier (multinomial logistic regression, L2) on
900 pictures, scored on 300 others, for:

- the shape (3 classes, chance 33%) at the videos' shape size (16 px) and at 24 and 32 px;
- the shape's horizontal place (left / middle / right third, chance 33%) at 16 px, the cue for motion direction;

each from two feature sets: the tower's patch features averaged over the picture, and the connector's output tokens
(what the LLM receives) concatenated in order. High probe accuracy with low QA accuracy on the same property means
the information reaches the LLM and the LLM has not learned to use it. Writes `probe_vision.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = 900, 300


def draw(n: int, size: int, seed: int):
    """`n` pictures of one shape each, with their shape index and horizontal third."""
    from PIL import Image, ImageDraw

    from omniola.data.tiny_world import COLORS, SHAPES, VIDEO_SIZE, _draw_shape

    rng = random.Random(seed)
    pictures, shapes, thirds = [], [], []
    lo, hi = size // 2 + 2, VIDEO_SIZE - size // 2 - 2
    for _ in range(n):
        picture = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), "white")
        shape, x = rng.randrange(len(SHAPES)), rng.randint(lo, hi)
        _draw_shape(ImageDraw.Draw(picture), SHAPES[shape], rng.choice(list(COLORS)), x, rng.randint(lo, hi),
                    size=size)
        pictures.append(picture)
        shapes.append(shape)
        thirds.append(min(2, x * 3 // VIDEO_SIZE))
    return pictures, torch.tensor(shapes), torch.tensor(thirds)


@torch.no_grad()
def features(model, processor, pictures, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(tower patch features averaged per picture, connector tokens concatenated per picture)."""
    tower, connector = [], []
    for i in range(0, len(pictures), batch):
        chunk = pictures[i : i + batch]
        inputs = processor(["<image>"] * len(chunk), images=chunk)
        views = model.model.vision_tower(inputs["pixel_values"], inputs["image_grid_hw"])
        per_image = model.model.views_per_image
        tower += [torch.cat(views[j : j + per_image]).mean(0) for j in range(0, len(views), per_image)]
        tokens = model.model.get_image_features(None, inputs["image_grid_hw"], tower_states=torch.cat(views))
        connector += [t.flatten() for t in tokens]
    return torch.stack(tower).float(), torch.stack(connector).float()


def probe(x_train, y_train, x_test, y_test, classes: int = 3, l2: float = 1e-3) -> float:
    """Test accuracy of an L2-regularised logistic regression fitted with L-BFGS on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(((x_test @ weight + bias).argmax(1) == y_test).float().mean())


def main() -> None:
    from omniola.inference import default_model_dir, load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = args.model or default_model_dir()
    model, processor = load_model(model_dir, device="cpu")  # float32

    rows = []
    for size in (16, 24, 32):
        (train, shape_train, third_train), (test, shape_test, third_test) = draw(TRAIN, size, 1), draw(TEST, size, 2)
        feats_train, feats_test = features(model, processor, train), features(model, processor, test)
        targets = [("shape", shape_train, shape_test)] + ([("place", third_train, third_test)] if size == 16 else [])
        for name, y_train, y_test in targets:
            rows.append({"property": name, "shape_px": size,
                         **{f"{where}_accuracy": probe(a, y_train, b, y_test)
                            for where, a, b in zip(("tower", "connector"), feats_train, feats_test)}})

    print(f"linear probes on {model_dir} ({TRAIN} training / {TEST} test pictures, chance 33%)\n")
    print("| property | shape size | tower (mean of patches) | connector tokens (LLM input) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['property']} | {row['shape_px']} px | {row['tower_accuracy']:.0%} | "
              f"{row['connector_accuracy']:.0%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_vision.json").write_text(json.dumps({
        "model": str(model_dir), "date": datetime.date.today().isoformat(), "machine": platform.machine(),
        "torch": torch.__version__, "train_pictures": TRAIN, "test_pictures": TEST, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
