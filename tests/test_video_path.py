"""The video path end to end: an mp4 written as the tiny world writes it -> `OlaProcessor` -> `embed_multimodal`.

Frames are 48 x 32 pixels: with the micro model's 8-pixel patches a 4 x 6 patch grid, kept as it is by the
processor, which `ola_pooling` turns into 2 * (3 + 1) = 8 tokens. Frame k of a test video carries the mark k
(k % 12 in longer videos): grey at level `20 + 16 k` (levels far more apart than the codec's error of 1 or 2), a white
block over the first two patches of the top row, which fixes the orientation, and a black patch in the bottom half
at patch `(2 + k // 6, k % 6)`. Both the level and the black patch say which frame it is; the black patch also gives
each frame its own structure, so the vision tower's features differ clearly between frames (its LayerNorms make
flat frames of different levels look almost alike).

`load_video`'s documented frame-picking rule (`omniola.media.load_video`): with `D` the video's duration and
`F = video_num_frames`, target `i` is the segment centre `(i + 0.5) * D / F` and takes the nearest frame (the
earlier one on a tie); a video of at most `F` frames gives all of them. For `N` frames at a constant rate the
target of segment `i` sits at frame `(i + 0.5) * N / F`; `expected_frames` computes the picks from that.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from omniola import OlaForConditionalGeneration, OlaProcessor, media
from omniola.data.ola_format import convert_record
from omniola.errors import ConfigError, InputError
from omniola.data.tiny_world import VIDEO_FPS, write_video, write_wav
from omniola.media import load_video

from conftest import micro_config, micro_processor, micro_tokenizer

NUM_FRAMES = 3  # the processor's video_num_frames
WIDTH, HEIGHT = 48, 32
NUM_CODES = 12  # frames are marked 0..11: distinct grey levels and distinct black patches
LEVEL_STEP = 16
LEVEL_TOLERANCE = 6  # grey levels; H.264 at crf 20 moves a flat frame by 1 or 2
PROMPT = "What happens?"


def grey_level(k: int) -> int:
    """Background level of a frame marked k (0..11 -> 20..196)."""
    return 20 + LEVEL_STEP * k


def black_patch(k: int) -> tuple[int, int]:
    """(row, column) of the black 8 x 8 patch of a frame marked k: in the bottom half, one place per mark."""
    return 2 + k // 6, k % 6


def grey_frames(n: int, order: list[int] | None = None) -> np.ndarray:
    """`[n, H, W, 3]` uint8: frame j is marked `order[j]` (default j)."""
    order = list(range(n)) if order is None else order
    frames = np.stack([np.full((HEIGHT, WIDTH, 3), grey_level(k), np.uint8) for k in order])
    frames[:, :8, :16] = 255
    for frame, k in zip(frames, order):
        row, col = black_patch(k)
        frame[8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = 0
    return frames


def write_test_video(path: Path, n: int, order: list[int] | None = None, audio: np.ndarray | None = None) -> Path:
    write_video(path, grey_frames(n, order), VIDEO_FPS, audio)
    return path


def expected_frames(n: int, f: int = NUM_FRAMES) -> list[int]:
    """Frame indices `load_video` documents for an `n`-frame constant-rate video and `f` requested frames."""
    if n <= f:
        return list(range(n))
    picks = []
    for i in range(f):
        target = (i + 0.5) * n / f  # in frame units
        picks.append(math.ceil(target - 0.5))  # nearest frame, the earlier one on a tie
    return picks


def test_expected_frames_rule():
    assert expected_frames(10) == [2, 5, 8]  # targets 1.67, 5, 8.33
    assert expected_frames(9) == [1, 4, 7]  # targets 1.5, 4.5, 7.5: ties take the earlier frame
    assert expected_frames(10, 4) == [1, 4, 6, 9]  # targets 1.25, 3.75, 6.25, 8.75
    assert expected_frames(2) == [0, 1]


def unpatchify(pixel_values_videos: torch.Tensor, thw: tuple[int, int, int], patch: int) -> np.ndarray:
    """`[T * h * w, 3 * p * p]` SigLIP-normalised patches -> `[T, H, W, 3]` float pixels in 0..255."""
    t, h, w = thw
    x = pixel_values_videos.reshape(t, h, w, 3, patch, patch).permute(0, 1, 4, 2, 5, 3)  # (T, h, p, w, p, 3)
    x = x.reshape(t, h * patch, w * patch, 3)
    return ((x * 0.5 + 0.5) * 255.0).numpy()  # image_mean = image_std = 0.5


def frame_indices(frames: np.ndarray) -> list[int]:
    """The mark of each `[H, W, 3]` frame, read from its grey level and checked against its black patch."""
    indices = []
    for frame in frames:
        background = float(frame[8:16, 16:].mean())  # clear of the white block and the black patch
        k = round((background - grey_level(0)) / LEVEL_STEP)
        assert abs(background - grey_level(k)) < LEVEL_TOLERANCE, f"background {background:.1f} is no test level"
        patches = frame[16:].reshape(2, 8, 6, 8, 3).mean(axis=(1, 3, 4))  # (2, 6) bottom-half patch means
        darkest = np.unravel_index(np.argmin(patches), patches.shape)
        assert (2 + int(darkest[0]), int(darkest[1])) == black_patch(k), f"frame at level {k} has a wrong black patch"
        indices.append(k)
    return indices


def run_of(input_ids: torch.Tensor, token_id: int) -> tuple[int, int]:
    """`(start, end)` of the one contiguous run of `token_id` in a 1-D `input_ids` (end exclusive)."""
    positions = (input_ids == token_id).nonzero().flatten().tolist()
    assert positions, f"no token {token_id} in the sequence"
    start, end = positions[0], positions[-1] + 1
    assert positions == list(range(start, end)), f"token {token_id} is not one contiguous run: {positions}"
    return start, end


def assert_layout(proc, ids: torch.Tensor, rendered: str, runs: dict[str, int]) -> None:
    """`ids` is `rendered` tokenized piece by piece, each media marker replaced by its run of `runs[marker]` ids."""
    token_id = {"<video>": proc.video_token_id, "<audio>": proc.audio_token_id}
    expected = []
    for piece in re.split("(<video>|<audio>)", rendered):
        if piece in runs:
            expected += [token_id[piece]] * runs[piece]
        elif piece:
            expected += proc.tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected


def media_inputs(inputs) -> dict:
    """The keys `embed_multimodal` takes."""
    return {k: v for k, v in inputs.items() if k not in ("attention_mask", "labels")}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture
def micro_video():
    """(model, processor): the micro Ola of `conftest`, frames up to 48 x 32 kept at their size."""
    tokenizer = micro_tokenizer()
    config = micro_config(tokenizer)
    model = OlaForConditionalGeneration(config).eval()
    # At the default init (std 0.02) the connector's frame tokens are ~1e-3 in size, so frames differ by ~1e-3 only;
    # unit-gain weights make them differ by ~0.1, far above the 1e-5 tolerance of the comparisons below.
    with torch.no_grad():
        for module in (model.model.vision_tower.embeddings, model.model.vision_connector):
            for layer in module.modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    torch.nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)  # 1 / sqrt(fan in)
    proc = micro_processor(tokenizer, config, video_num_frames=NUM_FRAMES, video_max_pixels=WIDTH * HEIGHT)
    return model, proc


def frame_features(model, pixel_values_videos: torch.Tensor, thw: tuple[int, int, int]) -> list[torch.Tensor]:
    """Each frame through the model's own video path alone, as a one-frame video: `[begin, frame, sep, end]`."""
    t, h, w = thw
    per_frame = h * w
    with torch.no_grad():
        return [
            model.model.get_video_features(pixel_values_videos[i * per_frame : (i + 1) * per_frame],
                                           torch.tensor([[1, h, w]]))[0]
            for i in range(t)
        ]


# ------------------------------------------------------------------------------------- 1. frame order and count


@pytest.mark.parametrize("num_file_frames", [9, 10, 13, 64])
def test_processor_keeps_the_documented_frames_in_time_order(micro_video, tmp_path, monkeypatch, num_file_frames):
    """9 frames: every target is a tie; 13: one tie; 64 frames (16 s): targets 5.3 s apart, reached by seeking."""
    _, proc = micro_video
    codes = [k % NUM_CODES for k in range(num_file_frames)]  # neighbours always differ
    path = write_test_video(tmp_path / "clip.mp4", num_file_frames, codes)
    seeks, seek = [], media._sample_by_seeking

    def spy(*args):
        seeks.append(seek(*args))
        return seeks[-1]

    monkeypatch.setattr(media, "_sample_by_seeking", spy)
    inputs = proc.apply_chat_template(user({"type": "video", "video": str(path)}, {"type": "text", "text": PROMPT}))
    assert (len(seeks) == 1 and seeks[0] is not None) == (num_file_frames == 64)

    thw = tuple(inputs["video_grid_thw"][0].tolist())
    p = proc.settings.patch_size
    assert thw == (NUM_FRAMES, HEIGHT // p, WIDTH // p)  # frames, rows, columns
    assert inputs["pixel_values_videos"].shape == (NUM_FRAMES * thw[1] * thw[2], 3 * p * p)
    frames = unpatchify(inputs["pixel_values_videos"], thw, p)
    picks = expected_frames(num_file_frames)
    assert frame_indices(frames) == [codes[i] for i in picks]
    # the patches are the decoded frames themselves (no resize here), in place: white block top-left
    decoded = load_video(path, num_frames=NUM_FRAMES, with_audio=False).frames
    np.testing.assert_allclose(frames, decoded.astype(np.float32), atol=1e-3)
    written = grey_frames(num_file_frames, codes)[picks].astype(np.float32)
    assert np.abs(frames - written).mean() < 3  # codec error only
    assert (frames[:, :8, :16].mean(axis=(1, 2, 3)) > 240).all() and (frames[:, 16:].max(axis=(1, 2, 3)) < 240).all()


@pytest.mark.parametrize("num_file_frames", [1, 2, NUM_FRAMES])
def test_video_with_at_most_num_frames_keeps_all_its_frames(micro_video, tmp_path, num_file_frames):
    model, proc = micro_video
    path = write_test_video(tmp_path / "short.mp4", num_file_frames)
    inputs = proc.apply_chat_template(user({"type": "video", "video": str(path)}, {"type": "text", "text": PROMPT}))

    thw = tuple(inputs["video_grid_thw"][0].tolist())
    assert thw[0] == num_file_frames
    assert frame_indices(unpatchify(inputs["pixel_values_videos"], thw, proc.settings.patch_size)) == list(
        range(num_file_frames)
    )
    tokens_per_frame = (thw[1] // 2) * (thw[2] // 2 + 1)
    start, end = run_of(inputs["input_ids"][0], proc.video_token_id)
    assert end - start == num_file_frames * (tokens_per_frame + 1) + 2
    with torch.no_grad():
        model.model.embed_multimodal(**media_inputs(inputs))  # the counts agree with the model's


# ---------------------------------------------------------------------------------------------------- 2. positions


def video_sample(proc, path: Path) -> dict:
    return proc.apply_chat_template(user({"type": "video", "video": str(path)}, {"type": "text", "text": PROMPT}))


def test_video_placeholders_are_one_run_between_the_prompt_texts(micro_video, tmp_path):
    _, proc = micro_video
    inputs = video_sample(proc, write_test_video(tmp_path / "clip.mp4", 10))
    ids = inputs["input_ids"][0]
    start, end = run_of(ids, proc.video_token_id)
    thw = tuple(inputs["video_grid_thw"][0].tolist())
    clip = load_video(tmp_path / "clip.mp4", num_frames=NUM_FRAMES, with_audio=False)
    assert end - start == proc.num_video_tokens(clip) == NUM_FRAMES * ((thw[1] // 2) * (thw[2] // 2 + 1) + 1) + 2
    rendered = proc.apply_chat_template(user({"type": "video", "video": str(tmp_path / "clip.mp4")},
                                             {"type": "text", "text": PROMPT}), tokenize=False)
    before, after = rendered.split("<video>")
    assert before.endswith("<|im_start|>user\n") and after.startswith(f"\n{PROMPT}<|im_end|>")
    assert_layout(proc, ids, rendered, {"<video>": end - start})
    assert proc.modality_token_counts(inputs["input_ids"])["image"] == 0
    assert proc.modality_token_counts(inputs["input_ids"])["audio"] == 0


def test_scatter_puts_each_frame_block_at_its_position_in_time_order(micro_video, tmp_path):
    model, proc = micro_video
    inputs = video_sample(proc, write_test_video(tmp_path / "clip.mp4", 10))
    ids = inputs["input_ids"][0]
    thw = tuple(inputs["video_grid_thw"][0].tolist())
    n = (thw[1] // 2) * (thw[2] // 2 + 1)  # connector tokens per frame
    start, end = run_of(ids, proc.video_token_id)
    with torch.no_grad():
        embeds = model.model.embed_multimodal(**media_inputs(inputs))[0]
        text = model.model.get_input_embeddings()(ids.masked_fill(ids == proc.video_token_id, 0))
    alone = frame_features(model, inputs["pixel_values_videos"], thw)
    begin, sep, end_token = alone[0][0], alone[0][1 + n], alone[0][-1]
    assert all(a.shape == (n + 3, embeds.shape[-1]) for a in alone)

    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[start], begin, **close)
    for t in range(thw[0]):
        block = start + 1 + t * (n + 1)
        torch.testing.assert_close(embeds[block : block + n], alone[t][1 : 1 + n], **close)
        torch.testing.assert_close(embeds[block + n], sep, **close)
    torch.testing.assert_close(embeds[end - 1], end_token, **close)
    assert start + 1 + thw[0] * (n + 1) == end - 1
    # the frames are really different, so equality above pins each frame to its own block
    assert min((alone[a][1 : 1 + n] - alone[b][1 : 1 + n]).abs().max() for a in range(3) for b in range(a)) > 0.1
    # text positions keep their token embeddings
    outside = torch.ones(len(ids), dtype=torch.bool)
    outside[start:end] = False
    torch.testing.assert_close(embeds[outside], text[outside])


def test_swapping_two_frames_in_the_file_swaps_their_embedding_blocks(micro_video, tmp_path):
    model, proc = micro_video
    picks = expected_frames(10)  # [2, 5, 8]
    order = list(range(10))
    order[picks[0]], order[picks[1]] = order[picks[1]], order[picks[0]]
    original = video_sample(proc, write_test_video(tmp_path / "clip.mp4", 10))
    swapped = video_sample(proc, write_test_video(tmp_path / "swapped.mp4", 10, order))
    assert torch.equal(original["input_ids"], swapped["input_ids"])

    thw = tuple(original["video_grid_thw"][0].tolist())
    assert frame_indices(unpatchify(swapped["pixel_values_videos"], thw, proc.settings.patch_size)) == [
        picks[1], picks[0], picks[2]
    ]
    n = (thw[1] // 2) * (thw[2] // 2 + 1)
    start, end = run_of(original["input_ids"][0], proc.video_token_id)
    with torch.no_grad():
        a = model.model.embed_multimodal(**media_inputs(original))[0]
        b = model.model.embed_multimodal(**media_inputs(swapped))[0]

    def block(x, t):
        first = start + 1 + t * (n + 1)
        return x[first : first + n]

    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(b, 0), block(a, 1), **close)
    torch.testing.assert_close(block(b, 1), block(a, 0), **close)
    torch.testing.assert_close(block(b, 2), block(a, 2), **close)
    assert (block(a, 0) - block(a, 1)).abs().max() > 0.1
    # everything but the two frame blocks is unchanged: begin, separators, end, text
    same = torch.ones(len(a), dtype=torch.bool)
    for t in (0, 1):
        same[start + 1 + t * (n + 1) : start + 1 + t * (n + 1) + n] = False
    torch.testing.assert_close(a[same], b[same], **close)


# ------------------------------------------------------------------------------------------- 3. audio with video

VIDEO_QA = {"from": "human", "value": f"<speech><image>\n{PROMPT}"}  # the tiny world's video + audio prompt


def tiny_world_record(root: Path, num_file_frames: int = 10) -> dict:
    """A video + audio record as the tiny world writes one: an mp4 with a sound track, the track also as WAV."""
    seconds = num_file_frames / VIDEO_FPS
    t = np.arange(int(seconds * 16000)) / 16000
    track = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    write_test_video(root / "clip.mp4", num_file_frames, audio=track)
    write_wav(root / "clip.wav", track[: len(track) // 2])  # a different length than the sound track
    return {"video": "clip.mp4", "audio": "clip.wav",
            "conversations": [VIDEO_QA, {"from": "gpt", "value": "a grey square"}]}


def with_settings(proc: OlaProcessor, **changes) -> OlaProcessor:
    return OlaProcessor(proc.tokenizer, proc.feature_extractor, dataclasses.replace(proc.settings, **changes))


def assert_frames(proc, inputs, indices: list[int]) -> None:
    """The one video in `inputs` shows test frames `indices`, in that order."""
    thw = tuple(inputs["video_grid_thw"][0].tolist())
    assert thw[0] == len(indices)
    assert frame_indices(unpatchify(inputs["pixel_values_videos"], thw, proc.settings.patch_size)) == indices


def check_features_at_runs(model, proc, inputs, embeds):
    """The audio and video runs hold exactly the features the model computes for each modality."""
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])[0]
        audio = model.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"],
                                               inputs["audio_num_chunks"])[0]
    v0, v1 = run_of(ids, proc.video_token_id)
    a0, a1 = run_of(ids, proc.audio_token_id)
    torch.testing.assert_close(embeds[0, v0:v1], video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[0, a0:a1], audio, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sound_track", ["after_frames", "before_frames"])
def test_tiny_world_video_audio_record_puts_the_speech_before_the_video(micro_video, tmp_path, sound_track):
    """Ola's record order (`video_audio="markers"`, the default): the `audio` file at `<speech>`, before the frames,
    whatever `video_sound_track` says (that setting concerns the video's own track only)."""
    model, proc = micro_video
    proc = with_settings(proc, video_sound_track=sound_track)
    converted = convert_record(tiny_world_record(tmp_path), tmp_path, video_num_frames=NUM_FRAMES)
    assert [p["type"] for p in converted.messages[0]["content"]] == ["audio", "video", "text"]
    assert converted.use_audio_in_video is False
    inputs = proc.apply_chat_template(converted.messages, return_labels=True, padding_side="right",
                                      use_audio_in_video=converted.use_audio_in_video)
    ids = inputs["input_ids"][0]
    a0, a1 = run_of(ids, proc.audio_token_id)
    v0, v1 = run_of(ids, proc.video_token_id)
    wav_samples = int(10 / VIDEO_FPS * 16000) // 2
    assert a1 - a0 == proc.num_audio_tokens(wav_samples)  # the WAV file, not the video's own track
    rendered = proc.apply_chat_template(converted.messages, return_labels=True, tokenize=False,
                                        use_audio_in_video=converted.use_audio_in_video)
    assert f"<|im_start|>user\n<audio>\n<video>\n{PROMPT}<|im_end|>" in rendered
    assert a1 < v0
    assert_layout(proc, ids, rendered, {"<audio>": a1 - a0, "<video>": v1 - v0})
    assert (inputs["labels"][0, a0:v1] == -100).all()
    assert_frames(proc, inputs, expected_frames(10))
    with torch.no_grad():
        embeds = model.model.embed_multimodal(**media_inputs(inputs))
    check_features_at_runs(model, proc, inputs, embeds)


@pytest.mark.parametrize("sound_track", ["after_frames", "before_frames"])
def test_video_own_sound_track_sits_where_video_sound_track_says(micro_video, tmp_path, sound_track):
    model, proc = micro_video
    proc = with_settings(proc, video_sound_track=sound_track)
    converted = convert_record(tiny_world_record(tmp_path), tmp_path, video_audio="sound_track",
                               video_num_frames=NUM_FRAMES)
    assert [p["type"] for p in converted.messages[0]["content"]] == ["video", "text"]
    assert converted.use_audio_in_video is True
    inputs = proc.apply_chat_template(converted.messages, return_labels=True, padding_side="right",
                                      use_audio_in_video=converted.use_audio_in_video)
    ids = inputs["input_ids"][0]
    a0, a1 = run_of(ids, proc.audio_token_id)
    v0, v1 = run_of(ids, proc.video_token_id)
    track = load_video(tmp_path / "clip.mp4", num_frames=NUM_FRAMES).audio
    assert a1 - a0 == proc.num_audio_tokens(len(track))
    first, second = ((v0, v1), (a0, a1)) if sound_track == "after_frames" else ((a0, a1), (v0, v1))
    assert first[1] < second[0]
    rendered = proc.apply_chat_template(converted.messages, return_labels=True, tokenize=False,
                                        use_audio_in_video=converted.use_audio_in_video)
    pair = "<video>\n<audio>" if sound_track == "after_frames" else "<audio>\n<video>"
    assert f"<|im_start|>user\n{pair}\n{PROMPT}<|im_end|>" in rendered
    assert_layout(proc, ids, rendered, {"<audio>": a1 - a0, "<video>": v1 - v0})
    assert_frames(proc, inputs, expected_frames(10))  # a sound track changes nothing in the frames picked
    with torch.no_grad():
        embeds = model.model.embed_multimodal(**media_inputs(inputs))
    check_features_at_runs(model, proc, inputs, embeds)


def test_interleaved_sound_track_follows_each_frame_with_the_sound_of_its_time(micro_video, tmp_path):
    """`video_sound_track="interleaved"`: frames at 0.5, 1.25 and 2.0 s (10 file frames at 4 fps, 3 kept); each
    frame's tokens are followed by the audio tokens of the time up to the next kept frame, and the model scatters
    each modality's features into its own positions in order."""
    model, proc = micro_video
    proc = with_settings(proc, video_sound_track="interleaved")
    converted = convert_record(tiny_world_record(tmp_path), tmp_path, video_audio="sound_track",
                               video_num_frames=NUM_FRAMES)
    inputs = proc.apply_chat_template(converted.messages, return_labels=True, padding_side="right",
                                      use_audio_in_video=converted.use_audio_in_video)
    rendered = proc.apply_chat_template(converted.messages, return_labels=True, tokenize=False,
                                        use_audio_in_video=converted.use_audio_in_video)
    assert f"<|im_start|>user\n<video><audio>\n{PROMPT}<|im_end|>" in rendered
    clip = load_video(tmp_path / "clip.mp4", num_frames=NUM_FRAMES)
    np.testing.assert_allclose(clip.timestamps, [p / VIDEO_FPS for p in expected_frames(10)])

    # the expected runs, from the documented rules: 50 encoder frames per second, 5 per token, a 2.5 s track
    thw = tuple(inputs["video_grid_thw"][0].tolist())
    per_frame = (thw[1] // 2) * (thw[2] // 2 + 1) + 1  # pooled tokens with their row newlines, and the separator
    n_audio = proc.num_audio_tokens(len(clip.audio))
    centres = (np.arange(n_audio - 3) + 0.5) * 5 / 50
    early, middle = int((centres < 1.25).sum()), int(((centres >= 1.25) & (centres < 2.0)).sum())
    late = n_audio - 3 - early - middle
    assert early and middle and late
    runs = [("<video>", 1 + per_frame), ("<audio>", 1 + early), ("<video>", per_frame), ("<audio>", middle),
            ("<video>", per_frame + 1), ("<audio>", late + 2)]
    ids = inputs["input_ids"][0]
    media = (ids == proc.video_token_id) | (ids == proc.audio_token_id)
    start = int(media.nonzero()[0])
    expected = torch.cat([torch.full((n,), proc.video_token_id if m == "<video>" else proc.audio_token_id)
                          for m, n in runs])
    assert torch.equal(ids[start : start + len(expected)], expected)
    assert int(media.sum()) == len(expected)
    assert (inputs["labels"][0][media] == -100).all()

    with torch.no_grad():
        embeds = model.model.embed_multimodal(**media_inputs(inputs))[0]
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])[0]
        audio = model.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"],
                                               inputs["audio_num_chunks"])[0]
    torch.testing.assert_close(embeds[ids == proc.video_token_id], video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[ids == proc.audio_token_id], audio, atol=1e-5, rtol=1e-5)
    # the same tokens as the track after the frames, only placed otherwise
    after = with_settings(proc, video_sound_track="after_frames").apply_chat_template(
        converted.messages, use_audio_in_video=True)
    counts = proc.modality_token_counts(after["input_ids"]), proc.modality_token_counts(inputs["input_ids"])
    assert [(c["video"], c["audio"]) for c in counts] == [(3 * per_frame + 2, n_audio)] * 2


def test_interleaved_sound_track_needs_audio_tokens_in_time_order():
    tokenizer = micro_tokenizer()
    config = micro_config(tokenizer)
    with pytest.raises(InputError, match="video_sound_track must be one of"):
        micro_processor(tokenizer, config, video_sound_track="mixed")
    qformer = {"type": "qformer", "num_queries": 4, "num_layers": 1, "num_heads": 2}
    with pytest.raises(ConfigError, match="'qformer' audio connector's tokens are not"):
        micro_processor(tokenizer, config, audio_connector=qformer, video_sound_track="interleaved")


@pytest.mark.parametrize("setting", [False, True])
def test_use_audio_in_video_of_the_call_overrides_the_setting(micro_video, tmp_path, setting):
    """Evaluation passes `use_audio_in_video` per sample; a processor saved with the other value must follow the call
    (before the fix, a `False` setting decoded no sound track, so a call asking for it silently got none)."""
    _, proc = micro_video
    proc = with_settings(proc, use_audio_in_video=setting)
    tiny_world_record(tmp_path)
    message = user({"type": "video", "video": str(tmp_path / "clip.mp4")}, {"type": "text", "text": PROMPT})
    track = load_video(tmp_path / "clip.mp4", num_frames=NUM_FRAMES).audio
    with_track = proc.apply_chat_template(message, use_audio_in_video=True)
    assert proc.modality_token_counts(with_track["input_ids"])["audio"] == proc.num_audio_tokens(len(track))
    without = proc.apply_chat_template(message, use_audio_in_video=False)
    assert proc.modality_token_counts(without["input_ids"])["audio"] == 0 and "input_features" not in without


# ------------------------------------------------------------------------------------ 4. batched equals alone

LONG_PROMPT = "Describe every frame of the clip in detail, one sentence for each, then say what changes. " * 2


@pytest.mark.parametrize("other", ["text", "short_video"])
@pytest.mark.parametrize("video_first", [True, False])
def test_video_sample_in_left_padded_batch_equals_it_alone(micro_video, tmp_path, other, video_first):
    model, proc = micro_video
    sample = user({"type": "video", "video": str(write_test_video(tmp_path / "clip.mp4", 10))},
                  {"type": "text", "text": PROMPT})
    if other == "text":
        neighbour = user({"type": "text", "text": LONG_PROMPT})
    else:
        neighbour = user({"type": "video", "video": str(write_test_video(tmp_path / "short.mp4", 2, [7, 3]))},
                         {"type": "text", "text": LONG_PROMPT})
    alone = proc.apply_chat_template(sample)
    batch = proc.apply_chat_template([sample, neighbour] if video_first else [neighbour, sample])
    row = 0 if video_first else 1
    length = alone["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] > length  # the video sample is left-padded
    assert (batch["attention_mask"][row, :-length] == 0).all() and (batch["attention_mask"][row, -length:] == 1).all()
    assert torch.equal(batch["input_ids"][row, -length:], alone["input_ids"][0])
    if other == "short_video":  # each video keeps its own frames, in order
        p = proc.settings.patch_size
        thw = batch["video_grid_thw"].tolist()
        per_video = batch["pixel_values_videos"].split([t * h * w for t, h, w in thw])
        shown = [frame_indices(unpatchify(x, tuple(g), p)) for x, g in zip(per_video, thw)]
        assert shown == ([expected_frames(10), [7, 3]] if video_first else [[7, 3], expected_frames(10)])

    with torch.no_grad():
        embeds_alone = model.model.embed_multimodal(**media_inputs(alone))[0]
        embeds_batch = model.model.embed_multimodal(**media_inputs(batch))[row, -length:]
        logits_alone = model(**alone).logits[0, -1]
        logits_batch = model(**batch).logits[row, -1]
    start, end = run_of(alone["input_ids"][0], proc.video_token_id)
    torch.testing.assert_close(embeds_batch[start:end], embeds_alone[start:end], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_batch, logits_alone, atol=1e-5, rtol=1e-5)
