"""The video diagnostic ladder: which step of seeing over space and time the model fails first.

    .venv/bin/python benchmarks/video_ladder.py --start RUN/03-image/model --out DIR \\
        [--arms ola,place,time,place+time] [--rungs color,side,place,bind,motion2,video] [--steps 60] [--seed 0]
        [--world DATA/tiny --rungs world] [--question-first] [--lr-scale 1]
        [--audio-from RUN/05-speech-ctc/model --world DATA/tiny --rungs bind,hear]

Each rung is a minimal synthetic task, drawn with the tiny world's shapes and palette (`omniola.data.pictures`):

    color    one picture, one shape           "What color is the shape?"               a colour        chance 12 %
    side     one picture, one shape           "Which side is the shape on?"            left / right    chance 50 %
    place    one picture, two shapes          "Which side is the red shape on?"        left / right    chance 50 %
    bind     one picture, two shapes          "What color is the circle?"              a colour        chance 50 %
    hear     one picture, two shapes, and a narrator saying "look at the circle." (the world's cross-modal `name`):
             "Which shape does the speaker name?" (the spoken word: a shape, chance 33 %) and
             "What color is the shape the speaker names?" (`bind` with the word spoken: a colour, chance 50 %)
    hear-after   the same, the narration after the picture ("<image><speech>"; the world puts it before)
    hear-text    the same, the narration written before the picture: `The speaker says: "look at the circle."`
    hear-clips   the same two questions of the world's own `name` clips (`--world`: its training clips, one question
                 each, whatever `--train`; scored on its test clips, whose narrators and compositions are held out)
    motion2  a two-frame video, one shape     "Did the square move left or right?"     left / right    chance 50 %
    video    the tiny world's video layout    "Which way does the circle move?"        4 directions    chance 25 %
             (10-16 frames at 4 fps, 6 kept)  "What color is the circle at the start?" the first colour
                                              "What color is the circle at the end?"   the last colour
    world    the tiny world itself (`--world`): the recipe's video stage, scored on `video_visual_qa` of the test
             split per template: `name` (two shapes, "What color is the circle?"), `move_beeps` (direction),
             `change_tone` ("What color does the square turn?")

Every rung trains for the same budget (`--steps` steps of 8, the recipe's video stage: vision tower, connector and
LoRA r 16) from the same image-stage checkpoint, on fresh renders (`--train` per rung, each seen at most once at the
default budget), and is scored by exact match on held-out renders. The first rung that fails says where to look;
`color` is the control (what the image stage already taught: if it fails, the ladder itself is broken), and `side`
separates reading a place from finding the object a word names (`place`). `hear` is `bind` with the word spoken
instead of written: the cross-modal step. Like the world, it holds its narrators out: the training renders are spoken
by the voices and rates of the world's training narrations (`--world`), the test renders by those of its test split.
Its start needs an aligned audio connector: `--audio-from` takes it from a checkpoint after the
speech connector's CTC stage (the connector is aligned to the LLM's input embeddings, which LoRA leaves alone).

An **arm** is the start checkpoint with its vision connector's options changed (`omniola.modeling.connectors`,
`ola_pooling`): `ola` (Ola's connector, as trained), `place` (`position_embedding: sincos2d`), `time`
(`time_embedding: sincos`), `place+time`. New parameters start from the model's own initialisation. `ground` is Ola's
connector after a word-grounding pass (:func:`ground`) on the `place` rung's training pictures. `words` gives the
`color`, `side` and `place` rungs no picture at all but its word grid in text (:func:`word_grid`: the colour of each
block the connector pools into one token), so the LLM alone is trained and scored: what perfectly grounded visual
tokens would allow. `oracle` delivers those words through the visual path instead (:func:`oracle_tokens`: each
picture token replaced by its colour word's input embedding). An arm ending in `-frozen` trains the LoRA alone on
the rung (vision tower and connector fixed), after `ola`, `ground`, `ground-exact` or `boxes`. `boxes` is the
`tiny-grounded` recipe's `ground` stage (`omniola.training.grounding`: each token pulled onto the mean embedding of
its shape's colour and kind words, " red circle", by squared distance) on the place rung's pictures and their boxes
(:func:`ground_stage`; `--ground-steps` and `--ground-batch` change its budget). `boxes-snap-frozen` is
`boxes-frozen` with `snap_audio_tokens` on (:func:`with_audio`): audio tokens the CTC readout reads as words are those
words' input embeddings.

Resumable: a finished (arm, rung) keeps its `scores.json`; an interrupted training continues from its last
checkpoint. Writes `DIR/ladder.json` and `DIR/ladder.md` (a table of rung x arm).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNGS = ("color", "side", "place", "bind", "hear", "hear-after", "hear-text", "hear-clips", "motion2", "video", "world")
#: the narration before the picture, after it, written before it, or the world's own `name` clips
HEAR = ("hear", "hear-after", "hear-text", "hear-clips")
ARMS = {
    "ola": {},
    "place": {"position_embedding": "sincos2d"},
    "time": {"time_embedding": "sincos"},
    "place+time": {"position_embedding": "sincos2d", "time_embedding": "sincos"},
    "ground": {},  # Ola's connector after `ground` (below): its tokens pulled towards the words of what they show
    "ground-exact": {},  # the same, each token pulled onto the word's embedding itself (its size too)
    "ola-frozen": {},  # Ola's connector as trained; the rung trains the LoRA alone (vision tower and connector frozen)
    "ground-frozen": {},  # ground, then the LoRA alone
    "ground-exact-frozen": {},  # ground-exact, then the LoRA alone
    "words": {},  # no picture: the picture rungs given as their word grid in text (`word_grid`), the LLM alone
    "oracle": {},  # Ola's visual path with each picture token replaced by its colour word's embedding (`oracle_tokens`)
    "boxes": {},  # tiny-grounded's `ground` stage (colour and shape words, from boxes) on the place rung's pictures
    "boxes-frozen": {},  # boxes, then the LoRA alone
    "boxes-snap-frozen": {},  # boxes-frozen with the audio tokens snapped onto their CTC words (`with_audio`)
    "ola-snap-frozen": {},  # ola-frozen with the audio tokens snapped (a start already grounded, e.g. tiny-grounded's)
}
GROUND_STEPS, GROUND_BATCH, GROUND_LR, GROUND_SCALE = 150, 32, 1e-3, 10.0
#: Chance level of each question type: the share a model gets by naming one of the answers the media offers.
CHANCE = {"color": 0.125, "side": 0.5, "place": 0.5, "bind": 0.5, "motion2": 0.5, "direction": 0.25,
          "spoken_shape": 1 / 3, "hear": 0.5, "first_color": 0.5, "last_color": 0.5, "name": 0.5,
          "move_beeps": 0.25, "change_tone": 0.5}
SIZE, SHAPE, FPS = 64, 16, 4
VIDEO_FRAMES = 6  # the tiny recipes' `video_num_frames`: the frames of a video rung clip the words arm writes out


def _shape(name: str, color: str, cx: float, cy: float) -> dict:
    from omniola.data.pictures import COLORS

    return {"shape": name, "color": color, "rgb": list(COLORS[color]), "cx": cx, "cy": cy, "w": SHAPE, "h": SHAPE,
            "point": "up"}


def _frame(shapes: list[dict]):
    """One 64 x 64 picture on white, drawn by the tiny world's picture generator."""
    import numpy as np

    from omniola.data.pictures import draw_picture

    spec = {"style": "train", "size": SIZE, "shapes": shapes,
            "background": {"kind": "white", "colors": [[255] * 3] * 2, "seed": 0, "period": 8, "angle": 0}}
    return np.asarray(draw_picture(spec))


def _two_shapes(rng: random.Random) -> list[dict]:
    from omniola.data.pictures import COLORS, SHAPES

    (a, b), (ca, cb) = rng.sample(SHAPES, 2), rng.sample(tuple(COLORS), 2)
    return [_shape(a, ca, rng.uniform(10, 24), rng.uniform(10, 54)),
            _shape(b, cb, rng.uniform(40, 54), rng.uniform(10, 54))]


def _questions(rung: str, rng: random.Random) -> tuple[list, list[tuple[str, str, str]], list[dict] | None]:
    """One item of a rung: its frames (`[F, 64, 64, 3]`, one frame for a picture), its (type, question, answer) and,
    for a picture, its shapes (`hear`: the named one first)."""
    import numpy as np

    from omniola.data.pictures import COLORS, SHAPES

    if rung == "color":
        one = _shape(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.uniform(10, 54), rng.uniform(10, 54))
        return _frame([one])[None], [("color", "What color is the shape?", one["color"])], [one]
    if rung == "side":
        x = rng.choice((rng.uniform(10, 24), rng.uniform(40, 54)))
        one = _shape(rng.choice(SHAPES), rng.choice(tuple(COLORS)), x, rng.uniform(10, 54))
        return _frame([one])[None], [("side", "Which side is the shape on?", "left" if x < 32 else "right")], [one]
    if rung in ("place", "bind", *HEAR):
        left, right = shapes = _two_shapes(rng)
        asked = rng.choice(shapes)
        if rung in HEAR:
            return _frame(shapes)[None], [("spoken_shape", "Which shape does the speaker name?", asked["shape"]),
                                          ("hear", "What color is the shape the speaker names?", asked["color"])], \
                [asked, *(s for s in shapes if s is not asked)]
        if rung == "place":
            side = "left" if asked is left else "right"
            return _frame(shapes)[None], [("place", f"Which side is the {asked['color']} shape on?", side)], shapes
        return _frame(shapes)[None], [("bind", f"What color is the {asked['shape']}?", asked["color"])], shapes
    name, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    if rung == "motion2":
        direction, y = rng.choice(("left", "right")), rng.uniform(10, 54)
        a = rng.uniform(10, 30)
        b = rng.uniform(a + SHAPE, 54)  # a move of at least the shape's width
        x0, x1 = (a, b) if direction == "right" else (b, a)
        frames = [_frame([_shape(name, color, x, y)]) for x in (x0, x1)]
        return np.stack(frames), [("motion2", f"Did the {name} move left or right?", direction)], None
    # video: the tiny world's layout; the shape moves one way between frames a and b and changes colour at c
    first, last = rng.sample(tuple(COLORS), 2)
    count = rng.randint(10, 16)
    a = rng.randint(1, count // 3)
    b = rng.randint(a + 3, count - 2)
    change = rng.randint(2, count - 2)
    direction, across = rng.choice(("left", "right", "up", "down")), rng.uniform(16, 48)
    lo, hi = 12.0, 52.0
    start, end = {"right": ((lo, across), (hi, across)), "left": ((hi, across), (lo, across)),
                  "down": ((across, lo), (across, hi)), "up": ((across, hi), (across, lo))}[direction]
    frames = []
    for k in range(count):
        t = min(1.0, max(0.0, (k - a) / (b - a)))
        cx, cy = start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])
        frames.append(_frame([_shape(name, first if k < change else last, cx, cy)]))
    return np.stack(frames), [("direction", f"Which way does the {name} move?", direction),
                              ("first_color", f"What color is the {name} at the start?", first),
                              ("last_color", f"What color is the {name} at the end?", last)], None


def block_colors(picture) -> list[list[int]]:
    """The palette colour (index into `COLORS`; `len(COLORS)`: background) covering each 16 x 16 block of a picture,
    the blocks the connector pools into one token, row by row. A block counts as a colour from 1/8 of its pixels."""
    import numpy as np

    from omniola.data.pictures import COLORS

    palette = np.array([COLORS[c] for c in COLORS])
    grid = []
    for r in range(picture.shape[0] // SHAPE):
        row = []
        for c in range(picture.shape[1] // SHAPE):
            block = picture[r * SHAPE:(r + 1) * SHAPE, c * SHAPE:(c + 1) * SHAPE].reshape(-1, 1, 3).astype(int)
            hits = (np.abs(block - palette[None]).max(-1) <= 16).sum(0)  # pixels of each palette colour
            row.append(int(hits.argmax()) if hits.max() >= SHAPE * SHAPE // 8 else len(palette))
        grid.append(row)
    return grid


def word_grid(picture) -> str:
    """A picture as text, one colour word per block of :func:`block_colors` ("white": background), rows on lines:
    what perfectly grounded visual tokens would say."""
    from omniola.data.pictures import COLORS

    words = [*COLORS, "white"]
    return "\n".join(" ".join(words[i] for i in row) for row in block_colors(picture))


def kept_frames(count: int, rung: str) -> list[int]:
    """The frames of a `count`-frame clip the model sees (`omniola.media.read_video`'s rule at a constant frame
    rate: the frame nearest each of `num_frames` equal spans' centres, the earlier on a tie), for the words arm."""
    import math

    num_frames = 2 if rung == "motion2" else VIDEO_FRAMES
    if count <= num_frames:
        return list(range(count))
    return [math.ceil((i + 0.5) * count / num_frames - 0.5) for i in range(num_frames)]


def narrators(world: Path, split: str) -> list[dict]:
    """The voices, rates and pitches of a built tiny world's narrations in `split` (its cross-modal `name` clips)."""
    records = json.loads((world / f"{split}_video_cross_qa.json").read_text())
    found = {(m["voice"], m.get("rate", 175), m.get("pitch", 50), m.get("speed", 1.0))
             for m in (r["meta"] for r in records) if m.get("template") == "name"}
    if not found:
        raise SystemExit(f"{world}: no {split} narration ({split}_video_cross_qa.json has no `name` clip)")
    return [{"voice": v, "rate": r, "pitch": p, "speed": s} for v, r, p, s in sorted(found)]


def build_rung(rung: str, root: Path, *, train: int, test: int, seed: int, question_first: bool = False,
               as_words: bool = False, voices: dict[str, list[dict]] | None = None) -> Path:
    """Renders a rung's train and test items under `root` (idempotent: a finished rung is kept); with
    `question_first` the question comes before the picture or clip in every prompt; with `as_words` (pictures only)
    each picture is given as its :func:`word_grid` in text instead. `hear` speaks each narration with one of
    `voices[split]` (:func:`narrators`)."""
    from PIL import Image

    from omniola.data.pictures import boxes
    from omniola.data.tiny_world import NARRATIONS, _atomic_json, speak, write_video, write_wav

    done = root / "done.json"
    if done.is_file():
        return root
    (root / "media").mkdir(parents=True, exist_ok=True)
    grounding = []  # the training pictures with their shapes' boxes (`omniola.data.boxes`), for the boxes arm
    for split, count, offset in (("train", train, 0), ("test", test, 1_000_000)):
        records = []
        for k in range(count):
            rng = random.Random(f"{seed}/{rung}/{offset + k}")
            frames, questions, shapes = _questions(rung, rng)
            rel = f"media/{split}-{k:05d}" + (".png" if len(frames) == 1 else ".mp4")
            media, spoken = {}, {}
            if as_words:
                marker = word_grid(frames[0]) if len(frames) == 1 else "\n".join(
                    f"frame {i + 1}:\n{word_grid(frames[k])}" for i, k in enumerate(kept_frames(len(frames), rung)))
            elif len(frames) == 1:
                Image.fromarray(frames[0]).save(root / rel)
                marker, media = "<image>", {"image": rel}
                if rung in HEAR:
                    narration = rng.choice(NARRATIONS).format(shapes[0]["shape"])
                    voice = rng.choice(voices[split])
                    spoken = {"voice": voice["voice"]}
                    if rung == "hear-text":
                        marker = f'The speaker says: "{narration}"\n<image>'
                    else:  # the world's cross-modal prompt is "<speech><image>"
                        wav = rel.replace(".png", ".wav")
                        write_wav(root / wav, speak(narration, voice["voice"], rate=voice["rate"],
                                                    pitch=voice["pitch"], speed=voice["speed"]))
                        marker = "<speech><image>" if rung == "hear" else "<image><speech>"
                        media = {**media, "audio": wav}
            else:
                write_video(root / rel, frames, FPS if rung == "video" else 1)
                marker, media = "<image>", {"video": rel}
            if split == "train" and len(frames) == 1 and not as_words:
                answer = boxes({"size": SIZE, "shapes": shapes})
                grounding.append({"id": f"{rung}-ground-{k:05d}", "image": rel, "conversations": [
                    {"from": "human", "value": "<image>"}, {"from": "gpt", "value": answer}]})
            asked = questions if split == "test" else [rng.choice(questions)]
            for j, (qtype, question, answer) in enumerate(asked):
                records.append({"id": f"{rung}-{split}-{k:05d}-{j}", **media, "conversations": [
                    {"from": "human", "value": f"{question}\n{marker}" if question_first else f"{marker}\n{question}"},
                    {"from": "gpt", "value": answer}],
                    "meta": {"rung": rung, "question": qtype, **spoken}})
        _atomic_json(root / f"{split}.json", records)
    if grounding:
        _atomic_json(root / "ground.json", grounding)
    _atomic_json(done, {"train": train, "test": test, "seed": seed})
    return root


def build_hear_clips(root: Path, world: Path, *, seed: int) -> Path:
    """The `hear-clips` rung under `root` (idempotent): the hear rung's two questions ("Which shape does the speaker
    name?", "What color is the shape the speaker names?") of a built tiny world's `name` clips, its
    `video_audio_qa` and `video_cross_qa` records. Each training clip gives one of the two (drawn with `seed`),
    each test clip both. `root/media` links to the world's media."""
    from omniola.data.tiny_world import _atomic_json

    done = root / "done.json"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "media").exists():
        (root / "media").symlink_to((world / "media").resolve())
    rng = random.Random(seed)
    counts = {}
    for split in ("train", "test"):
        clips: dict[int, list[dict]] = {}
        for kind, question in (("video_audio_qa", "spoken_shape"), ("video_cross_qa", "hear")):
            for record in json.loads((world / f"{split}_{kind}.json").read_text()):
                meta = record["meta"]
                if meta["template"] == "name":
                    clips.setdefault(meta["clip"], []).append(
                        {**record, "meta": {"rung": "hear-clips", "question": question, "voice": meta["voice"]}})
        if not clips or any(len(pair) != 2 for pair in clips.values()):
            raise SystemExit(f"{world}: the hear-clips rung needs each `name` clip of {split}_video_audio_qa.json "
                             f"in {split}_video_cross_qa.json too")
        records = [rng.choice(clips[k]) for k in sorted(clips)] if split == "train" else \
            [r for k in sorted(clips) for r in clips[k]]
        _atomic_json(root / f"{split}.json", records)
        counts[split] = len(clips)
    _atomic_json(done, {**counts, "seed": seed, "world": str(world)})
    return root


def start_model(start: Path, arm: str, out: Path) -> Path:
    """The start checkpoint with the arm's connector options, saved once per arm (`start` itself when they are its
    own)."""
    import torch

    from omniola.configuration_ola import OlaConfig
    from omniola.modeling_ola import OlaForConditionalGeneration
    from omniola.processing_ola import OlaProcessor

    if (out / "config.json").is_file():
        return out
    config = OlaConfig.from_pretrained(start)
    if config.vision_connector.get("type") != "ola_pooling":
        raise SystemExit(f"--start {start}: the ladder's arms change `ola_pooling` options, the checkpoint's vision "
                         f"connector is {config.vision_connector}")
    if config.vision_connector == {"type": "ola_pooling", **ARMS[arm]}:
        return start  # the arm changes nothing: the checkpoint itself
    config.vision_connector = {"type": "ola_pooling", **ARMS[arm]}
    model = OlaForConditionalGeneration.from_pretrained(start, config=config, dtype=torch.float32)
    processor = OlaProcessor.from_pretrained(start, vision_connector=config.vision_connector)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def ground(start: Path, data: Path, out: Path, *, exact: bool = False) -> Path:
    """Word grounding of the visual tokens, the vision counterpart of the speech connector's CTC stage: each pooled
    token of a training picture (`data`: a built picture rung) is pulled towards the LLM's input embedding of the
    colour word of what it shows (" red", ...; " white" for background) by a cross entropy over cosine similarities
    with the 9 words. Trains the vision tower and connector, no LLM forward; `GROUND_STEPS` batches of
    `GROUND_BATCH`. The LLM's own matching of a question's word with the same word earlier in its context could then
    apply to visual tokens. `exact`: the loss is instead the squared distance to the word's embedding itself, so the
    tokens also take the words' size (Ola's visual tokens are ~10x larger)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from omniola.data.pictures import COLORS
    from omniola.inference import load_model

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model, processor = load_model(start)
    words = [*COLORS, "white"]
    ids = [processor.tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0] for w in words]
    embeddings = model.get_input_embeddings().weight[ids].detach()  # (9, D)
    table = F.normalize(embeddings, dim=-1)
    records = json.loads((data / "train.json").read_text())
    params = [*model.model.vision_tower.parameters(), *model.model.vision_connector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=GROUND_LR)
    model.train()
    rng = random.Random(0)
    for step in range(GROUND_STEPS):
        batch = rng.sample(records, GROUND_BATCH)
        pictures = [np.asarray(Image.open(data / r["image"]).convert("RGB")) for r in batch]
        inputs = processor("<image>" * len(batch), images=[Image.fromarray(p) for p in pictures])
        tokens = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"])
        chosen, labels = [], []
        for picture, feats in zip(pictures, tokens):
            grid = block_colors(picture)  # 4 x 4: the pooled tokens of a 64 px picture shown at 128 px
            for r, row in enumerate(grid):
                for c, color in enumerate(row):
                    labels.append(color)
                    chosen.append(feats[1 + r * (len(row) + 1) + c])  # [begin, row 0, newline, row 1, ...]
        chosen = torch.stack(chosen)
        logits = F.normalize(chosen, dim=-1) @ table.T * GROUND_SCALE
        loss = ((chosen - embeddings[labels]).pow(2).sum(-1).mean() if exact
                else F.cross_entropy(logits, torch.tensor(labels)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == GROUND_STEPS - 1:
            accuracy = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
            print(f"ground step {step}: loss {loss.item():.3f}, token accuracy {accuracy:.2f}", flush=True)
    tmp = out.with_name(out.name + ".partial")
    model.eval().save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def ground_stage(start: Path, data: Path, out: Path, *, seed: int, steps: int | None = None,
                 batch_size: int | None = None) -> Path:
    """The `tiny-grounded` recipe's `ground` stage (`omniola.training.grounding`) from `start`, on a built picture
    rung's training pictures and their boxes (`data/ground.json`): the colour and kind words of each shape.
    `steps` and `batch_size` replace the recipe's."""
    import yaml

    from omniola.training.recipe import load_recipe, packaged_recipe
    from omniola.training.trainer import train

    if (out / "config.json").is_file():
        return out
    tiny = yaml.safe_load(packaged_recipe("tiny-grounded").read_text())
    stage = {**next(s for s in tiny["stages"] if s.get("objective") == "ground"), "data": {"boxes": 1.0}}
    stage.update({k: v for k, v in (("steps", steps), ("batch_size", batch_size)) if v is not None})
    recipe = {"name": "ladder-boxes", "model": {"from": str(start)}, "seed": seed, "defaults": tiny["defaults"],
              "sources": {"boxes": {"files": [f"{data}/ground.json"], "data_root": str(data), "modality": "image"}},
              "stages": [stage]}
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    final = train(load_recipe(path), out.parent / f"{out.name}.run", resume=True)
    os.symlink(final.resolve(), out)
    return out


def with_audio(start: Path, audio_from: Path, out: Path, *, snap: bool = False) -> Path:
    """`start` with its audio connector's weights taken from `audio_from` (a checkpoint after the speech
    connector's CTC stage, on the same audio encoder and LLM), saved once. `snap`: with `snap_audio_tokens` on and
    the blank that CTC stage saved beside `audio_from`, so the audio tokens read as words are those words'
    embeddings (`OlaConfig.snap_audio_tokens`)."""
    import torch

    from omniola.configuration_ola import OlaConfig
    from omniola.modeling_ola import OlaForConditionalGeneration
    from omniola.processing_ola import OlaProcessor
    from omniola.training.ctc import load_ctc_blank

    if (out / "config.json").is_file():
        return out
    config = OlaConfig.from_pretrained(start)
    config.snap_audio_tokens = snap
    model = OlaForConditionalGeneration.from_pretrained(start, config=config, dtype=torch.float32)
    donor = OlaForConditionalGeneration.from_pretrained(audio_from, dtype=torch.float32)
    if model.config.audio_connector != donor.config.audio_connector or model.model.audio_connector is None:
        raise SystemExit(f"--audio-from {audio_from}: its audio connector ({donor.config.audio_connector}) is not "
                         f"the one of {start} ({model.config.audio_connector})")
    try:
        model.model.audio_connector.load_state_dict(donor.model.audio_connector.state_dict())
    except RuntimeError as err:
        raise SystemExit(f"--audio-from {audio_from}: its audio connector does not fit {start}: {err}") from err
    processor = OlaProcessor.from_pretrained(start)
    if snap:
        model.model.set_audio_snap(load_ctc_blank(audio_from.parent / "ctc_blank.safetensors"),
                                   torch.tensor(processor.tokenizer.all_special_ids))
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def oracle_tokens(start: Path, data: Path):
    """While active, every picture's pooled tokens are replaced by the LLM's input embeddings of the colour words of
    its :func:`block_colors`, exactly and without gradient; the begin, newline and end tokens stay the connector's.
    The picture is found among the rung's renders (`data/media`) as the one nearest to the given pixels. This is the
    words arm's grid delivered through the visual path: it separates how the tokens are placed and embedded from
    what they contain."""
    import numpy as np
    import torch
    from PIL import Image

    from omniola.data.pictures import COLORS
    from omniola.modeling_ola import OlaModel
    from omniola.processing_ola import OlaProcessor

    processor = OlaProcessor.from_pretrained(start)
    settings = processor.settings
    mean, std = (torch.tensor(v)[:, None, None] for v in (settings.image_mean, settings.image_std))
    ids = torch.tensor([processor.tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0]
                        for w in [*COLORS, "white"]])
    pictures = [np.asarray(Image.open(f).convert("RGB")) for f in sorted((data / "media").glob("*.png"))]
    renders = torch.from_numpy(np.stack(pictures)).float()  # (N, SIZE, SIZE, 3)
    grids = [block_colors(p) for p in pictures]
    original = OlaModel.get_image_features

    def replaced(self, pixel_values, image_grid_hw, tower_states=None):
        if pixel_values is None or self.views_per_image != 1:
            raise SystemExit("the oracle arm needs pixels and one view per picture")
        images = original(self, pixel_values, image_grid_hw, tower_states)
        vocabulary = self.get_input_embeddings().weight.detach()
        out, first, p = [], 0, settings.patch_size
        for feats, (gh, gw) in zip(images, image_grid_hw.tolist()):
            rows, cols = gh // 2, gw // 2
            if feats.shape[0] != 2 + rows * (cols + 1):
                raise SystemExit(f"oracle arm: {feats.shape[0]} tokens for a {rows}x{cols} grid")
            where = torch.tensor([1 + r * (cols + 1) + c for r in range(rows) for c in range(cols)])
            x = pixel_values[first:first + gh * gw].detach().float().reshape(gh, gw, 3, p, p)
            first += gh * gw
            x = (x.permute(2, 0, 3, 1, 4).reshape(3, gh * p, gw * p) * std + mean).permute(1, 2, 0) * 255
            s = gh * p // SIZE  # shown at s x the render's size: back to it by averaging s x s blocks
            picture = int((renders - x.reshape(SIZE, s, SIZE, s, 3).mean((1, 3))).pow(2).flatten(1).sum(1).argmin())
            grid = grids[picture]
            if (len(grid), len(grid[0])) != (rows, cols):
                raise SystemExit(f"oracle arm: a {len(grid)}x{len(grid[0])} block grid for {rows}x{cols} tokens")
            words = vocabulary[ids[torch.tensor([color for row in grid for color in row])]]
            out.append(feats.index_put((where,), words.to(feats.dtype)))
        return out

    OlaModel.get_image_features = replaced
    try:
        yield
    finally:
        OlaModel.get_image_features = original


def rung_start(arm_start: Path, rung: str, out: Path) -> Path:
    """`arm_start` as the rung sees it: two frames per video for `motion2` (the processor's `video_num_frames`)."""
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in arm_start.iterdir():
        if f.name != "processor_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    settings = json.loads((arm_start / "processor_config.json").read_text())
    if rung == "motion2":
        settings["video_num_frames"] = 2
    (out / "processor_config.json").write_text(json.dumps(settings, indent=2))
    return out


def rung_recipe(arm: str, rung: str, data: Path, start: Path, *, steps: int, seed: int, lr_scale: float) -> dict:
    """A rung's recipe: the `tiny` recipe's video stage (its modules, LoRA and learning rates, times `lr_scale`) from
    `start`, on the rung's training records (the world rung: the stage's own tiny-world mixture) for `steps`."""
    import yaml

    from omniola.training.recipe import packaged_recipe

    tiny = yaml.safe_load(packaged_recipe("tiny").read_text())
    video = next(s for s in tiny["stages"] if s["name"] == "video")
    stage = {**video, "lr": {k: v * lr_scale for k, v in video["lr"].items()}, "steps": steps}
    if arm.endswith("-frozen"):
        stage["train"] = []  # the LoRA alone
        stage["lr"] = {k: v for k, v in stage["lr"].items() if k in ("default", "lora")}
    recipe = {"name": f"ladder-{rung}", "model": {"from": str(start)}, "seed": seed,
              "defaults": {**tiny["defaults"], "save_every": 20}}
    if rung == "world":
        recipe.update(data={"tiny_world": str(data)}, sources={k: tiny["sources"][k] for k in video["data"]})
    else:
        pictures = ("color", "side", "place", "bind")
        modality = "mixed" if arm == "words" or rung in HEAR else "image" if rung in pictures else "video"
        recipe["sources"] = {"rung": {"files": [f"{data}/train.json"], "data_root": str(data), "modality": modality}}
        stage.update(name=rung, data={"rung": 1.0})
    recipe["stages"] = [stage]
    return recipe


def _samples(rung: str, data: Path) -> list:
    """The rung's held-out questions, scored per question type (the world: per video template)."""
    from omniola.data.ola_format import convert_record
    from omniola.evaluation.tasks import Sample, load_tiny

    if rung == "world":
        samples = load_tiny(data, split="test", kinds=["video_visual_qa"]).samples
        for s in samples:
            s.kind = s.info["template"]
        return samples
    samples = []
    for record in json.loads((data / "test.json").read_text()):
        converted = convert_record(record, data)
        samples.append(Sample(id=record["id"], kind=record["meta"]["question"], metric="exact_match",
                              reference=converted.messages[-1]["content"], messages=converted.messages[:-1]))
    return samples


def run_rung(arm: str, rung: str, data: Path, start: Path, out: Path, *, steps: int, seed: int,
             question_first: bool = False, lr_scale: float = 1.0) -> dict:
    """Trains one (arm, rung) and scores it on the rung's test items (cached in `out/scores.json`)."""
    import yaml

    from omniola.evaluation.runner import evaluate
    from omniola.evaluation.tasks import Task
    from omniola.inference import load_model
    from omniola.training.recipe import load_recipe
    from omniola.training.trainer import train

    scores = out / "scores.json"
    if scores.is_file():
        done = json.loads(scores.read_text())
        if (done["steps"], done.get("lr_scale", 1.0)) != (steps, lr_scale):
            raise SystemExit(f"{scores} was trained with --steps {done['steps']} --lr-scale {done.get('lr_scale', 1.0)}"
                             "; give another --out for another budget")
        return done
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(rung_recipe(arm, rung, data, start, steps=steps, seed=seed, lr_scale=lr_scale),
                                     sort_keys=False))
    with oracle_tokens(start, data) if arm == "oracle" else contextlib.nullcontext():
        final = train(load_recipe(recipe), out / "run", resume=(out / "run").exists())
        model, processor = load_model(final)
        result = evaluate(model, processor, Task(name=f"ladder-{rung}", source=str(data), samples=_samples(rung, data),
                                                 max_new_tokens=8), batch_size=16, out=out / "eval")
    kinds = {k: v for k, v in result["scores"].items() if k != "overall"}
    value = {"arm": arm, "rung": rung, "question_first": question_first, "steps": steps, "lr_scale": lr_scale,
             "seed": seed,
             "scores": {k: v["score"] for k, v in kinds.items()},
             "answers": _answer_counts(result["predictions"])}
    tmp = scores.with_suffix(".partial")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, scores)
    return value


def _answer_counts(predictions: list[dict]) -> dict[str, dict[str, int]]:
    """What the model answered, per question type: shows a collapse onto one answer."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    for p in predictions:
        counts.setdefault(p["kind"], Counter())[str(p.get("prediction")).strip().lower()] += 1
    return {k: dict(c.most_common(6)) for k, c in counts.items()}


def table(results: list[dict]) -> str:
    """Rung x arm, every result given (a rung asked question-first is a row of its own)."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    rows = ["| rung | question | chance | " + " | ".join(arms) + " |", "|---|---|---:|" + "---:|" * len(arms)]
    by = {(r["arm"], r["rung"], r.get("question_first", False)): r for r in results}
    for rung in RUNGS:
        for first in (False, True):
            found = [r for r in results if r["rung"] == rung and r.get("question_first", False) == first]
            for q in dict.fromkeys(q for r in found for q in r["scores"]):
                cells = [f"{100 * by[(a, rung, first)]['scores'][q]:.1f}%" if (a, rung, first) in by else "-"
                         for a in arms]
                name = f"{rung} (question first)" if first else rung
                rows.append(f"| {name} | {q} | {100 * CHANCE[q]:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, required=True, help="an image-stage checkpoint (RUN/03-image/model)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", default="ola", help=f"comma-separated, of {sorted(ARMS)}")
    parser.add_argument("--rungs", default=",".join(r for r in RUNGS if r not in (*HEAR, "world")),
                        help=f"comma-separated, of {RUNGS}")
    parser.add_argument("--steps", type=int, default=60, help="training steps of 8 per rung")
    parser.add_argument("--train", type=int, default=800, help="training renders per rung")
    parser.add_argument("--test", type=int, default=150,
                        help="held-out renders per rung (video: 60 clips, 3 questions)")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiplies the video stage's learning rates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", type=Path, help="a built tiny world, for the `world` rung")
    parser.add_argument("--audio-from", type=Path,
                        help="a checkpoint whose (CTC-aligned) audio connector every arm's start takes; needed by hear")
    parser.add_argument("--ground-steps", type=int,
                        help="the boxes arms' ground stage: steps (default: tiny-grounded's)")
    parser.add_argument("--ground-batch", type=int, help="the boxes arms' ground stage: batch size")
    parser.add_argument("--question-first", action="store_true",
                        help="put the question before the picture or clip (the tiny world and Ola put it after)")
    args = parser.parse_args()
    arms, rungs = args.arms.split(","), args.rungs.split(",")
    for field, values, known in (("--arms", arms, ARMS), ("--rungs", rungs, RUNGS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"{field}: unknown {unknown}; choose from {sorted(known)}")
    if not (args.start / "config.json").is_file():
        parser.error(f"--start {args.start}: not a model directory (no config.json)")
    if "words" in arms and not set(rungs) <= {"color", "side", "place", "motion2", "video"}:
        parser.error("the words arm gives pictures and frames as their colour words: rungs color, side, place, "
                     "motion2 and video only")
    if "oracle" in arms and not set(rungs) <= set(RUNGS[:4]):
        parser.error("the oracle arm replaces picture tokens: rungs color, side, place and bind only")
    if {"world", "hear-clips"} & set(rungs) and args.question_first:
        parser.error("--question-first applies to the synthetic rungs; the world and hear-clips rungs use the world's "
                     "own records")
    hear = set(HEAR) & set(rungs)
    if {"world", *hear} & set(rungs) and not (args.world and (args.world / "manifest.json").is_file()):
        parser.error(f"the world and hear rungs need --world DIR, a built tiny world (no manifest.json in "
                     f"{args.world})")
    if hear - {"hear-text"} and args.audio_from is None:
        parser.error("the hear rungs need --audio-from CHECKPOINT: an audio connector after the CTC stage")
    if args.audio_from is not None and not (args.audio_from / "config.json").is_file():
        parser.error(f"--audio-from {args.audio_from}: not a model directory (no config.json)")
    if any("-snap" in a for a in arms) and not (args.audio_from and
                                                (args.audio_from.parent / "ctc_blank.safetensors").is_file()):
        parser.error("the snap arms need --audio-from RUN/NN-speech-ctc/model with the CTC stage's "
                     "ctc_blank.safetensors beside it")
    if hear and ("words" in arms or "oracle" in arms):
        parser.error("the hear rung has a picture and a narration: not with the words or oracle arms")
    if args.steps < 1 or args.train < 1 or args.test < 1 or not args.lr_scale > 0 or any(
            v is not None and v < 1 for v in (args.ground_steps, args.ground_batch)):
        parser.error("--steps, --train, --test, --lr-scale, --ground-steps and --ground-batch must be positive")
    voices = {split: narrators(args.world, split) for split in ("train", "test")} if hear - {"hear-clips"} else None
    results = []
    for arm in arms:
        arm_start = start_model(args.start, arm, args.out / "starts" / arm)
        if arm.startswith("ground"):
            pictures = build_rung("place", args.out / "data" / "place", train=args.train, test=args.test,
                                  seed=args.seed)
            kind = "ground-exact" if arm.startswith("ground-exact") else "ground"
            arm_start = ground(arm_start, pictures, args.out / "starts" / f"{kind}-trained",
                               exact=kind == "ground-exact")
        elif arm.startswith("boxes"):
            pictures = build_rung("place", args.out / "data" / "place", train=args.train, test=args.test,
                                  seed=args.seed)
            budget = "" if args.ground_steps is None and args.ground_batch is None else \
                f"-{args.ground_steps or 'default'}x{args.ground_batch or 'default'}"
            arm_start = ground_stage(arm_start, pictures, args.out / "starts" / f"boxes{budget}-trained",
                                     seed=args.seed, steps=args.ground_steps, batch_size=args.ground_batch)
        if args.audio_from is not None:
            arm_start = with_audio(arm_start, args.audio_from, args.out / "starts" / f"{arm}-audio",
                                   snap="-snap" in arm)
        for rung in rungs:
            test = 60 if rung == "video" else args.test
            tag = f"{rung}-qfirst" if args.question_first else rung
            words = arm == "words"
            if rung == "world":
                data = args.world
            elif rung == "hear-clips":
                data = build_hear_clips(args.out / "data" / tag, args.world, seed=args.seed)
            else:
                data = build_rung(rung, args.out / "data" / (f"{tag}-words" if words else tag), train=args.train,
                                  test=test, seed=args.seed, question_first=args.question_first, as_words=words,
                                  voices=voices)
            start = rung_start(arm_start, rung, args.out / "starts" / f"{arm}-{rung}")
            results.append(run_rung(arm, rung, data, start, args.out / arm / tag, steps=args.steps, seed=args.seed,
                                    question_first=args.question_first, lr_scale=args.lr_scale))
            print(table(results), flush=True)
    # the summary holds every (arm, rung) finished in this folder, from this call and earlier ones
    everything = [json.loads(f.read_text()) for f in sorted(args.out.glob("*/*/scores.json"))]
    summary = {"start": str(args.start), "train": args.train, "chance": CHANCE, "results": everything}
    (args.out / "ladder.json").write_text(json.dumps(summary, indent=2))
    (args.out / "ladder.md").write_text(table(everything) + "\n")
    print(table(everything))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
