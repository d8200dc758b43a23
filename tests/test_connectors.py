"""Connector choices beside Ola's (`mlp2x_gelu`, `qformer`, `upm`) on micro random models: the processor's token
counts match what each connector produces, batching, gradients, save/load, option errors, and one training step
for every registered connector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from omniola import ConfigError, OlaConfig, OlaForConditionalGeneration, OlaProcessor
from omniola.media import VideoClip
from omniola.modeling.connectors import (
    AUDIO_CONNECTORS,
    VISION_CONNECTORS,
    OlaConcatConnector,
    OlaPoolingConnector,
)

from conftest import micro_config, micro_processor, micro_tokenizer

NEW = ["mlp2x_gelu", "qformer", "upm"]
PLACE_TIME = {"type": "ola_pooling", "position_embedding": "sincos2d", "time_embedding": "sincos"}
# (vision, audio) specs of the batching and save/load tests: each new connector, and Ola's with place and time
SPECS = {**{name: ({"type": name}, {"type": name}) for name in NEW}, "ola_pooling+place+time": (PLACE_TIME, None)}
IMAGE_SIZES = [(50, 30), (30, 70), (16, 16), (200, 20), (400, 300)]
AUDIO_SECONDS = [0.4, 1.3, 3.0, 65.0]  # 65 s: three 30 s chunks


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _video(frames: int = 3, w: int = 40, h: int = 24, seed: int = 0) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip(frames=rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8),
                     timestamps=np.arange(frames, dtype=np.float64), duration=float(frames), audio=None)


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def _omni_sample(seed: int = 0) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image", "image": _image(50, 30, seed)},
        {"type": "video", "video": _video(3, seed=seed)},
        {"type": "audio", "audio": _audio(2.0, seed)},
        {"type": "text", "text": "What is shown and said?"},
    ]}]


def _build(vision: dict | None = None, audio: dict | None = None, image_views: str = "global+native"):
    """A micro Ola with the given connector specs (`None`: Ola's), in eval mode, and its processor."""
    tok = micro_tokenizer()
    config = micro_config(tok, image_views=image_views)
    if vision is not None:
        config.vision_connector = vision
    if audio is not None:
        config.audio_connector = audio
    model = OlaForConditionalGeneration(config).eval()
    return model, micro_processor(tok, config)


def _features(model, inputs) -> dict[str, list[torch.Tensor]]:
    m = model.model
    return {
        "images": m.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"]),
        "videos": m.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]),
        "audio": m.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"],
                                      inputs["audio_num_chunks"]),
    }


# ------------------------------------------------------------------------------------------------ forward, grads


@pytest.mark.parametrize("name", NEW)
def test_forward_and_gradients_reach_every_connector_parameter(name):
    model, proc = _build({"type": name}, {"type": name})
    model.train()
    inputs = proc.apply_chat_template(_omni_sample())
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100
    out = model(**inputs, labels=labels)  # no placeholder count mismatch
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for connector in (model.model.vision_connector, model.model.audio_connector):
        assert connector.connector_name == name
        for pname, p in connector.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


# ------------------------------------------------------------------------------------------------- token counts


def _documented_image_tokens(name: str, grids: list[tuple[int, int]]) -> int:
    if name == "qformer":
        return 32 + 2  # the default num_queries, whatever the size or number of views
    if name == "upm":
        return OlaPoolingConnector.num_image_tokens(grids, {})  # same 2x2 budget as Ola's pooling
    return sum(h * (w + 1) for h, w in grids) + len(grids) - 1 + 2  # mlp2x_gelu: one token per patch


@pytest.mark.parametrize("views", ["global+native", "native"])
@pytest.mark.parametrize("name", NEW)
def test_image_token_counts_for_several_aspect_ratios(name, views):
    model, proc = _build({"type": name}, image_views=views)
    for size in IMAGE_SIZES:
        inputs = proc("<image>", images=[_image(*size)])
        with torch.no_grad():
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"])
        grids = [tuple(g) for g in inputs["image_grid_hw"].tolist()]
        n_placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert feats[0].shape == (n_placeholders, model.config.text_config.hidden_size), size
        assert n_placeholders == proc.num_image_tokens(*size) == _documented_image_tokens(name, grids), size


@pytest.mark.parametrize("name", NEW)
def test_video_token_counts(name):
    model, proc = _build({"type": name})
    for frames, w, h in [(3, 40, 24), (2, 24, 64), (5, 32, 32)]:
        clip = _video(frames, w, h)
        inputs = proc("<video>", videos=[clip])
        with torch.no_grad():
            feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        t, gh, gw = inputs["video_grid_thw"][0].tolist()
        expected = {
            "qformer": t * (32 + 1) + 2,
            "upm": OlaPoolingConnector.num_video_tokens(t, (gh, gw), {}),
            "mlp2x_gelu": t * (gh * (gw + 1) + 1) + 2,
        }[name]
        assert feats[0].shape[0] == int((inputs["input_ids"] == model.config.video_token_id).sum())
        assert feats[0].shape[0] == proc.num_video_tokens(clip) == expected


@pytest.mark.parametrize("name", NEW)
def test_audio_token_counts(name):
    model, proc = _build(audio={"type": name})
    ola = OlaConcatConnector.num_audio_tokens
    for seconds in AUDIO_SECONDS:
        inputs = proc("<audio>", audio=[_audio(seconds)])
        with torch.no_grad():
            feats = model.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"],
                                                   inputs["audio_num_chunks"])
        chunks = int(inputs["audio_num_chunks"][0])
        frames = [int(n) // 2 for n in inputs["feature_attention_mask"].sum(-1)]  # Whisper's conv stride 2
        expected = chunks * (32 + 1) + 2 if name == "qformer" else ola(frames, {"frames_per_token": 5})
        assert feats[0].shape[0] == int((inputs["input_ids"] == model.config.audio_token_id).sum())
        assert feats[0].shape[0] == proc.num_audio_tokens(len(_audio(seconds))) == expected, seconds


@pytest.mark.parametrize("name", ["mlp2x_gelu", "upm"])
def test_variable_audio_chunks_are_padded_to_whole_tokens_with_the_default_k(name):
    """`frames_per_token` left out of the spec is the connector's default (5), and the processor pads to it."""
    _, proc = _build(audio={"type": name})
    inputs = proc("<audio>", audio=[_audio(1.3)])
    assert inputs["input_features"].shape[-1] % (2 * 5) == 0  # mel frames: conv stride 2 * k


def test_qformer_options_set_the_token_count():
    model, proc = _build({"type": "qformer", "num_queries": 5, "num_layers": 1, "num_heads": 2, "hidden_size": 24},
                         {"type": "qformer", "num_queries": 3})
    inputs = proc.apply_chat_template(_omni_sample())
    with torch.no_grad():
        feats = _features(model, inputs)
    assert feats["images"][0].shape[0] == 5 + 2
    assert feats["videos"][0].shape[0] == 3 * (5 + 1) + 2
    assert feats["audio"][0].shape[0] == 1 * (3 + 1) + 2
    assert len(model.model.vision_connector.qformer.layers) == 1
    with torch.no_grad():
        model(**inputs)


# ---------------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("name", SPECS)
def test_mixed_sizes_batched_equal_one_at_a_time(name):
    model, proc = _build(*SPECS[name])
    connector_v = model.model.vision_connector
    images = [_image(40, 24), _image(16, 48, seed=2), _image(300, 100, seed=3)]
    clips = [_video(3, 40, 24), _video(2, 24, 64, seed=1)]
    sounds = [_audio(1.3), _audio(4.7, seed=3), _audio(65.0, seed=4)]
    with torch.no_grad():
        # the connectors alone, on the same encoder outputs
        inputs = proc("<image>" * 3 + "<video>" * 2 + "<audio>" * 3, images=images, videos=clips, audio=sounds)
        grids = [tuple(g) for g in inputs["image_grid_hw"].tolist()]
        views = model.model.vision_tower(inputs["pixel_values"], inputs["image_grid_hw"])
        joint = connector_v.forward_images(views, grids, 2)
        for i in range(3):
            alone = connector_v.forward_images(views[2 * i : 2 * i + 2], grids[2 * i : 2 * i + 2], 2)
            torch.testing.assert_close(joint[i], alone[0], atol=1e-5, rtol=1e-5)

        # the whole path (encoders included), each item processed alone
        joint = _features(model, inputs)
        for i in range(3):
            alone = _features(model, proc("<image><video><audio>", images=[images[i]], videos=[clips[i % 2]],
                                          audio=[sounds[i]]))
            torch.testing.assert_close(joint["images"][i], alone["images"][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(joint["audio"][i], alone["audio"][0], atol=1e-5, rtol=1e-5)
            if i < 2:
                torch.testing.assert_close(joint["videos"][i], alone["videos"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SPECS)
def test_mixed_modality_batch_equals_each_sample_alone(name):
    model, proc = _build(*SPECS[name])
    samples = [
        _omni_sample(),
        [{"role": "user", "content": [{"type": "text", "text": "Only text."}]}],
        [{"role": "user", "content": [{"type": "image", "image": _image(24, 64, seed=7)},
                                      {"type": "audio", "audio": _audio(0.7, seed=8)}]}],
    ]
    batch = proc.apply_chat_template(samples)
    with torch.no_grad():
        batched = model(**batch).logits
        for i, sample in enumerate(samples):
            logits = model(**proc.apply_chat_template(sample)).logits[0]
            torch.testing.assert_close(batched[i, -logits.shape[0]:], logits, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("name", SPECS)
def test_save_and_load_round_trip(name, tmp_path):
    vision, audio = SPECS[name]
    model, proc = _build(vision, audio)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    config = OlaConfig.from_pretrained(tmp_path)
    assert config.vision_connector == vision and config.audio_connector == (audio or model.config.audio_connector)
    loaded = OlaForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc2 = OlaProcessor.from_pretrained(tmp_path)
    a, b = proc.apply_chat_template(_omni_sample()), proc2.apply_chat_template(_omni_sample())
    assert torch.equal(a["input_ids"], b["input_ids"])
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        torch.testing.assert_close(model(**a).logits, loaded(**b).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ place and time (Ola's)


def test_place_and_time_options_tell_identical_content_apart_and_default_to_ola():
    """On identical patch features everywhere, Ola's connector gives every pooled token and every frame the same
    embedding; `position_embedding` makes the tokens of a view distinct, `time_embedding` the frames' blocks."""
    same = torch.randn(1, 192).expand(16, 192)  # a 4 x 4 patch grid of one feature -> 2 x 2 pooled tokens
    both = {k: v for k, v in PLACE_TIME.items() if k != "type"}
    for options, place, time in (({}, False, False), (both, True, True), ({"time_embedding": "sincos"}, False, True)):
        connector = OlaPoolingConnector(192, 32, **options)
        with torch.no_grad():
            image = connector.forward_images([same], [(4, 4)], 1)[0]  # begin, t, t, newline, t, t, newline, end
            video = connector.forward_videos([same.expand(3, 16, 192)], [(4, 4)])[0][1:-1].reshape(3, 7, 32)
        tokens = image[[1, 2, 4, 5]]
        assert torch.allclose(tokens[0], tokens[3]) != place and torch.allclose(tokens[1], tokens[2]) != place
        assert torch.allclose(video[0], video[1]) != time and torch.allclose(video[1], video[2]) != time


# ------------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "vision, audio, match",
    [
        ({"type": "nope"}, None, r"vision_connector.type is 'nope'; registered: \[.*'qformer'"),
        (None, {"type": "mlp2"}, r"audio_connector.type is 'mlp2'"),
        ({"type": "qformer", "num_querys": 4}, None,
         r"vision_connector: unknown option\(s\) \['num_querys'\] for type 'qformer'; it accepts \['num_queries'"),
        ({"type": "mlp2x_gelu", "frames_per_token": 5}, None,
         r"vision_connector: unknown option\(s\) \['frames_per_token'\]"),
        ({"type": "qformer", "num_queries": 0}, None,
         r"vision_connector.num_queries must be a positive integer, got 0"),
        ({"type": "qformer", "num_heads": 3}, None,
         r"vision_connector.num_heads \(3\) must divide the Q-Former width 16"),
        (None, {"type": "qformer", "num_layers": "2"},
         r"audio_connector.num_layers must be a positive integer, got '2'"),
        (None, {"type": "upm", "num_experts": 0}, r"audio_connector.num_experts must be a positive integer"),
        (None, {"type": "mlp2x_gelu", "frames_per_token": -1}, r"audio_connector.frames_per_token must be a positive"),
        ({"type": "upm", "expert_hidden_size": 1.5}, None, r"vision_connector.expert_hidden_size must be a positive"),
        ({"type": "ola_pooling", "position_embeding": "sincos2d"}, None,
         r"vision_connector: unknown option\(s\) \['position_embeding'\] for type 'ola_pooling'"),
        ({"type": "ola_pooling", "time_embedding": "rope"}, None,
         r"vision_connector.time_embedding must be one of \('none', 'sincos'\), got 'rope'"),
    ],
)
def test_bad_connector_type_or_option_is_a_config_error(vision, audio, match):
    tok = micro_tokenizer()
    config = micro_config(tok)
    config.vision_connector = vision or config.vision_connector
    config.audio_connector = audio or config.audio_connector
    with pytest.raises(ConfigError, match=match):
        OlaForConditionalGeneration(config)


def test_processor_rejects_unknown_options_at_construction():
    tok = micro_tokenizer()
    config = micro_config(tok)
    with pytest.raises(ConfigError, match=r"audio_connector: unknown option\(s\) \['frames'\]"):
        micro_processor(tok, config, audio_connector={"type": "upm", "frames": 4})


# ------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "registry, name, width, expected",
    [  # the module docstring's table: tiny vision tower (192) / Whisper-tiny (384) into a 576-wide LLM
        (VISION_CONNECTORS, "mlp2x_gelu", 192, 445_824),
        (VISION_CONNECTORS, "qformer", 192, 1_306_752),
        (VISION_CONNECTORS, "upm", 192, 596_739),
        (AUDIO_CONNECTORS, "mlp2x_gelu", 384, 1_440_576),
        (AUDIO_CONNECTORS, "qformer", 384, 4_970_496),
        (AUDIO_CONNECTORS, "upm", 384, 2_148_483),
    ],
)
def test_parameter_counts_match_the_documented_table(registry, name, width, expected):
    connector = registry[name](width, 576)
    assert sum(p.numel() for p in connector.parameters()) == expected


# ----------------------------------------------------------------------------------------- every one trains


@pytest.mark.parametrize(
    "kind, name",
    [("vision", n) for n in sorted(VISION_CONNECTORS)] + [("audio", n) for n in sorted(AUDIO_CONNECTORS)],
)
def test_every_registered_connector_trains(kind, name):
    """Five Adam steps on one batch, only the connector trainable: the loss goes down."""
    spec = {"type": name}
    if name == "ola_concat":
        spec.update(frames_per_token=5, intermediate_size=48)
    model, proc = _build(**{kind: spec})
    model.train()
    connector = model.model.vision_connector if kind == "vision" else model.model.audio_connector
    model.requires_grad_(False)
    connector.requires_grad_(True)
    inputs = proc.apply_chat_template(_omni_sample())
    labels = inputs["input_ids"].clone()
    labels[:, :-8] = -100
    optimizer = torch.optim.Adam(connector.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
