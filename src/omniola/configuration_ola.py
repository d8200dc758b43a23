"""Configuration of the Ola omni-modal model.

`OlaConfig` is one tree: the language model (`text_config`, any transformers causal LM), the vision tower
(`vision_config`), the Whisper speech encoder (`audio_config`, a `WhisperConfig`), the optional BEATs encoder for
non-speech audio (`beats_config`) and the two connectors. A checkpoint's `config.json` therefore describes the whole
model, and `save_pretrained` / `from_pretrained` round-trip it.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from .errors import ConfigError
from .modeling.beats import BeatsConfig


@strict
class OlaVisionConfig(PreTrainedConfig):
    """A SigLIP-style ViT that reads images at their native resolution (Ola's OryxViT idea).

    Parameter names follow transformers' SigLIP so a SigLIP vision checkpoint loads into it directly.

    Args:
        hidden_size: Width of the transformer.
        intermediate_size: Width of the MLP.
        num_hidden_layers: Number of transformer layers.
        num_attention_heads: Number of attention heads.
        num_channels: Image channels.
        patch_size: Side of a square patch in pixels.
        position_grid: The learned absolute position embedding is a `position_grid x position_grid` grid,
            interpolated to each image's patch grid.
        position_interpolation: `"bilinear"` (OryxViT) or `"bicubic"` (SigLIP's `interpolate_pos_encoding`).
        hidden_act: MLP activation (`"gelu_pytorch_tanh"` for SigLIP, `"gelu"` for OryxViT).
        layer_norm_eps: LayerNorm epsilon.
        post_layernorm: Apply a final LayerNorm to the features (SigLIP has one; Ola uses the pre-norm output).
        attention_dropout: Dropout on attention probabilities during training.
    """

    model_type = "ola_vision"
    base_config_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    position_grid: int = 24
    position_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    post_layernorm: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
                f"vision_config.num_attention_heads ({self.num_attention_heads})"
            )


VISION_PRESETS: dict[str, dict] = {
    # name: (width, layers, heads, mlp); `scratch:<name>` in `omniola build`.
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, position_grid=8),
    "tiny": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3, position_grid=16),
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    # SigLIP so400m/16 as used by Ola-7B (OryxViT), position grid 2048/16.
    "so400m": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, position_grid=128
    ),
}


def vision_preset(name: str, **overrides) -> OlaVisionConfig:
    """Builds an `OlaVisionConfig` from a named preset plus overrides.

    Raises:
        ConfigError: `name` is not a preset.
    """
    if name not in VISION_PRESETS:
        raise ConfigError(f"unknown vision preset {name!r}; choose one of {sorted(VISION_PRESETS)}")
    return OlaVisionConfig(**{**VISION_PRESETS[name], **overrides})


@strict
class OlaConfig(PreTrainedConfig):
    """The whole Ola model.

    Args:
        text_config: The language model's config (any transformers causal LM: Qwen2 as in Ola-7B, Llama for
            SmolLM2).
        vision_config: The vision tower, or `None` for a model without vision.
        audio_config: The Whisper speech encoder (`WhisperConfig`; only its encoder is used), or `None`.
        beats_config: The optional BEATs encoder for non-speech audio; its features are concatenated to Whisper's
            along channels.
        vision_connector: `{"type": <registry name>, ...options}`; see `omniola.modeling.connectors`.
        audio_connector: `{"type": <registry name>, ...options}`; Ola's is `"ola_concat"` with
            `frames_per_token` (k, the number of encoder frames concatenated into one LLM token).
        image_views: `"global+native"` shows a still image twice, a low-resolution global view and the native view
            joined by a separator (Ola); `"native"` shows the native view only.
        audio_padding: `"variable"` encodes each clip at its own length (a 3 s clip costs a tenth of a 30 s one);
            `"fixed"` pads every chunk to 30 s as Ola does (compatibility mode).
        round_audio_features_to_bf16: Round the speech encoder output through bfloat16 before the connector, as the
            released Ola weights were trained (compatibility mode).
        snap_audio_tokens: Replace each audio token that the speech connector's CTC readout reads as a word by that
            word's input embedding, exactly (straight-through gradient); tokens read as the blank and the layout
            vectors stay. The `ctc` stage aligns tokens to words by cosine, and the LLM picks out what a spoken
            word names only from tokens that are the word (docs/training.md, "Spoken words that select"). Off in
            Ola; active once a `ctc` stage has stored its blank in the model (`OlaModel.set_audio_snap`).
        image_token_id / video_token_id / audio_token_id: Placeholder token ids in the LLM vocabulary.
    """

    model_type = "ola"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": SubConfigSpec(config_class=OlaVisionConfig, optional=True),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
        "beats_config": SubConfigSpec(config_class=BeatsConfig, optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    beats_config: dict | PreTrainedConfig | None = None
    vision_connector: dict | None = None
    audio_connector: dict | None = None
    image_views: Literal["global+native", "native"] = "global+native"
    audio_padding: Literal["variable", "fixed"] = "variable"
    round_audio_features_to_bf16: bool = False
    snap_audio_tokens: bool = False
    image_token_id: int | None = None
    video_token_id: int | None = None
    audio_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_connector is None:
            self.vision_connector = {"type": "ola_pooling"}
        if self.audio_connector is None:
            self.audio_connector = {"type": "ola_concat", "frames_per_token": 5, "intermediate_size": 2048}
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def validate_architecture(self):
        super().validate_architecture()
        for name in ("vision_connector", "audio_connector"):
            value = getattr(self, name)
            if not isinstance(value, dict) or "type" not in value:
                raise ConfigError(f"{name} must be a dict with a 'type' key, got {value!r}")
        if self.beats_config is not None and self.audio_config is None:
            raise ConfigError("beats_config needs audio_config: BEATs features are concatenated to Whisper's")

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size


# Let transformers' Auto classes (AutoConfig, and AutoTokenizer reading config.json) recognise omniola checkpoints.
AutoConfig.register(OlaVisionConfig.model_type, OlaVisionConfig, exist_ok=True)
AutoConfig.register(BeatsConfig.model_type, BeatsConfig, exist_ok=True)
AutoConfig.register(OlaConfig.model_type, OlaConfig, exist_ok=True)
