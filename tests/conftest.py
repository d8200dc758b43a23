"""Shared fixtures: micro random models built in the tests, never downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; read by huggingface_hub at import

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperFeatureExtractor

from omniola import OlaConfig, OlaForConditionalGeneration, OlaProcessor, OlaVisionConfig
from omniola.processing_ola import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "ola_reference_tiny"


def tone(seconds: float, freq: float = 440.0, rate: int = 16000) -> np.ndarray:
    """A sine tone at amplitude 0.3, float32 mono."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def turns(*values: str) -> list[dict]:
    """Ola conversation turns, alternating human / gpt."""
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def micro_tokenizer(lossless: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ChatML specials and the three placeholders (vocab 256 + 6). Whitespace and other
    non-printing characters all become one unknown token, unless `lossless` (each its own token: decoding gives the
    text back, as box answers need)."""
    vocab = {chr(i) if (32 < i < 127 or lossless and i) else f"<0x{i:02X}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0x00>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0x00>")
    fast.add_special_tokens(
        {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN]}
    )
    return fast


def micro_config(tokenizer, *, beats: bool = False, image_views: str = "global+native", **kwargs) -> OlaConfig:
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN])
    text = LlamaConfig(
        vocab_size=min(ids),  # placeholders lie past the LLM vocabulary, as in `omniola build`
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    vision = OlaVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             patch_size=8, position_grid=6)
    audio = WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                          num_mel_bins=20, max_source_positions=1500, decoder_layers=1, vocab_size=64,
                          pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    beats_config = None
    if beats:
        from omniola.modeling.beats import BeatsConfig

        beats_config = BeatsConfig(encoder_layers=1, encoder_embed_dim=16, encoder_ffn_embed_dim=32,
                                   encoder_attention_heads=2, embed_dim=24, conv_pos=16, conv_pos_groups=4)
    return OlaConfig(
        text_config=text, vision_config=vision, audio_config=audio, beats_config=beats_config,
        audio_connector={"type": "ola_concat", "frames_per_token": 5, "intermediate_size": 48},
        image_views=image_views, image_token_id=ids[0], video_token_id=ids[1], audio_token_id=ids[2], **kwargs,
    )


def micro_processor(tokenizer, config: OlaConfig, **overrides) -> OlaProcessor:
    settings = dict(
        patch_size=config.vision_config.patch_size, image_views=config.image_views,
        global_view_pixels=32 * 32, image_min_pixels=16 * 16, image_max_pixels=64 * 64,
        video_min_pixels=16 * 16, video_max_pixels=32 * 32, video_num_frames=3,
        audio_connector=config.audio_connector, vision_connector=config.vision_connector,
        use_beats=config.beats_config is not None,
    )
    settings.update(overrides)
    return OlaProcessor(tokenizer, WhisperFeatureExtractor(feature_size=20), **settings)


def micro_model(step_delay_s: float = 0.0):
    """(model, processor) of a micro random Ola in float32, eval mode; with `step_delay_s`, every forward pass (each
    decoding step) first sleeps that long, so server tests can hold generations in flight."""
    tokenizer = micro_tokenizer()
    config = micro_config(tokenizer)
    model = OlaForConditionalGeneration(config).eval()
    if step_delay_s:
        forward = model.forward

        def slow_forward(*args, **kwargs):
            time.sleep(step_delay_s)
            return forward(*args, **kwargs)

        model.forward = slow_forward
    return model, micro_processor(tokenizer, config)


@pytest.fixture
def micro():
    """(model, processor) of a micro random Ola in float32, eval mode."""
    return micro_model()


def micro_model_and_world(root: Path, lossless: bool = False) -> Path:
    """Saves a micro random model at `root/micro` and builds the small tiny world at `root/world` (training tests);
    `lossless`: the model's tokenizer gives text back exactly (`micro_tokenizer(lossless=True)`)."""
    from omniola.data.tiny_world import build_tiny_world

    torch.manual_seed(0)
    tokenizer = micro_tokenizer(lossless)
    config = micro_config(tokenizer)
    OlaForConditionalGeneration(config).save_pretrained(root / "micro")
    micro_processor(tokenizer, config).save_pretrained(root / "micro")
    build_tiny_world(root / "world", seed=3, scale="small", progress=False)
    return root


@pytest.fixture
def micro_dir(micro, tmp_path) -> Path:
    """The `micro` model and processor saved as a model directory (what `load_model` and the CLI read)."""
    model, proc = micro
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


class LiveServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread (for tests that need a real server)."""

    def __init__(self, app, timeout_s: float = 30.0):
        import socket
        import threading
        import time

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
