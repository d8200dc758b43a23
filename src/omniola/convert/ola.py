"""Original Ola checkpoints (`OlaQwenForCausalLM`, e.g. THUdyh/Ola-7b) -> omniola checkpoints.

The source directory holds `config.json` (`model_type: ola_qwen`), safetensors shards (one `model.safetensors`, or
several with `model.safetensors.index.json`), usually the Qwen2 tokenizer files, and config paths to the Whisper
(`speech_encoder`, openai-whisper `large-v3.pt`) and BEATs (`music_encoder`) checkpoints. Tensor names map as:

    model.embed_tokens / model.layers.* / model.norm   -> model.language_model.*
    lm_head.weight                                      -> lm_head.weight
    model.vision_tower.vision_tower.*  (OryxViT, timm)  -> model.vision_tower.*
        patch_embed.proj -> embeddings.patch_embedding; pos_embed [1, G*G, D] -> embeddings.position_embedding [G*G, D]
        blocks.N.{norm1, norm2} -> encoder.layers.N.{layer_norm1, layer_norm2}
        blocks.N.attn.qkv (fused) -> self_attn.{q,k,v}_proj; blocks.N.attn.proj -> self_attn.out_proj
        blocks.N.mlp.{fc1, fc2} -> mlp.{fc1, fc2}
    model.mm_projector.*                (OlaMLP)        -> model.vision_connector.*  (same names)
    model.speech_encoder.whisper_model.* (openai-whisper encoder) -> model.audio_encoder.whisper.* (transformers names)
    model.speech_encoder.beats_model.*  (BEATs)         -> model.audio_encoder.beats.*  (same names)
    model.speech_projector.*            (EncoderProjectorConcat) -> model.audio_connector.*  (same names)

As Ola's own loader does (`model.resize_token_embeddings(len(tokenizer))`), the token embeddings and the LM head keep
only the tokenizer's rows (Qwen2.5 pads 151665 tokens to 152064 rows); omniola's `<image>`, `<video>`, `<audio>`
placeholders are added to the tokenizer after them, past the vocabulary.

The speech encoders come from the shards when they hold them (the original saves them there), otherwise from the
Whisper / BEATs files. Their hyper-parameters come from those files when they can be found; without a file they are
inferred from the shard shapes (Whisper: every released model has 64-wide attention heads; BEATs: the settings of
the released `BEATs_iter3+` checkpoints for the few fields shapes cannot tell).

Conversion streams: every tensor is checked against the omniola model built on the `meta` device (names and
shapes) from the shard headers alone, before anything is written; then the shards are read one at a time and
written as omniola shards of at most `max_shard_bytes`, so memory stays near one output shard. The output directory
is built beside the target as `<out>.partial` and renamed at the end; on any error it is removed. An existing
`<out>` (`overwrite`) is replaced by `files.replace_folder`: it is kept until the new one is in place, so a kill at
any point leaves one of them complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    WhisperConfig,
    WhisperFeatureExtractor,
)

from .. import ola_compat
from ..configuration_ola import OlaConfig, OlaVisionConfig
from ..errors import ConversionError
from ..files import new_partial_folder, recover_folder, replace_folder
from ..modeling.beats import BeatsConfig, load_beats_checkpoint
from ..processing_ola import AUDIO_TOKEN, IMAGE_TOKEN, PROCESSOR_CONFIG_NAME, VIDEO_TOKEN, OlaProcessorSettings
from .whisper import (
    _OPENAI_BLOCK_NAME,
    _OPENAI_PER_BLOCK,
    _OPENAI_TOP_LEVEL,
    _openai_source_name,
    load_openai_whisper_encoder,
)

Log = Callable[[str], None]

# OryxViT is always built from SigLIP_MODEL_CONFIG["siglip_so400m_patch16_384"] (oryx_vit.py): 1152 wide, 16 heads.
SO400M_WIDTH, SO400M_HEADS = 1152, 16
# Every released openai-whisper model has 64-wide attention heads: width -> heads of tiny, base, small, medium, large.
WHISPER_HEADS = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
# BEATs settings that shapes cannot tell, as in the released BEATs_iter3(+) checkpoints Ola uses.
BEATS_RELEASED_DEFAULTS = dict(
    activation_fn="gelu", layer_norm_first=False, deep_norm=True, max_distance=800, conv_bias=False,
    layer_wise_gradient_decay_ratio=0.6, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    encoder_layerdrop=0.05, dropout_input=0.0, predictor_dropout=0.0,
)
# Ola's processor defaults (inference/infer.py environment; see omniola.ola_compat).
OLA_MAXRES, OLA_MINRES, OLA_LOWRES = 1536, 0, 384
OLA_VIDEO_MINRES, OLA_VIDEO_MAXRES, OLA_VIDEO_FRAMES = 288, 480, 64
OLA_MAX_AUDIO_SECONDS = 25 * 30.0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")

_VIT = "model.vision_tower.vision_tower."
_WHISPER = "model.speech_encoder.whisper_model."
_BEATS = "model.speech_encoder.beats_model."
_VIT_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_VIT_PER_BLOCK = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


# ------------------------------------------------------------------------------------------------------ the source
@dataclass
class OlaSource:
    """What an original Ola checkpoint directory holds, read from its config and shard headers only."""

    path: Path
    config: dict
    shards: list[Path]
    tensors: dict[str, tuple[Path, tuple[int, ...], torch.dtype]]
    """Every tensor: the shard that holds it, its shape and dtype."""

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key][1]

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]


def read_ola_source(src: str | os.PathLike) -> OlaSource:
    """Reads an original Ola checkpoint's `config.json` and the headers of its safetensors shards.

    Raises:
        ConversionError: not a directory, no Ola `config.json`, no safetensors shards, a shard listed in the index
            is missing or unreadable, or the index and the shards disagree.
    """
    path = Path(src)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory (expected an original Ola checkpoint directory)")
    if not config_file.is_file():
        raise ConversionError(f"{config_file} is missing: {path} is not an Ola checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") != "ola_qwen":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ConversionError(
            f"{config_file} has model_type {found!r}, expected 'ola_qwen': {path} is not an original Ola checkpoint"
        )

    index_file = path / "model.safetensors.index.json"
    expected_keys: dict[str, str] | None = None
    if index_file.is_file():
        try:
            expected_keys = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConversionError(f"{index_file} is not a safetensors index (no weight_map): {err}") from err
        shards = [path / name for name in dict.fromkeys(expected_keys.values())]
    elif (path / "model.safetensors").is_file():
        shards = [path / "model.safetensors"]
    else:
        others = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {others}; only safetensors checkpoints are read)" if others else ""
        raise ConversionError(
            f"{path} has no model.safetensors nor model.safetensors.index.json: no weights to convert{hint}"
        )

    tensors: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
    for shard in shards:
        if not shard.is_file():
            raise ConversionError(f"shard {shard} is missing (listed in {index_file.name})")
        try:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = sl.get_dtype()
                    if dtype not in _SAFETENSORS_DTYPES:
                        raise ConversionError(f"{shard}: tensor {key!r} has dtype {dtype}, expected a float type")
                    tensors[key] = (shard, tuple(sl.get_shape()), _SAFETENSORS_DTYPES[dtype])
        except ConversionError:
            raise
        except Exception as err:  # safetensors raises its own error types for a truncated or invalid file
            raise ConversionError(f"shard {shard} could not be read as safetensors: {err}") from err
    if expected_keys is not None:
        for key, name in expected_keys.items():
            if key not in tensors:
                raise ConversionError(f"{index_file} maps {key!r} to {name}, but that shard has no such tensor")
    return OlaSource(path=path, config=config, shards=shards, tensors=tensors)


# ----------------------------------------------------------------------------------------------- the target config
def _text_config(cfg: dict, vocab_rows: int, vocab_size: int) -> Qwen2Config:
    """The Qwen2 config in Ola's config.json, with `vocab_size` rows kept of the checkpoint's `vocab_rows`."""
    known = set(Qwen2Config().to_dict()) - {"architectures", "model_type", "transformers_version", "dtype"}
    fields = {k: v for k, v in cfg.items() if k in known}
    # OlaQwenForCausalLM.__init__ sets config.rope_scaling = None: plain RoPE whatever config.json says.
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    if fields.get("vocab_size") != vocab_rows:
        raise ConversionError(
            f"config.json vocab_size is {fields.get('vocab_size')} but model.embed_tokens.weight has {vocab_rows} rows"
        )
    fields["vocab_size"] = vocab_size
    return Qwen2Config(**fields)


def _vision_config(source: OlaSource, vision_heads: int | None) -> OlaVisionConfig:
    need = [_VIT + "patch_embed.proj.weight", _VIT + "pos_embed", _VIT + "blocks.0.mlp.fc1.weight"]
    for key in need:
        if key not in source.tensors:
            raise ConversionError(f"{source.path}: missing key {key!r} (the OryxViT vision tower)")
    width, channels, patch, _ = source.shape(need[0])
    rows = source.shape(need[1])[1]
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise ConversionError(f"{source.path}: {need[1]} has {rows} positions, expected a square grid")
    layers = {int(m.group(1)) for k in source.keys(_VIT) if (m := _VIT_BLOCK.fullmatch(k.removeprefix(_VIT)))}
    if layers != set(range(len(layers))):
        raise ConversionError(f"{source.path}: vision tower blocks {sorted(layers)} are not numbered 0..N-1")
    if vision_heads is None:
        if width != SO400M_WIDTH:
            raise ConversionError(
                f"{source.path}: the vision tower is {width} wide, not SigLIP so400m's {SO400M_WIDTH}, so its head "
                "count is unknown (the original code hard-codes so400m's 16); pass --vision-heads"
            )
        vision_heads = SO400M_HEADS
    if width % vision_heads:
        raise ConversionError(f"vision width {width} is not divisible by --vision-heads {vision_heads}")
    mm_hidden = source.config.get("mm_hidden_size", width)
    if mm_hidden != width:
        raise ConversionError(
            f"config.json mm_hidden_size is {mm_hidden} but the vision tower is {width} wide: checkpoints with the "
            "OryxViT 2x2 downsampler (trained without FORCE_NO_DOWNSAMPLE) are not supported"
        )
    return OlaVisionConfig(
        hidden_size=width, intermediate_size=source.shape(need[2])[0], num_hidden_layers=len(layers),
        num_attention_heads=vision_heads, num_channels=channels, patch_size=patch, position_grid=grid,
        position_interpolation="bilinear", hidden_act="gelu", layer_norm_eps=1e-6, post_layernorm=False,
    )


def _encoder_file(source: OlaSource, given: Path | None, config_field: str, what: str) -> Path | None:
    """The Whisper/BEATs file: `given` (must exist), else the config path (absolute or relative to the checkpoint)."""
    if given is not None:
        if not Path(given).is_file():
            raise ConversionError(f"{what} file {given} does not exist")
        return Path(given)
    value = source.config.get(config_field)
    if not value:
        return None
    candidates = [Path(value), source.path / value, source.path / Path(value).name]
    return next((p for p in candidates if p.is_file()), None)


def _torch_load(path: Path, what: str) -> dict:
    """`torch.load(weights_only=True)`, memory-mapped when the file's format allows it."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # files in the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickler errors
        raise ConversionError(f"{path} could not be read as a {what} checkpoint: {err}") from err
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, expected a {what} checkpoint dict")
    return loaded


def _whisper(source: OlaSource, file: Path | None, in_shards: bool, log: Log
             ) -> tuple[WhisperConfig, dict[str, torch.Tensor] | None]:
    """The Whisper encoder's config, and its weights when they must come from `file` (None: from the shards)."""
    # The shards' tensors as shapes only: load_openai_whisper_encoder checks them against the dims.
    in_shard_shapes = {"whisper_model." + k.removeprefix(_WHISPER): torch.empty(v[1], device="meta")
                       for k, v in source.tensors.items() if k.startswith(_WHISPER)}
    if file is not None:
        loaded = _torch_load(file, "openai-whisper")
        if "dims" not in loaded or "model_state_dict" not in loaded:
            raise ConversionError(
                f"{file} is not an openai-whisper checkpoint (expected 'dims' and 'model_state_dict')"
            )
        if in_shards:  # weights come from the shards: the file only tells the dims
            try:
                return load_openai_whisper_encoder(in_shard_shapes, dims=loaded["dims"])[0], None
            except ConversionError as err:
                raise ConversionError(f"{file} does not describe the Whisper encoder in the shards: {err}") from err
        return load_openai_whisper_encoder(loaded)  # float32 encoder weights (the decoder stays on disk)
    width = source.shape(_WHISPER + "conv1.weight")[0]
    if width not in WHISPER_HEADS:
        raise ConversionError(
            f"no Whisper file found (config.json speech_encoder {source.config.get('speech_encoder')!r}) and the "
            f"{width}-wide encoder in the shards is not a released Whisper size, so its head count is unknown: "
            "pass --whisper FILE"
        )
    log(f"note: no Whisper file found; the {width}-wide encoder in the shards gets the released models' "
        f"{WHISPER_HEADS[width]} heads; pass --whisper large-v3.pt to read its dims from the file")
    return load_openai_whisper_encoder(in_shard_shapes, dims={"n_audio_head": WHISPER_HEADS[width]})[0], None


def _beats_config_from_shapes(source: OlaSource) -> BeatsConfig:
    shape = source.shape
    patch = shape(_BEATS + "patch_embedding.weight")
    layer_prefix = _BEATS + "encoder.layers."
    layers = {int(k.removeprefix(layer_prefix).split(".")[0]) for k in source.keys(layer_prefix)}
    width = shape(_BEATS + "encoder.layers.0.self_attn.q_proj.weight")[0]
    rel = _BEATS + "encoder.layers.0.self_attn.relative_attention_bias.weight"
    grep = _BEATS + "encoder.layers.0.self_attn.grep_linear.weight"
    if grep in source.tensors:
        heads = width // shape(grep)[1]
    elif rel in source.tensors:
        heads = shape(rel)[1]
    else:
        heads = width // 64
    weight_v = shape(_BEATS + "encoder.pos_conv.0.weight_v")
    predictor = _BEATS + "predictor.weight"
    return BeatsConfig(
        input_patch_size=patch[-1], embed_dim=patch[0], encoder_layers=len(layers), encoder_embed_dim=width,
        encoder_ffn_embed_dim=shape(_BEATS + "encoder.layers.0.fc1.weight")[0], encoder_attention_heads=heads,
        conv_pos=weight_v[-1], conv_pos_groups=width // weight_v[1],
        relative_position_embedding=rel in source.tensors,
        num_buckets=shape(rel)[0] if rel in source.tensors else 320,
        gru_rel_pos=grep in source.tensors, finetuned_model=predictor in source.tensors,
        predictor_class=shape(predictor)[0] if predictor in source.tensors else 527,
        **BEATS_RELEASED_DEFAULTS,
    )


def _beats(source: OlaSource, file: Path | None, in_shards: bool, log: Log
           ) -> tuple[BeatsConfig, dict[str, torch.Tensor] | None]:
    """The BEATs encoder's config, and its weights when they must come from `file` (None: from the shards)."""
    if file is not None and not in_shards:
        encoder = load_beats_checkpoint(file)
        return encoder.config, encoder.state_dict()
    if file is not None:
        loaded = _torch_load(file, "BEATs")
        if not isinstance(loaded.get("cfg"), dict) or not isinstance(loaded.get("model"), dict):
            raise ConversionError(f"{file} is not a BEATs checkpoint (expected a dict with 'cfg' and 'model')")
        try:
            return BeatsConfig(**loaded["cfg"]), None
        except Exception as err:
            raise ConversionError(f"{file} has an invalid BEATs cfg: {err}") from err
    log("note: no BEATs file found; its config is inferred from the shard shapes plus the settings of the released "
        "BEATs_iter3+ checkpoints (deep_norm, max_distance 800); pass --beats FILE to read it from the file")
    try:
        return _beats_config_from_shapes(source), None
    except KeyError as err:
        raise ConversionError(f"{source.path}: cannot infer the BEATs config, missing tensor {err}") from err


@dataclass
class _Plan:
    """The omniola checkpoint to write: its config, and the encoder weights read from files (omniola key ->
    (where from, tensor)) when the shards do not hold them."""

    config: OlaConfig
    file_tensors: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    skip_prefixes: tuple[str, ...] = ()
    """Shard keys not converted: an encoder taken from its file, or one this configuration does not use."""
    vocab_rows: int | None = None
    """Keep only this many rows of the token embeddings and the LM head (the tokenizer's length), or all."""


def _plan_config(source: OlaSource, *, whisper: Path | None, beats: Path | None, vision_heads: int | None,
                 token_ids: tuple[int, int, int], vocab_size: int | None, log: Log) -> _Plan:
    cfg = source.config
    checks = {
        "mm_projector_type": ("ola_mlp",), "speech_projector_type": ("linear",),
        "mm_use_im_start_end": (False, None), "mm_use_im_patch_token": (False, None),
    }
    for name, allowed in checks.items():
        if cfg.get(name) not in allowed:
            raise ConversionError(f"config.json {name} is {cfg.get(name)!r}; this converter supports {allowed[0]!r}")
    embed = "model.embed_tokens.weight"
    if embed not in source.tensors:
        raise ConversionError(f"{source.path}: missing key {embed!r} (the Qwen2 token embeddings)")
    rows = source.shape(embed)[0]
    text_config = _text_config(cfg, rows, vocab_size or rows)
    vision_config = _vision_config(source, vision_heads)

    encoder_type = str(cfg.get("speech_encoder_type") or "none").lower()
    file_tensors: dict[str, tuple[str, torch.Tensor]] = {}
    skip: list[str] = []
    audio_config = beats_config = None
    if "whisper" in encoder_type or "dual" in encoder_type:
        in_shards = _WHISPER + "conv1.weight" in source.tensors
        file = _encoder_file(source, whisper, "speech_encoder", "Whisper")
        if file is None and not in_shards:
            raise ConversionError(
                f"the Whisper encoder is not in the shards and its file {cfg.get('speech_encoder')!r} (config.json "
                f"speech_encoder) was not found: pass --whisper /path/to/large-v3.pt"
            )
        audio_config, state = _whisper(source, file, in_shards, log)
        if state is not None:
            skip.append(_WHISPER)
            file_tensors.update({f"model.audio_encoder.whisper.{k}": (f"{file} ({k})", v) for k, v in state.items()})
        if "dual" in encoder_type:
            in_shards = _BEATS + "patch_embedding.weight" in source.tensors
            file = _encoder_file(source, beats, "music_encoder", "BEATs")
            if file is None and not in_shards:
                raise ConversionError(
                    f"the BEATs encoder is not in the shards and its file {cfg.get('music_encoder')!r} (config.json "
                    "music_encoder) was not found: pass --beats "
                    "/path/to/BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
                )
            beats_config, state = _beats(source, file, in_shards, log)
            beats_config.reference_attention = True  # the original's attention arithmetic, bit for bit
            if state is not None:
                skip.append(_BEATS)
                file_tensors.update({f"model.audio_encoder.beats.{k}": (f"{file} ({k})", v) for k, v in state.items()})
        else:
            skip.append(_BEATS)
    elif encoder_type == "none":
        skip += ["model.speech_encoder.", "model.speech_projector."]
    else:
        raise ConversionError(f"config.json speech_encoder_type is {encoder_type!r}; expected dual, whisper or none")

    audio_connector = None
    if audio_config is not None:
        width = audio_config.d_model + (beats_config.encoder_embed_dim if beats_config is not None else 0)
        declared = cfg.get("speech_encoder_hidden_size", width)
        if declared != width:
            raise ConversionError(
                f"config.json speech_encoder_hidden_size is {declared} but the encoders give {width} channels"
            )
        linear1 = "model.speech_projector.linear1.weight"
        if linear1 not in source.tensors:
            raise ConversionError(f"{source.path}: missing key {linear1!r} (the speech projector)")
        audio_connector = {"type": "ola_concat", "frames_per_token": int(cfg.get("speech_encoder_ds_rate", 5)),
                           "intermediate_size": source.shape(linear1)[0]}

    config = OlaConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        beats_config=beats_config,
        vision_connector={"type": "ola_pooling"},
        audio_connector=audio_connector,
        image_views="global+native",
        audio_padding="fixed",
        # DualWrappedEncoder.forward returns bfloat16 features: the released weights saw them rounded.
        round_audio_features_to_bf16="dual" in encoder_type,
        image_token_id=token_ids[0],
        video_token_id=token_ids[1],
        audio_token_id=token_ids[2],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    return _Plan(config=config, file_tensors=file_tensors, skip_prefixes=tuple(skip),
                 vocab_rows=vocab_size if vocab_size and vocab_size < rows else None)


# ---------------------------------------------------------------------------------------------------- key mapping
Transform = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _qkv_part(i: int) -> Transform:
    return lambda x: x.chunk(3, dim=0)[i].clone()  # a copy: safetensors refuses tensors sharing memory


def _squeeze0(x: torch.Tensor) -> torch.Tensor:
    return x[0]


def _first_rows(n: int) -> Transform:
    return lambda x: x[:n].clone()


def map_key(key: str) -> list[tuple[str, Transform]] | None:
    """The omniola tensors made from an original Ola tensor, or None for a key this converter does not know."""
    if key == "lm_head.weight":
        return [(key, _identity)]
    for prefix, target in (("model.mm_projector.", "model.vision_connector."),
                           ("model.speech_projector.", "model.audio_connector."),
                           (_BEATS, "model.audio_encoder.beats.")):
        if key.startswith(prefix):
            return [(target + key.removeprefix(prefix), _identity)]
    if key.startswith(_WHISPER):
        rest = key.removeprefix(_WHISPER)
        if rest in _OPENAI_TOP_LEVEL:
            return [("model.audio_encoder.whisper." + _OPENAI_TOP_LEVEL[rest], _identity)]
        if (m := _OPENAI_BLOCK_NAME.fullmatch(rest)) and m.group(2) in _OPENAI_PER_BLOCK:
            return [(f"model.audio_encoder.whisper.layers.{m.group(1)}.{_OPENAI_PER_BLOCK[m.group(2)]}", _identity)]
        return None
    if key.startswith(_VIT):
        rest, out = key.removeprefix(_VIT), "model.vision_tower."
        if rest in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            return [(out + "embeddings.patch_embedding." + rest.rsplit(".", 1)[1], _identity)]
        if rest == "pos_embed":
            return [(out + "embeddings.position_embedding.weight", _squeeze0)]
        if not (m := _VIT_BLOCK.fullmatch(rest)):
            return None
        layer, inner = m.groups()
        module, _, param = inner.rpartition(".")
        base = f"{out}encoder.layers.{layer}."
        if module == "attn.qkv":
            return [(f"{base}self_attn.{name}_proj.{param}", _qkv_part(i)) for i, name in enumerate("qkv")]
        if module in _VIT_PER_BLOCK:
            return [(f"{base}{_VIT_PER_BLOCK[module]}.{param}", _identity)]
        return None
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return [("model.language_model." + key.removeprefix("model."), _identity)]
    return None


def original_name(target: str) -> str:
    """The original Ola tensor an omniola tensor is made from (the inverse of `map_key`, for messages)."""
    renames = (("model.language_model.", "model."), ("model.vision_connector.", "model.mm_projector."),
               ("model.audio_connector.", "model.speech_projector."), ("model.audio_encoder.beats.", _BEATS))
    for prefix, original in renames:
        if target.startswith(prefix):
            return original + target.removeprefix(prefix)
    if target.startswith("model.audio_encoder.whisper."):
        return _openai_source_name(target.removeprefix("model.audio_encoder.whisper."), _WHISPER)
    if target.startswith("model.vision_tower."):
        rest = target.removeprefix("model.vision_tower.")
        if rest == "embeddings.position_embedding.weight":
            return _VIT + "pos_embed"
        if rest.startswith("embeddings.patch_embedding."):
            return _VIT + "patch_embed.proj." + rest.rsplit(".", 1)[1]
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(\w+)", rest):
            layer, module, param = m.groups()
            inverse = {v: k for k, v in _VIT_PER_BLOCK.items()}
            module = "attn.qkv" if module.startswith("self_attn.") and module.endswith(("q_proj", "k_proj", "v_proj")) \
                else inverse.get(module, module)
            return f"{_VIT}blocks.{layer}.{module}.{param}"
    return target


@dataclass(frozen=True)
class _Item:
    target: str
    source: str
    shard: Path | None
    transform: Transform


def _plan_tensors(source: OlaSource, plan: _Plan, log: Log) -> list[_Item]:
    """Maps every source tensor and checks names and shapes against the omniola model, before any data is read."""
    from ..modeling_ola import OlaForConditionalGeneration

    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in OlaForConditionalGeneration(plan.config).state_dict().items()}
    items, unknown, skipped = [], [], []
    for key, (shard, shape, _) in source.tensors.items():
        if plan.skip_prefixes and key.startswith(plan.skip_prefixes):
            skipped.append(key)
            continue
        mapped = map_key(key)
        if mapped is None or any(target not in expected for target, _ in mapped):
            unknown.append(f"{key!r} in {shard.name}")
            continue
        if plan.vocab_rows is not None and key in ("model.embed_tokens.weight", "lm_head.weight"):
            mapped = [(target, _first_rows(plan.vocab_rows)) for target, _ in mapped]
        for target, transform in mapped:
            got = tuple(transform(torch.empty(shape, device="meta")).shape)
            if got != expected[target]:
                raise ConversionError(
                    f"{shard}: {key!r} has shape {list(shape)}, which gives {list(got)} for {target}; "
                    f"omniola expects {list(expected[target])} (from config.json and the other tensors)"
                )
            items.append(_Item(target, key, shard, transform))
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) this converter does not know: {', '.join(unknown[:8])}"
            + (" ..." if len(unknown) > 8 else "")
        )
    if skipped:
        log(f"note: {len(skipped)} shard tensor(s) not converted (under {', '.join(plan.skip_prefixes)})")
    for target, (described, tensor) in plan.file_tensors.items():
        if target not in expected or tuple(tensor.shape) != expected[target]:
            raise ConversionError(f"{described}: shape {list(tensor.shape)} does not fit omniola's {target}")
        items.append(_Item(target, described, None, _identity))

    planned = {item.target for item in items}
    duplicates = len(items) - len(planned)
    if duplicates:
        raise ConversionError(f"{duplicates} omniola tensor(s) would be written twice; is a shard listed twice?")
    tied = {"lm_head.weight"} if plan.config.tie_word_embeddings else set()
    missing = [k for k in expected if k not in planned and k not in tied]
    if missing:
        names = sorted(dict.fromkeys(original_name(k) for k in missing))
        raise ConversionError(
            f"{source.path}: {len(names)} tensor(s) missing from the checkpoint: {', '.join(names[:8])}"
            + (" ..." if len(names) > 8 else "")
        )
    return items


# ------------------------------------------------------------------------------------------------------ the writer
class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most `max_bytes` each (plus an index if several)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / f"part-{len(self.files):05d}.safetensors"
        save_file(self.buffer, path, metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        names = (["model.safetensors"] if len(self.files) == 1 else
                 [f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i in range(len(self.files))])
        weight_map, finals = {}, []
        for (path, keys), name in zip(self.files, names):
            final = self.directory / name
            path.rename(final)
            final.chmod(0o644)  # safetensors writes owner-only files; a model directory is usually shared
            finals.append(final)
            weight_map.update({k: name for k in keys})
        if len(finals) == 1:
            return finals
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return finals


def _stream(source: OlaSource, items: list[_Item], file_tensors: dict[str, tuple[str, torch.Tensor]],
            dtype: torch.dtype | None, file_dtype: torch.dtype, writer: _ShardWriter, log: Log) -> None:
    """Reads the shards one at a time and hands every converted tensor (then the file ones) to `writer`.

    Shard tensors are cast to `dtype` (None: kept); tensors from the Whisper/BEATs files (float32) to `dtype`, or
    else to `file_dtype` (the shards' dominant dtype).
    """
    by_shard: dict[Path, list[_Item]] = {}
    for item in items:
        if item.shard is not None:
            by_shard.setdefault(item.shard, []).append(item)
    for n, shard in enumerate(source.shards, 1):
        log(f"[{n}/{len(source.shards)}] {shard.name}")
        with safe_open(shard, framework="pt") as f:
            for item in by_shard.get(shard, []):
                tensor = item.transform(f.get_tensor(item.source))
                writer.add(item.target, tensor.to(dtype) if dtype is not None else tensor)
    for target, (_, tensor) in file_tensors.items():
        writer.add(target, tensor.to(dtype or file_dtype))


# -------------------------------------------------------------------------------------------------- the processor
def _load_tokenizer(source: OlaSource, tokenizer: Path | None, no_tokenizer: bool
                    ) -> tuple[PreTrainedTokenizerBase | None, int]:
    """The Qwen2 tokenizer with omniola's placeholders added, and its length before them (0 without tokenizer)."""
    if no_tokenizer:
        return None, 0
    where = Path(tokenizer) if tokenizer is not None else source.path
    if not any((where / name).is_file() for name in _TOKENIZER_FILES):
        raise ConversionError(
            f"{where} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): pass --tokenizer DIR (the Qwen2 "
            "tokenizer, e.g. a Qwen/Qwen2.5-7B-Instruct download) or --no-tokenizer to write the model without one"
        )
    try:
        # A Qwen2 config, so the tokenizer class is not looked up from the unknown `ola_qwen` config.json.
        tok = AutoTokenizer.from_pretrained(where, config=Qwen2Config())
    except Exception as err:
        raise ConversionError(f"the tokenizer in {where} could not be loaded: {err}") from err
    length = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN]})
    tok.chat_template = ola_compat.CHAT_TEMPLATE
    return tok, length


def processor_settings(config: OlaConfig) -> OlaProcessorSettings:
    """Processor settings of a converted Ola checkpoint: compatibility mode with infer.py's values."""
    return OlaProcessorSettings(
        patch_size=config.vision_config.patch_size if config.vision_config is not None else 16,
        image_views="global+native",
        global_view_pixels=OLA_LOWRES**2,
        image_min_pixels=OLA_MINRES**2,
        image_max_pixels=OLA_MAXRES**2,
        video_min_pixels=OLA_VIDEO_MINRES**2,
        video_max_pixels=OLA_VIDEO_MAXRES**2,
        video_num_frames=OLA_VIDEO_FRAMES,
        use_audio_in_video=True,
        max_audio_seconds=OLA_MAX_AUDIO_SECONDS,
        audio_padding="fixed",
        vision_connector=config.vision_connector,
        audio_connector=config.audio_connector,
        use_beats=config.beats_config is not None,
        preprocessing="ola",
    )


def _generation_config(source: OlaSource, tokenizer: PreTrainedTokenizerBase | None) -> GenerationConfig:
    file = source.path / "generation_config.json"
    values = json.loads(file.read_text()) if file.is_file() else {}
    values = {k: v for k, v in values.items() if k not in ("transformers_version", "_from_model_config")}
    eos = values.get("eos_token_id", source.config.get("eos_token_id"))
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer is not None:  # Ola stops on the string "<|im_end|>" (conv.sep): make it an end-of-sequence id
        for stop in ola_compat.STOP_STRINGS:
            stop_id = tokenizer.convert_tokens_to_ids(stop)
            if stop_id is not None and stop_id != tokenizer.unk_token_id and stop_id not in eos:
                eos.append(stop_id)
    values["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    return GenerationConfig(**values)


# ------------------------------------------------------------------------------------------------------- entry point
def convert_ola_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    whisper: str | os.PathLike | None = None,
    beats: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    no_tokenizer: bool = False,
    vision_heads: int | None = None,
    dtype: str = "auto",
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    log: Log = print,
) -> Path:
    """Converts an original Ola checkpoint directory into an omniola checkpoint directory.

    Args:
        src: The original checkpoint (config.json with `model_type: ola_qwen`, safetensors shards).
        out: The omniola directory to create (config, safetensors, processor and tokenizer files).
        whisper: openai-whisper checkpoint (`large-v3.pt`); default: config.json `speech_encoder`, resolved as given
            or relative to `src`. Needed when the shards hold no Whisper weights; otherwise read for its dims only.
        beats: BEATs checkpoint; default: config.json `music_encoder`. Same rules.
        tokenizer: Directory with the Qwen2 tokenizer, when `src` has none.
        no_tokenizer: Write the model without tokenizer files (placeholder ids then follow the vocabulary).
        vision_heads: Attention heads of the vision tower; default 16 (SigLIP so400m, hard-coded in the original).
        dtype: `"auto"` keeps each tensor's dtype; `"float32"`, `"bfloat16"` or `"float16"` casts all.
        max_shard_bytes: Largest output shard; also about the peak memory of the conversion.
        overwrite: Replace `out` if it exists. The new output is written beside it (`out.partial`) and swapped in
            by renames; the old one is deleted only after the swap, so a kill at any point leaves the old or the
            new output complete, and the next run restores it (`files.recover_folder`).
        log: Receives progress lines.

    Returns:
        `out`.

    Raises:
        ConversionError: `src` is not an Ola checkpoint, a shard or encoder file is missing, a key is unknown, a
            shape does not fit, or `out` exists (without `overwrite`). `out` is then as it was before.
    """
    out = Path(out)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    recover_folder(out)  # an earlier --overwrite killed during its swap: finished or undone
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; remove it or pass --overwrite")
    source = read_ola_source(src)
    tok, tok_length = _load_tokenizer(source, Path(tokenizer) if tokenizer else None, no_tokenizer)
    rows = source.shape("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in source.tensors else 0
    vocab = rows
    if tok is not None and tok_length != rows:
        if tok_length > rows:
            raise ConversionError(
                f"the tokenizer has {tok_length} tokens but model.embed_tokens.weight only {rows} rows"
            )
        # Ola's loader calls model.resize_token_embeddings(len(tokenizer)): the padding rows past the tokenizer
        # (Qwen2.5: 152064 -> 151665) are dropped, from the embeddings and from the LM head.
        log(f"note: keeping the first {tok_length} of {rows} vocabulary rows (the tokenizer's length), as Ola does")
        vocab = tok_length
    if tok is not None:
        token_ids = tuple(tok.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN]))
    else:  # no tokenizer: the placeholders take the first ids past the vocabulary
        token_ids = (vocab, vocab + 1, vocab + 2)
    plan = _plan_config(source, whisper=Path(whisper) if whisper else None, beats=Path(beats) if beats else None,
                        vision_heads=vision_heads, token_ids=token_ids, vocab_size=vocab, log=log)
    items = _plan_tensors(source, plan, log)

    llm_dtypes = [dt for k, (_, _, dt) in source.tensors.items() if k.startswith("model.layers.")]
    out_dtype = DTYPES.get(dtype)
    main_dtype = out_dtype or (max(set(llm_dtypes), key=llm_dtypes.count) if llm_dtypes else torch.float32)
    plan.config.dtype = str(main_dtype).removeprefix("torch.")

    tmp = new_partial_folder(out)
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        _stream(source, items, plan.file_tensors, out_dtype, main_dtype, writer, log)
        writer.finish()
        plan.config.save_pretrained(tmp)
        _generation_config(source, tok).save_pretrained(tmp)
        settings = processor_settings(plan.config)
        if tok is not None:
            tok.save_pretrained(tmp)
        if plan.config.audio_config is not None:
            WhisperFeatureExtractor(feature_size=plan.config.audio_config.num_mel_bins).save_pretrained(tmp)
        (tmp / PROCESSOR_CONFIG_NAME).write_text(json.dumps(asdict(settings), indent=2) + "\n")
        if tok is None:
            (tmp / "NO_TOKENIZER.txt").write_text(
                "Converted with --no-tokenizer: copy the Qwen2 tokenizer files here and add the special tokens "
                f"{IMAGE_TOKEN} {VIDEO_TOKEN} {AUDIO_TOKEN} (ids {list(token_ids)}), or convert again with "
                "--tokenizer.\n"
            )
        replace_folder(tmp, out)  # the old output is deleted only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"saved {out}")
    return out
