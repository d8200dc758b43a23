"""The Ola model on micro random configs: token budget, scatter, batching, caching, loss, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from omniola import InputError, OlaConfig, OlaForConditionalGeneration, OlaProcessor
from omniola.media import VideoClip

from conftest import micro_config, micro_processor, micro_tokenizer


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _video(frames: int = 3, w: int = 40, h: int = 24, seed: int = 0) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip(
        frames=rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8),
        timestamps=np.arange(frames, dtype=np.float64),
        duration=float(frames),
        audio=None,
    )


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


@pytest.mark.parametrize("size", [(50, 30), (30, 70), (16, 16), (200, 20), (400, 300)])
@pytest.mark.parametrize("views", ["global+native", "native"])
def test_image_placeholders_match_embeddings(size, views):
    tok = micro_tokenizer()
    config = micro_config(tok, image_views=views)
    model = OlaForConditionalGeneration(config).eval()
    proc = micro_processor(tok, config)
    inputs = proc.apply_chat_template(_user({"type": "image", "image": _image(*size)}, _text("hi")))
    n_placeholders = int((inputs["input_ids"] == config.image_token_id).sum())
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"])
    assert len(feats) == 1 and feats[0].shape == (n_placeholders, config.text_config.hidden_size)
    assert n_placeholders == proc.num_image_tokens(*size)
    assert inputs["image_grid_hw"].shape[0] == (2 if views == "global+native" else 1)
    # the native view never exceeds the pixel limit: larger images are resized down, not rejected
    h, w = inputs["image_grid_hw"][-1].tolist()
    assert h * w * 8 * 8 <= proc.settings.image_max_pixels


def test_video_and_audio_placeholders_match_embeddings(micro):
    model, proc = micro
    cfg = model.config
    inputs = proc(
        "<video><audio><audio>x",
        videos=[_video(4)],
        audio=[_audio(3.0), _audio(65.0, seed=1)],  # short, and long: three 30 s chunks
    )
    assert inputs["audio_num_chunks"].tolist() == [1, 3]
    with torch.no_grad():
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        audio = model.model.get_audio_features(
            inputs["input_features"], inputs["feature_attention_mask"], inputs["audio_num_chunks"]
        )
    assert video[0].shape[0] == int((inputs["input_ids"] == cfg.video_token_id).sum())
    assert [a.shape[0] for a in audio] == [proc.num_audio_tokens(3 * 16000), proc.num_audio_tokens(65 * 16000)]
    assert sum(a.shape[0] for a in audio) == int((inputs["input_ids"] == cfg.audio_token_id).sum())


def test_variable_length_audio_is_cheaper_than_fixed_padding(micro):
    _, proc = micro
    fixed = OlaProcessor(proc.tokenizer, proc.feature_extractor, proc.settings, audio_padding="fixed")
    short_variable, short_fixed = proc.num_audio_tokens(3 * 16000), fixed.num_audio_tokens(3 * 16000)
    assert short_fixed == 1500 // 5 + 1 + 2  # Ola: 30 s -> 1500 Whisper frames -> 300 tokens + newline, begin, end
    assert short_variable <= short_fixed / 8
    assert proc(["<audio>"], audio=[_audio(3.0)])["input_features"].shape[-1] == 300  # 3 s of mel, not 30 s


def test_fixed_mode_audio_encoder_equals_stock_whisper(micro):
    model, proc = micro
    fixed = OlaProcessor(proc.tokenizer, proc.feature_extractor, proc.settings, audio_padding="fixed")
    inputs = fixed("<audio>", audio=[_audio(4.0)])
    assert inputs["input_features"].shape[-1] == 3000
    encoder = model.model.audio_encoder
    stock = WhisperEncoder(encoder.whisper.config).eval()
    stock.load_state_dict(encoder.whisper.state_dict())
    with torch.no_grad():
        ours = encoder(inputs["input_features"], inputs["feature_attention_mask"])[0]
        theirs = stock(inputs["input_features"]).last_hidden_state[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_audio_chunk_batched_equals_alone(micro):
    model, proc = micro
    a, b = _audio(1.3), _audio(4.7, seed=3)
    with torch.no_grad():
        both = proc("<audio><audio>", audio=[a, b])
        batched = model.model.get_audio_features(
            both["input_features"], both["feature_attention_mask"], both["audio_num_chunks"]
        )
        alone = proc("<audio>", audio=[a])
        single = model.model.get_audio_features(
            alone["input_features"], alone["feature_attention_mask"], alone["audio_num_chunks"]
        )
    torch.testing.assert_close(batched[0], single[0], atol=1e-5, rtol=1e-4)


def test_vision_tower_mixed_sizes_equal_individual(micro):
    model, proc = micro
    tower = model.model.vision_tower
    a = proc("<image>", images=[_image(40, 24)])
    b = proc("<image>", images=[_image(16, 48, seed=2)])
    with torch.no_grad():
        joint = tower(torch.cat([a["pixel_values"], b["pixel_values"]]), torch.cat([a["image_grid_hw"], b["image_grid_hw"]]))
        alone = tower(a["pixel_values"], a["image_grid_hw"]) + tower(b["pixel_values"], b["image_grid_hw"])
    assert len(joint) == 4
    for x, y in zip(joint, alone):
        torch.testing.assert_close(x, y)


def _samples():
    return [
        _user(_text("What is two plus two?")),
        _user({"type": "image", "image": _image(50, 30)}, _text("Describe.")),
        _user({"type": "audio", "audio": (_audio(2.0), 16000)}, _text("Transcribe.")),
        _user({"type": "video", "video": _video(3)}, _text("What happens?")),
        _user({"type": "image", "image": _image(24, 40, seed=5)}, {"type": "audio", "audio": _audio(1.0, seed=6)}),
    ]


def test_mixed_modality_batch_equals_each_sample_alone(micro):
    model, proc = micro
    samples = _samples()
    batch = proc.apply_chat_template(samples)  # left padding
    with torch.no_grad():
        batched = model(**batch).logits
        for i, sample in enumerate(samples):
            single = proc.apply_chat_template(sample)
            logits = model(**single).logits[0]
            n = logits.shape[0]
            assert int(batch["attention_mask"][i].sum()) == n
            torch.testing.assert_close(batched[i, -n:], logits, atol=2e-5, rtol=1e-4)


def test_generate_with_cache_equals_without(micro):
    model, proc = micro
    batch = proc.apply_chat_template(_samples())
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 6


def test_media_encoders_run_only_at_prefill(micro, monkeypatch):
    model, proc = micro
    calls = []
    original = model.model.embed_multimodal

    def spy(input_ids, **media):
        calls.append(sorted(k for k, v in media.items() if v is not None))
        return original(input_ids, **media)

    monkeypatch.setattr(model.model, "embed_multimodal", spy)
    inputs = proc.apply_chat_template(_user({"type": "image", "image": _image(40, 40)}, _text("hi")))
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert calls[0] == ["image_grid_hw", "pixel_values"]
    assert all(c == [] for c in calls[1:]) and len(calls) == 4


def test_absent_modalities_encode_nothing(micro, monkeypatch):
    model, proc = micro

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran for an absent modality")

    monkeypatch.setattr(model.model.vision_tower, "forward", boom)
    monkeypatch.setattr(model.model.audio_encoder, "forward", boom)
    inputs = proc.apply_chat_template(_user(_text("only text")))
    assert set(inputs) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        model(**inputs)


def test_model_without_vision_rejects_images():
    tok = micro_tokenizer()
    config = micro_config(tok)
    config.vision_config = None
    model = OlaForConditionalGeneration(config).eval()
    assert model.model.vision_tower is None
    proc = micro_processor(tok, micro_config(tok))
    inputs = proc.apply_chat_template(_user({"type": "image", "image": _image(32, 32)}))
    with pytest.raises(InputError, match="no image encoder"):
        model(**inputs)


def test_placeholder_mismatch_is_a_clear_error(micro):
    model, proc = micro
    inputs = proc.apply_chat_template(_user({"type": "image", "image": _image(32, 32)}, _text("hi")))
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 65  # one placeholder fewer
    inputs["input_ids"] = ids
    with pytest.raises(InputError, match=r"images: \d+ embeddings from 1 item\(s\) but \d+ placeholder"):
        model(**inputs)


def test_labels_give_loss_on_answer_tokens_only(micro):
    model, proc = micro
    inputs = proc.apply_chat_template(_user({"type": "image", "image": _image(32, 32)}, _text("hi")))
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    out = model(**inputs, labels=labels)
    logits = out.logits[0, -4:-1]
    expected = torch.nn.functional.cross_entropy(logits, inputs["input_ids"][0, -3:])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.vision_connector.proj1.weight.grad is not None


def test_save_and_load_round_trip_with_safetensors(micro, tmp_path):
    model, proc = micro
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    config = OlaConfig.from_pretrained(tmp_path)
    assert config.vision_config.patch_size == model.config.vision_config.patch_size
    assert config.audio_connector == model.config.audio_connector
    loaded = OlaForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc2 = OlaProcessor.from_pretrained(tmp_path)
    sample = _samples()[4]
    a, b = proc.apply_chat_template(sample), proc2.apply_chat_template(sample)
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**a).logits, loaded(**b).logits, atol=0, rtol=0)


def test_beats_features_are_concatenated_to_whisper():
    tok = micro_tokenizer()
    config = micro_config(tok, beats=True)
    model = OlaForConditionalGeneration(config).eval()
    proc = micro_processor(tok, config)
    encoder = model.model.audio_encoder
    assert encoder.hidden_size == config.audio_config.d_model + config.beats_config.encoder_embed_dim
    inputs = proc(["<audio>", "<audio>"], audio=[_audio(1.5), _audio(4.0, seed=2)])
    assert "audio_values" in inputs
    with torch.no_grad():
        chunks = encoder(inputs["input_features"], inputs["feature_attention_mask"], inputs["audio_values"],
                         inputs["audio_values_mask"])
        alone = proc("<audio>", audio=[_audio(1.5)])
        single = encoder(alone["input_features"], alone["feature_attention_mask"], alone["audio_values"],
                         alone["audio_values_mask"])
        logits = model(**inputs).logits
    assert chunks[0].shape[-1] == encoder.hidden_size
    torch.testing.assert_close(chunks[0], single[0], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(logits).all()


def test_unknown_connector_is_a_config_error():
    from omniola import ConfigError

    tok = micro_tokenizer()
    with pytest.raises(ConfigError, match="vision_connector.type is 'nope'"):
        OlaForConditionalGeneration(micro_config(tok, vision_connector={"type": "nope"}))
