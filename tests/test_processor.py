"""OlaProcessor: sizes, patch layout, token budget, chat template, labels and bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from omniola import InputError, MediaError, OlaProcessor
from omniola.media import MediaTruncatedWarning
from omniola.processing_ola import fit_size, patchify


@pytest.mark.parametrize("w, h", [(64, 64), (1000, 50), (50, 1000), (7, 9), (4000, 3000)])
def test_fit_size_keeps_aspect_within_bounds(w, h):
    nw, nh = fit_size(w, h, factor=32, min_pixels=64 * 64, max_pixels=512 * 512)
    assert nw % 32 == 0 and nh % 32 == 0
    assert nw * nh <= 512 * 512
    if 64 * 64 <= w * h <= 512 * 512 and w >= 32 and h >= 32:
        assert abs(nw - w) <= 16 and abs(nh - h) <= 16  # native size, only rounded to the grid
    assert abs(np.log((nw / nh) / (w / h))) < 0.7  # aspect ratio kept up to grid rounding


def test_patchify_is_row_major_channel_first():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)  # H=16, W=24
    patches, grid = patchify(Image.fromarray(pixels), (24, 16), patch=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert grid == (2, 3) and patches.shape == (6, 3 * 8 * 8)
    # patch (row 1, col 2) is the last one; its first values are channel 0 of pixels [8:16, 16:24]
    expected = torch.from_numpy(pixels[8:16, 16:24].astype(np.float32) / 255).permute(2, 0, 1).reshape(-1)
    torch.testing.assert_close(patches[5], expected)


def test_huge_image_is_resized_down_not_rejected(micro):
    _, proc = micro
    inputs = proc("<image>", images=[Image.new("RGB", (3000, 2000), (9, 9, 9))])
    native = inputs["image_grid_hw"][-1]
    assert int(native.prod()) * 64 <= proc.settings.image_max_pixels


def test_multi_turn_chat_renders_every_turn(micro):
    _, proc = micro
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32))},
                                     {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Black."},
        {"role": "user", "content": "Sure?"},
    ]
    text = proc.apply_chat_template(conv, tokenize=False)
    assert text.count("<|im_start|>") == 5  # system, user, assistant, user, generation prompt
    assert "Be brief." in text and "Black." in text and text.endswith("<|im_start|>assistant\n")
    assert text.index("<image>") < text.index("Colour?")


def test_labels_cover_assistant_turns_only(micro):
    _, proc = micro
    conv = [
        {"role": "user", "content": [{"type": "audio", "audio": np.zeros(8000, np.float32) + 0.01},
                                     {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "Noise."},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Yes."},
    ]
    out = proc.apply_chat_template([conv, conv[:2]], return_labels=True, padding_side="right")
    for i, expected in enumerate(["Noise.<|im_end|>\nYes.<|im_end|>\n", "Noise.<|im_end|>\n"]):
        kept = out["input_ids"][i][out["labels"][i] != -100]
        assert proc.tokenizer.decode(kept).replace("<0x00>", "\n") == expected
    assert not bool(((out["input_ids"] == proc.audio_token_id) & (out["labels"] != -100)).any())
    assert bool((out["labels"][1][out["attention_mask"][1] == 0] == -100).all())


def test_system_prompt_setting_is_used_where_a_conversation_has_none(micro):
    _, proc = micro
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    default = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    assert "You are a helpful assistant." in default  # the template's own default
    custom = OlaProcessor(proc.tokenizer, proc.feature_extractor,
                          dataclasses.replace(proc.settings, system_prompt=""))
    text = custom.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi?")
    own = [{"role": "system", "content": "Be brief."}, *conv]  # a conversation's own system turn wins
    assert custom.apply_chat_template(own, tokenize=False).count("<|im_start|>system") == 1
    out = custom.apply_chat_template(conv, return_labels=True)
    kept = out["input_ids"][0][out["labels"][0] != -100]
    assert proc.tokenizer.decode(kept).replace("<0x00>", "\n") == "Hello.<|im_end|>\n"


def test_empty_answer_is_rejected(micro):
    _, proc = micro
    with pytest.raises(InputError, match="assistant answer is empty"):
        proc.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
                                 return_labels=True)


def test_unsupported_part_type(micro):
    _, proc = micro
    with pytest.raises(InputError, match="message 0 part 1: unsupported content part type 'pdf'"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "pdf"}]}])


def test_part_without_media_field(micro):
    _, proc = micro
    with pytest.raises(InputError, match="part of type 'image' needs a 'image' field"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])


def test_marker_media_mismatch(micro):
    _, proc = micro
    with pytest.raises(InputError, match=r"1 <image> marker\(s\) but 0 images"):
        proc("<image> hi")
    with pytest.raises(InputError, match=r"0 <audio> marker\(s\) but 1 audio"):
        proc("hi", audio=[np.zeros(1600, np.float32)])


def test_missing_and_corrupt_files(micro, tmp_path):
    _, proc = micro
    with pytest.raises(MediaError, match="nope.png"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(MediaError, match="bad.wav"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": str(bad)}]}])
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(MediaError, match="empty.wav"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": str(empty)}]}])


def test_over_long_audio_is_truncated_with_warning(micro, tmp_path):
    _, proc = micro
    proc = OlaProcessor(proc.tokenizer, proc.feature_extractor, proc.settings, max_audio_seconds=2.0)
    path = tmp_path / "long.wav"
    sf.write(path, np.full(16000 * 5, 0.1, np.float32), 16000)
    with pytest.warns(MediaTruncatedWarning, match="long.wav"):
        inputs = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": str(path)}]}])
    assert int(inputs["feature_attention_mask"].sum()) == 200  # 2 s of 10 ms frames


def test_audio_longer_than_30s_is_chunked(micro):
    _, proc = micro
    inputs = proc("<audio>", audio=[np.full(16000 * 61, 0.1, np.float32)])
    assert inputs["audio_num_chunks"].tolist() == [3]
    assert inputs["feature_attention_mask"].sum(-1).tolist() == [3000, 3000, 100]


def test_video_audio_track_follows_the_video(micro, tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=8)
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 10, np.uint8), format="rgb24")
            for packet in v.encode(frame):
                out.mux(packet)
        t = np.arange(32000) / 16000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in a.encode(frame):
                out.mux(packet)
        for stream in (v, a):
            for packet in stream.encode():
                out.mux(packet)
    _, proc = micro
    msg = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "?"}]}]
    text = proc.apply_chat_template(msg, tokenize=False)
    assert text.index("<video>") < text.index("<audio>")
    inputs = proc.apply_chat_template(msg)
    assert inputs["video_grid_thw"][0, 0] == proc.settings.video_num_frames
    assert inputs["audio_num_chunks"].tolist() == [1]
    without = proc.apply_chat_template(msg, use_audio_in_video=False)
    assert "input_features" not in without
    # a model trained on Ola's record order (<speech> before the video) gets its sound track before the frames
    before = OlaProcessor(proc.tokenizer, proc.feature_extractor,
                          dataclasses.replace(proc.settings, video_sound_track="before_frames"))
    msg[0]["content"].insert(0, {"type": "audio", "audio": np.full(8000, 0.2, np.float32)})
    text = before.apply_chat_template(msg, tokenize=False)
    assert text.index("<audio>") < text.rindex("<audio>") < text.index("<video>")
    ordered = before.apply_chat_template(msg)
    track = inputs["feature_attention_mask"].sum(-1).tolist()
    assert ordered["feature_attention_mask"].sum(-1).tolist() == [50, *track]  # the 0.5 s part, then the track


def test_settings_validation():
    from omniola.processing_ola import OlaProcessorSettings

    with pytest.raises(InputError, match="audio_padding"):
        OlaProcessorSettings(audio_padding="sometimes")
    with pytest.raises(InputError, match="video_sound_track"):
        OlaProcessorSettings(video_sound_track="beside")
    with pytest.raises(InputError, match="video_num_frames"):
        OlaProcessorSettings(video_num_frames=0)


def test_processor_round_trip(micro, tmp_path):
    _, proc = micro
    proc.save_pretrained(tmp_path)
    loaded = OlaProcessor.from_pretrained(tmp_path)
    assert loaded.settings == proc.settings
    assert loaded.image_token_id == proc.image_token_id
    with pytest.raises(InputError, match="processor_config.json is missing"):
        OlaProcessor.from_pretrained(tmp_path / "nowhere")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(InputError, match="no usable tokenizer files"):
        OlaProcessor.from_pretrained(tmp_path)
