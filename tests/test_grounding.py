"""Word grounding of the visual tokens: box annotations, the tiny world's grounding records, the connector's token
grid, the `ground` objective and its recipe stage."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omniola import OlaForConditionalGeneration
from omniola.data.boxes import format_boxes, parse_boxes
from omniola.data.ola_format import RecordError
from omniola.data.pictures import boxes, draw_picture, plan_picture
from omniola.errors import ConfigError
from omniola.training import load_recipe, train
from omniola.training.grounding import GroundingObjective

from conftest import micro_config, micro_model_and_world, micro_tokenizer


def test_boxes_round_trip_and_bad_lines_are_named():
    text = format_boxes([("red circle", (8, 4, 40, 36)), ("big  blue square", (0, 32, 64, 64))], 64, 64)
    assert text == "red circle (125,62),(625,562)\nbig blue square (0,500),(1000,1000)"
    assert parse_boxes(text) == [("red circle", (0.125, 0.062, 0.625, 0.562)),
                                 ("big blue square", (0.0, 0.5, 1.0, 1.0))]
    with pytest.raises(RecordError, match=r"box line 2 is not `words \(x0,y0\),\(x1,y1\)`: 'a red circle'"):
        parse_boxes("cat (1,2),(3,4)\na red circle")
    with pytest.raises(RecordError, match=r"box line 1: corners must satisfy"):
        parse_boxes("cat (500,2),(300,4)")
    with pytest.raises(RecordError, match=r"box words must be"):
        format_boxes([("a (b)", (0, 0, 1, 1))], 2, 2)


def test_picture_boxes_hold_exactly_the_drawn_shapes():
    """Each shape drawn alone on white: its pixels lie inside its box and touch all four sides."""
    rng = random.Random(0)
    for _ in range(30):
        spec = plan_picture(rng, "train")
        for shape, (words, (x0, y0, x1, y1)) in zip(spec["shapes"], parse_boxes(boxes(spec))):
            assert words == f"{shape['color']} {shape['shape']}"
            alone = {**spec, "shapes": [shape], "background": {**spec["background"], "kind": "white"}}
            ys, xs = np.nonzero((np.asarray(draw_picture(alone)) != 255).any(-1))
            size = spec["size"]
            assert x0 * size - 1 <= xs.min() <= x0 * size + 1 and x1 * size - 2 <= xs.max() <= x1 * size
            assert y0 * size - 1 <= ys.min() <= y0 * size + 1 and y1 * size - 2 <= ys.max() <= y1 * size


def micro_vision_model(**kwargs):
    torch.manual_seed(0)
    return OlaForConditionalGeneration(micro_config(micro_tokenizer(lossless=True), image_views="native", **kwargs))


def test_spatial_tokens_are_the_image_tokens_in_their_places():
    model = micro_vision_model()
    grids = torch.tensor([[8, 8], [4, 6]])  # 64x64 and 32x48 pictures, patch 8
    pixels = torch.randn(8 * 8 + 4 * 6, 3 * 8 * 8)
    views = model.model.vision_tower(pixels, grids)
    shapes = [tuple(g) for g in grids.tolist()]
    images = model.model.vision_connector.forward_images(views, shapes, 1)
    spatial = model.model.vision_connector.spatial_tokens(views, shapes)
    for image, grid in zip(images, spatial):
        rows, cols, _ = grid.shape
        assert len(image) == 2 + rows * (cols + 1)  # begin, rows each closed by a newline, end
        for r in range(rows):
            torch.testing.assert_close(image[1 + r * (cols + 1):1 + r * (cols + 1) + cols], grid[r])
    mlp = micro_vision_model(vision_connector={"type": "mlp2x_gelu"})
    with pytest.raises(ConfigError, match="no grid over the picture"):
        mlp.model.vision_connector.spatial_tokens(views, shapes)


def test_a_token_is_named_by_the_box_covering_most_of_it():
    objective = GroundingObjective(micro_vision_model(), micro_tokenizer(lossless=True), min_cover=0.25)
    objects = [("red circle", (0.0, 0.0, 0.5, 1.0)), ("blue", (0.5, 0.0, 0.6, 0.5)), ("green", (0.6, 0.5, 1.0, 1.0))]
    names, index = objective.targets(objects, 2, 2)
    assert names == ["background", "red circle", "blue", "green"]
    # top right: blue covers 20 % (< 25 %): background; bottom right: green covers 80 %
    assert index.tolist() == [[1, 0], [1, 3]]
    table = micro_vision_model().get_input_embeddings().weight
    tokens = micro_tokenizer(lossless=True)
    word = [table[tokens(f" {w}", add_special_tokens=False)["input_ids"]].mean(0) for w in ("red", "circle")]
    torch.testing.assert_close(objective.phrase("red circle"), ((word[0] + word[1]) / 2).detach())


def test_ground_objective_pulls_each_token_onto_the_words_of_what_it_shows():
    """Pictures made of four kinds of 8x8 patch blocks; the boxes say which block holds which: the tower and
    connector learn to put each pooled token on its words' embedding."""
    model = micro_vision_model()
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    model.model.vision_connector.requires_grad_(True)
    tokenizer = micro_tokenizer(lossless=True)
    objective = GroundingObjective(model, tokenizer)
    kinds = torch.randn(4, 3 * 8 * 8)  # background, red, blue, green patches
    names = ["red circle", "blue square", "green"]
    generator = torch.Generator().manual_seed(0)

    def batch(n=6):
        pixel_values, ids, labels = [], [], []
        for _ in range(n):
            block = torch.randint(0, 4, (2, 2), generator=generator)  # which kind fills each 16x16 quarter
            patches = block.repeat_interleave(2, 0).repeat_interleave(2, 1).flatten()  # the 4x4 patch grid
            pixel_values.append(kinds[patches] + 0.1 * torch.randn(16, 3 * 64, generator=generator))
            objects = [(names[int(block[r, c]) - 1], (c * 16, r * 16, c * 16 + 16, r * 16 + 16))
                       for r in range(2) for c in range(2) if block[r, c]]
            answer = tokenizer(format_boxes(objects, 32, 32) or "", add_special_tokens=False)["input_ids"]
            ids.append(torch.tensor([7, *answer, tokenizer.eos_token_id]))
            labels.append(torch.tensor([-100, *answer, tokenizer.eos_token_id]))
        pad, end = max(len(i) for i in ids), tokenizer.eos_token_id
        return dict(input_ids=torch.stack([torch.nn.functional.pad(i, (0, pad - len(i)), value=end) for i in ids]),
                    labels=torch.stack([torch.nn.functional.pad(i, (0, pad - len(i)), value=-100) for i in labels]),
                    pixel_values=torch.cat(pixel_values), image_grid_hw=torch.tensor([[4, 4]] * n))

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(150):
        out = objective(**batch())
        first = float(out.loss) if first is None else first
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    held_out = objective(**batch(16))
    assert float(held_out.loss) < 0.1 * first and float(held_out.hit) == 1.0
    assert all(p.grad is None for n, p in model.named_parameters()
               if not n.startswith(("model.vision_tower.", "model.vision_connector.")))
    # a record whose answer is not box lines is left out of the loss and counted, not fatal
    words = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    bad = dict(batch(1), input_ids=torch.tensor([[7, *words, tokenizer.eos_token_id]]),
               labels=torch.tensor([[-100, *words, tokenizer.eos_token_id]]))
    out = objective(**bad)
    assert objective.skipped == 1 and float(out.loss) == 0.0
    out.loss.backward()  # still connected to the vision side: a batch of bad records does not break the step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A micro model whose tokenizer gives box answers back, and the small world."""
    return micro_model_and_world(tmp_path_factory.mktemp("grounding"), lossless=True)


RECIPE = """
name: micro
model: {{from: {model}}}
data: {{tiny_world: {world}}}
sources:
  ground: {{tiny_world: ground}}
  caption: {{tiny_world: caption}}
defaults: {{batch_size: 2, precision: bf16, save_every: 2, max_length: 4096}}
stages:
  - {{name: ground, data: {{ground: 1}}, objective: ground, train: {train}, lr: 1.0e-3, steps: 3}}
  - {{name: image, data: {{caption: 1}}, train: [], lora: {{r: 4, alpha: 8}}, steps: 2}}
"""


@pytest.mark.parametrize("modules", [["vision_tower", "vision_connector"], ["vision_connector"]])
def test_ground_stage_trains_the_vision_side_alone_on_the_worlds_grounding_records(setup, tmp_path, modules):
    """Grounding the connector alone, the frozen tower's outputs come from the feature cache. An image stage on the
    LoRA alone can follow."""
    records = json.loads((setup / "world" / "train_ground.json").read_text())
    assert records and all(parse_boxes(r["conversations"][-1]["value"]) for r in records)
    recipe = RECIPE.format(model=setup / "micro", world=setup / "world", train=f"[{', '.join(modules)}]")
    (tmp_path / "ground.yaml").write_text(recipe.split("  - {name: image")[0])
    train(load_recipe(tmp_path / "ground.yaml"), tmp_path / "run", progress=False, feature_cache_dir=tmp_path / "c")
    start = load_file(setup / "micro" / "model.safetensors")
    grounded = load_file(tmp_path / "run" / "01-ground" / "model" / "model.safetensors")
    assert set(grounded) == set(start)
    assert {k.split(".")[1] for k in start if not torch.equal(start[k], grounded[k])} == set(modules)
    assert any((tmp_path / "c").glob("vision-*/*.safetensors")) == (modules == ["vision_connector"])
    (tmp_path / "both.yaml").write_text(recipe)
    train(load_recipe(tmp_path / "both.yaml"), tmp_path / "both", progress=False, feature_cache_dir=tmp_path / "c")
    rows = [json.loads(line) for line in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["ground"] * 3 + ["image"] * 2 and all(np.isfinite(r["loss"]) for r in rows)


DIALOGS = ["video_visual_dialog", "video_dialog"]
TRAIN_ONLY = ["video_motion", "audio_count"]  # builders 2.5 and 2.6, training split only


@pytest.mark.parametrize("version, removed", [
    ("2.0", {"train": ["ground", "audio_caption", *DIALOGS, *TRAIN_ONLY],
             "val": ["ground", "audio_caption", *DIALOGS]}),
    ("2.1", {"oot": ["video_visual_qa", "video_audio_qa", "video_cross_qa"],  # no out-of-template clips
             "train": ["audio_caption", *DIALOGS, *TRAIN_ONLY], "val": ["audio_caption", *DIALOGS]}),
    ("2.2", {"train": ["audio_caption", *DIALOGS, *TRAIN_ONLY],  # no sound captions
             "val": ["audio_caption", *DIALOGS]}),
    ("2.3", {"train": DIALOGS + TRAIN_ONLY, "val": DIALOGS}),  # no clip dialogs
    ("2.4", {"train": TRAIN_ONLY}),  # no motion pairs
    ("2.5", {"train": ["audio_count"]}),  # no counting questions gathered (records only)
])
def test_a_world_of_an_earlier_builder_is_upgraded_in_place(tmp_path, version, removed):
    import shutil

    from omniola.data.tiny_world import BUILDER_VERSION, build_tiny_world, tiny_world_files

    world = tmp_path / "world"
    build_tiny_world(world, seed=1, scale="small", progress=False)
    records = {f.name: f.read_bytes() for f in world.glob("*.json") if f.name != "manifest.json"}
    media = {str(f.relative_to(world)): f.stat().st_mtime_ns for f in world.rglob("media/*/*/*")}
    manifest = json.loads((world / "manifest.json").read_text())  # as the earlier builder left it
    manifest["builder_version"] = version
    for split, kinds in removed.items():
        for kind in kinds:
            del manifest["files"][split][kind], manifest["counts"][split][kind]
            (world / f"{split}_{kind}.json").unlink()
    if version == "2.1":
        shutil.rmtree(world / "media" / "video" / "oot")
    pairs = set()
    if version < "2.5":  # no earlier builder drew the motion pairs
        pairs = {str(f.relative_to(world)) for f in world.glob("media/video/*/*_ends.mp4")}
        assert pairs
        for name in pairs:
            (world / name).unlink()
    (world / "manifest.json").write_text(json.dumps(manifest))
    split, kinds = next(iter(removed.items()))
    with pytest.raises(ConfigError, match=rf"unknown kind\(s\) .*built by builder {version}: `omniola data tiny"):
        tiny_world_files(world, split, kinds)
    build_tiny_world(world, seed=1, scale="small", progress=False)
    assert json.loads((world / "manifest.json").read_text())["builder_version"] == BUILDER_VERSION
    assert all(f.is_file() for f in tiny_world_files(world, split, kinds))
    # every record file as a fresh build writes it, and only the missing media rendered again
    assert {n: (world / n).read_bytes() for n in records} == records
    again = {str(f.relative_to(world)): f.stat().st_mtime_ns for f in world.rglob("media/*/*/*")}
    assert {n for n in media if again.get(n) != media[n]} == pairs | (
        {n for n in media if n.startswith("media/video/oot/")} if version == "2.1" else set())


@pytest.mark.parametrize("train_modules", ["[audio_connector]", "[vision_connector], lora: {r: 4, alpha: 8}"])
def test_a_ground_stage_that_trains_anything_else_is_refused(setup, tmp_path, train_modules):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=setup / "micro", world=setup / "world", train=train_modules))
    with pytest.raises(ConfigError, match=r"stages\[0\].* a ground stage trains the vision side alone"):
        load_recipe(path)
