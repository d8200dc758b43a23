"""The Ola omni-modal model: vision tower + audio encoder(s) + connectors + a transformers causal LM.

`forward` reads as a list: embed the text; for each modality present in the batch, get its features and scatter
them into that modality's placeholder tokens; run the LLM. Absent modalities are `None` and cost nothing. Media
inputs are used at prefill only; decoding steps run on the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from .configuration_ola import OlaConfig
from .errors import ConfigError, InputError
from .modeling.audio import OlaAudioEncoder
from .modeling.connectors import (
    AudioConnector,
    ScaledCode,
    VisionConnector,
    audio_connector_class,
    audio_layout_mask,
    ctc_labels,
    vision_connector_class,
)
from .modeling.vision import OlaVisionTower


def _split_flat(states: torch.Tensor, grids) -> list[torch.Tensor]:
    """`[sum(h*w), C]` -> one `[h*w, C]` tensor per `(h, w)` grid."""
    return list(states.split([int(h) * int(w) for h, w in grids]))

# Inputs that only matter at prefill; generate() drops them on decoding steps.
PREFILL_ONLY_INPUTS = (
    "pixel_values",
    "image_grid_hw",
    "pixel_values_videos",
    "video_grid_thw",
    "input_features",
    "feature_attention_mask",
    "audio_values",
    "audio_values_mask",
    "audio_num_chunks",
    "image_tower_states",
    "video_tower_states",
    "audio_encoder_states",
    "audio_encoder_lengths",
)


@dataclass
class OlaCausalLMOutputWithPast(ModelOutput):
    """Output of `OlaForConditionalGeneration.forward`.

    Args:
        loss: Next-token cross entropy over positions whose label is not -100.
        logits: `[B, L, vocab]` (or the last `logits_to_keep` positions).
        cache: The KV cache.
        hidden_states / attentions: As returned by the language model when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class OlaPreTrainedModel(PreTrainedModel):
    config_class = OlaConfig
    config: OlaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    _no_split_modules = ["OlaVisionLayer", "WhisperEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (VisionConnector, AudioConnector)):
            # The connectors' own parameters are the learned begin/end/newline/separator vectors (as in Ola).
            for param in module.parameters(recurse=False):
                init.normal_(param, mean=0.0, std=param.shape[-1] ** -0.5)
        elif isinstance(module, ScaledCode):
            init.constant_(module.gain, module.INIT_GAIN)
        elif isinstance(module, OlaModel) and module.config.snap_audio_tokens and module.audio_connector is not None:
            init.zeros_(module.audio_snap_blank)  # no blank yet: nothing is snapped until a ctc stage sets it
            init.ones_(module.audio_snap_ids)


class OlaModel(OlaPreTrainedModel):
    """Towers, connectors and the language model without its head."""

    def __init__(self, config: OlaConfig):
        super().__init__(config)
        text_hidden = config.text_config.hidden_size
        self.vision_tower = self.vision_connector = None
        if config.vision_config is not None:
            self.vision_tower = OlaVisionTower(config.vision_config)
            cls, options = vision_connector_class(config.vision_connector)
            self.vision_connector = cls(config.vision_config.hidden_size, text_hidden, **options)
        self.audio_encoder = self.audio_connector = None
        if config.audio_config is not None:
            self.audio_encoder = OlaAudioEncoder(config.audio_config, config.beats_config)
            cls, options = audio_connector_class(config.audio_connector)
            self.audio_connector = cls(self.audio_encoder.hidden_size, text_hidden, **options)
            if config.snap_audio_tokens:  # the CTC readout's blank and the ids it may read (set_audio_snap)
                self.register_buffer("audio_snap_blank", torch.zeros(text_hidden))
                self.register_buffer("audio_snap_ids", torch.ones(config.text_config.vocab_size, dtype=torch.bool))
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @property
    def views_per_image(self) -> int:
        """Tower views per picture: a global view and the native one, or the native one alone."""
        return 2 if self.config.image_views == "global+native" else 1

    def _require(self, module: nn.Module | None, modality: str) -> nn.Module:
        if module is None:
            raise InputError(f"this model has no {modality} encoder, but {modality} inputs were given")
        return module

    def get_image_features(
        self, pixel_values: torch.Tensor | None, image_grid_hw: torch.Tensor, tower_states: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Images as flattened patches of all their views -> one `[tokens, D]` tensor per image.

        `tower_states` `[patches, C]`: the vision tower's outputs for all views, precomputed (a frozen tower's
        feature cache); then `pixel_values` is not needed.
        """
        tower = self._require(self.vision_tower, "image")
        grids = [tuple(g) for g in image_grid_hw.tolist()]
        views = tower(pixel_values, image_grid_hw) if tower_states is None else _split_flat(tower_states, grids)
        return self.vision_connector.forward_images(views, grids, self.views_per_image)

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | None,
        video_grid_thw: torch.Tensor,
        tower_states: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Videos as flattened patches of all their frames -> one `[tokens, D]` tensor per video.

        `tower_states` `[patches, C]`: the vision tower's outputs for all frames, precomputed.
        """
        tower = self._require(self.vision_tower, "video")
        thw = video_grid_thw.tolist()
        frame_grids = torch.tensor([[h, w] for t, h, w in thw for _ in range(t)], dtype=torch.long)
        if tower_states is None:
            frames = tower(pixel_values_videos, frame_grids)
        else:
            frames = _split_flat(tower_states, frame_grids.tolist())
        videos, i = [], 0
        for t, _, _ in thw:
            videos.append(torch.stack(frames[i : i + t]))  # (T, h*w, C)
            i += t
        return self.vision_connector.forward_videos(videos, [(h, w) for _, h, w in thw])

    def get_audio_features(
        self,
        input_features: torch.Tensor,
        feature_attention_mask: torch.Tensor | None,
        audio_num_chunks: torch.Tensor | None,
        audio_values: torch.Tensor | None = None,
        audio_values_mask: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
        snap: bool = True,
    ) -> list[torch.Tensor]:
        """30 s chunks of log-mel (and waveform, for BEATs) -> one `[tokens, D]` tensor per audio clip.

        `encoder_states` `[frames, C]` + `encoder_lengths` `[chunks]`: the audio encoder's outputs for all chunks,
        precomputed (a frozen encoder's feature cache); then the log-mel and waveforms are not needed. `snap=False`:
        the connector's tokens as they are, also with `config.snap_audio_tokens` (the CTC stage and readouts).
        """
        encoder = self._require(self.audio_encoder, "audio")
        if encoder_states is None:
            chunks = encoder(input_features, feature_attention_mask, audio_values, audio_values_mask)
        else:
            chunks = list(encoder_states.split(encoder_lengths.tolist()))
        if self.config.round_audio_features_to_bf16:  # what the released Ola weights were trained with
            chunks = [c.to(torch.bfloat16).to(c.dtype) for c in chunks]
        per_clip = [1] * len(chunks) if audio_num_chunks is None else audio_num_chunks.tolist()
        clips = self.audio_connector(chunks, per_clip)
        if snap and self.config.snap_audio_tokens and bool(self.audio_snap_blank.any()):
            clips = list(self._snap_to_words(torch.cat(clips)).split([len(c) for c in clips]))
        return clips

    def set_audio_snap(self, blank: torch.Tensor, ignore_ids: torch.Tensor) -> None:
        """Stores a `ctc` stage's blank and the ids its readout never reads (special tokens): from then on, with
        `config.snap_audio_tokens`, audio tokens read as a word are that word's embedding."""
        if not self.config.snap_audio_tokens:
            raise ConfigError("set_audio_snap needs a model built with snap_audio_tokens: true")
        self.audio_snap_blank.copy_(blank.detach())
        self.audio_snap_ids.fill_(True)
        self.audio_snap_ids[ignore_ids[ignore_ids < len(self.audio_snap_ids)].to(self.audio_snap_ids.device)] = False

    def _snap_to_words(self, clip: torch.Tensor) -> torch.Tensor:
        """`config.snap_audio_tokens`: each token the CTC readout reads as a word becomes that word's input
        embedding in the forward pass; the gradient passes straight through to the connector. All of a batch's
        clips at once (`[T, D]`): the readout normalises the whole embedding table per call."""
        table = self.get_input_embeddings().weight.detach()
        labels = ctc_labels(table, self.audio_snap_blank, clip.detach(), (~self.audio_snap_ids).nonzero()[:, 0])
        words = ((labels >= 0) & ~audio_layout_mask(self.audio_connector, clip))[:, None]
        return torch.where(words, clip + (table[labels.clamp(min=0)].to(clip.dtype) - clip).detach(), clip)

    @staticmethod
    def _scatter(
        inputs_embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: list[torch.Tensor], name: str
    ) -> torch.Tensor:
        mask = input_ids == token_id  # (B, L)
        n_tokens = int(mask.sum())
        feats = torch.cat(features)
        if n_tokens != feats.shape[0]:
            raise InputError(
                f"{name}: {feats.shape[0]} embeddings from {len(features)} item(s) but {n_tokens} placeholder "
                f"tokens (id {token_id}) in input_ids; build inputs with OlaProcessor so the counts agree"
            )
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds)  # (B, L, D)
        return inputs_embeds.masked_scatter(mask, feats.to(inputs_embeds.device, inputs_embeds.dtype))

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_num_chunks: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        audio_values_mask: torch.Tensor | None = None,
        image_tower_states: torch.Tensor | None = None,
        video_tower_states: torch.Tensor | None = None,
        audio_encoder_states: torch.Tensor | None = None,
        audio_encoder_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with every modality's features scattered into its placeholders. Returns `[B, L, D]`.

        `*_states` are precomputed encoder outputs (see `get_image_features` etc.) used in place of the raw media.
        """
        cfg = self.config
        # Placeholder ids may lie past the LLM's vocabulary (the LM head never emits them): look up a harmless id
        # there, their embeddings are overwritten below.
        ids = [i for i in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id) if i is not None]
        placeholder = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        if pixel_values is not None or image_tower_states is not None:
            feats = self.get_image_features(pixel_values, image_grid_hw, image_tower_states)
            inputs_embeds = self._scatter(inputs_embeds, input_ids, cfg.image_token_id, feats, "images")
        if pixel_values_videos is not None or video_tower_states is not None:
            feats = self.get_video_features(pixel_values_videos, video_grid_thw, video_tower_states)
            inputs_embeds = self._scatter(inputs_embeds, input_ids, cfg.video_token_id, feats, "videos")
        if input_features is not None or audio_encoder_states is not None:
            feats = self.get_audio_features(
                input_features, feature_attention_mask, audio_num_chunks, audio_values, audio_values_mask,
                audio_encoder_states, audio_encoder_lengths,
            )
            inputs_embeds = self._scatter(inputs_embeds, input_ids, cfg.audio_token_id, feats, "audio")
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_num_chunks: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        audio_values_mask: torch.Tensor | None = None,
        image_tower_states: torch.Tensor | None = None,
        video_tower_states: torch.Tensor | None = None,
        audio_encoder_states: torch.Tensor | None = None,
        audio_encoder_lengths: torch.Tensor | None = None,
        **kwargs,
    ):
        """The language model's output on text with the media embeddings scattered in (see `embed_multimodal`)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_multimodal(
                input_ids,
                pixel_values=pixel_values,
                image_grid_hw=image_grid_hw,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
                input_features=input_features,
                feature_attention_mask=feature_attention_mask,
                audio_num_chunks=audio_num_chunks,
                audio_values=audio_values,
                audio_values_mask=audio_values_mask,
                image_tower_states=image_tower_states,
                video_tower_states=video_tower_states,
                audio_encoder_states=audio_encoder_states,
                audio_encoder_lengths=audio_encoder_lengths,
            )
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # Left padding: positions count real tokens only, so a padded sample matches itself alone.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )


class OlaForConditionalGeneration(OlaPreTrainedModel, GenerationMixin):
    """Ola with its language-modelling head: loss from `labels`, and `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: OlaConfig):
        super().__init__(config)
        self.model = OlaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_num_chunks: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        audio_values_mask: torch.Tensor | None = None,
        image_tower_states: torch.Tensor | None = None,
        video_tower_states: torch.Tensor | None = None,
        audio_encoder_states: torch.Tensor | None = None,
        audio_encoder_lengths: torch.Tensor | None = None,
        loss_only: bool = False,
        **kwargs,
    ) -> OlaCausalLMOutputWithPast:
        """Runs the model.

        Args:
            input_ids: `[B, L]` token ids with placeholders already expanded by `OlaProcessor`.
            attention_mask: `[B, L]`, 1 on real tokens (left or right padding).
            labels: `[B, L]` targets, -100 where no loss is taken (prompt, placeholders, padding).
            logits_to_keep: Compute logits for the last N positions only (0 = all).
            pixel_values / image_grid_hw: Images as flattened patches of all views, and each view's patch grid.
            pixel_values_videos / video_grid_thw: Video frames as flattened patches, and (frames, rows, columns).
            input_features / feature_attention_mask: Whisper log-mel of 30 s chunks `[chunks, mels, T]` + mask.
            audio_num_chunks: Chunks per audio clip `[clips]`.
            audio_values / audio_values_mask: Raw waveforms of the chunks, for a BEATs encoder.
            image_tower_states / video_tower_states / audio_encoder_states + audio_encoder_lengths: Precomputed
                encoder outputs (flat over views / frames / chunks) used instead of the raw media.
            loss_only: With `labels`, run the LM head only where a label is taken and return no logits (training:
                saves the head's cost on prompt and media tokens; the loss is the same).
            **kwargs: Passed to the language model.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            input_features=input_features,
            feature_attention_mask=feature_attention_mask,
            audio_num_chunks=audio_num_chunks,
            audio_values=audio_values,
            audio_values_mask=audio_values_mask,
            image_tower_states=image_tower_states,
            video_tower_states=video_tower_states,
            audio_encoder_states=audio_encoder_states,
            audio_encoder_lengths=audio_encoder_lengths,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        loss = logits = None
        if loss_only:
            if labels is None:
                raise ValueError("loss_only=True needs labels")
            targets = labels[:, 1:].to(hidden.device)
            taken = targets != -100
            # (labelled positions, V), in the head's own dtype: under autocast, casting the [V, D] head to bf16
            # costs more than this product over the few labelled positions (about 0.3 s of a 3-4 s step on CPU)
            with torch.autocast(hidden.device.type, enabled=False):
                logits_taken = self.lm_head(hidden[:, :-1][taken].to(self.lm_head.weight.dtype)).float()
            # sum / count rather than mean: a batch without any label gives 0 (with a graph), not NaN
            loss = F.cross_entropy(logits_taken, targets[taken], reduction="sum") / taken.sum().clamp(min=1)
            return OlaCausalLMOutputWithPast(loss=loss, cache=outputs.cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if labels is not None:
            shift_logits = logits[:, :-1].float()  # (B, L-1, V)
            shift_labels = labels[:, 1:].to(logits.device)  # (B, L-1)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1))
        return OlaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in PREFILL_ONLY_INPUTS:
                inputs.pop(key, None)
        return inputs


AutoModel.register(OlaConfig, OlaModel, exist_ok=True)
AutoModelForImageTextToText.register(OlaConfig, OlaForConditionalGeneration, exist_ok=True)
