"""Training recipes: YAML files describing Ola's progressive modality alignment as a list of stages.

A recipe names the model to start from, the data sources, and the stages in order. Each stage names its data
mixture, which modules train (and LoRA on the LLM), learning rates per module group, schedule, length, batch
size and precision. Everything is validated before any training starts: an unknown key, a missing data source,
a module the model does not have, or stages that cannot chain fail with the recipe path and the offending field.

    name: tiny
    model: {build: {llm: smollm2, audio: whisper-tiny.en, vision: "scratch:tiny"}}   # or {from: DIR}
    data: {tiny_world: ${OMNIOLA_HOME}/data/tiny}
    sources:
      caption: {tiny_world: caption}
      my_audio: {files: [audio.jsonl], data_root: /data/audio, modality: audio}
    defaults: {batch_size: 16, precision: bf16}
    stages:
      - name: image
        data: {caption: 1.0}
        train: [vision_tower, vision_connector]
        lr: {default: 1.0e-3, vision_tower: 5.0e-4}
        steps: 200

See docs/training.md for every field.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: Short names of the model's trainable parts (attributes of `OlaForConditionalGeneration.model`, and `lm_head`).
MODULE_ALIASES = {
    "llm": "model.language_model",
    "language_model": "model.language_model",
    "vision_tower": "model.vision_tower",
    "vision_connector": "model.vision_connector",
    "audio_encoder": "model.audio_encoder",
    "whisper": "model.audio_encoder.whisper",
    "beats": "model.audio_encoder.beats",
    "audio_connector": "model.audio_connector",
    "lm_head": "lm_head",
}
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant")
SAMPLINGS = ("proportional", "balanced")
OBJECTIVES = ("lm", "siglip", "ctc", "ground")
#: The LLM's attention kernel while training (transformers' `attn_implementation`); `auto`: see `attention_kernel`.
ATTENTIONS = ("auto", "eager", "sdpa")
HOME_VAR = re.compile(r"\$\{OMNIOLA_HOME\}|\$OMNIOLA_HOME\b")


def expand_path(value: str, base: Path | None = None) -> Path:
    """`${OMNIOLA_HOME}`, other environment variables and `~` expanded; relative paths resolve against `base`."""
    from ..inference import omniola_home

    value = HOME_VAR.sub(str(omniola_home()).replace("\\", "/"), value)
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return path if path.is_absolute() or base is None else base / path


@dataclass
class LoraSpec:
    """LoRA on the LLM (PEFT). Merged into the stage checkpoint; the adapter is also saved beside it."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class Source:
    """A data source: record files (Ola's JSON/JSONL) or a kind of the tiny omni world."""

    name: str
    files: list[Path]
    data_root: Path | None = None
    modality: str = "mixed"
    path_map: dict[str, str] = field(default_factory=dict)
    tiny_world: tuple[str, str] | None = None  # (kind, split), resolved against the world's manifest when loading
    templates: list[str] | None = None  # only the records whose `meta.template` is one of these


@dataclass
class Stage:
    """One training stage. Fields left out come from the recipe's `defaults`, then from these defaults."""

    name: str
    data: dict[str, float]
    train: list[str]
    steps: int | None = None
    epochs: float | None = None
    start_from: str = "previous"  # YAML key `from`: previous | base | <earlier stage name> | <checkpoint dir>
    sampling: str = "proportional"
    lora: LoraSpec | None = None
    objective: str = "lm"  # lm (next-token loss) | siglip (vision tower, siglip.py) | ctc (audio connector, ctc.py)
    #                        | ground (vision tower and connector, grounding.py)
    lr: dict[str, float] = field(default_factory=lambda: {"default": 1e-4})
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    attention: str = "auto"
    feature_cache: bool = True
    save_every: int = 100
    log_every: int = 1


@dataclass
class Recipe:
    name: str
    path: Path
    model: dict[str, Any]
    sources: dict[str, Source]
    stages: list[Stage]
    description: str = ""
    seed: int = 0
    video_audio: str = "markers"
    num_workers: int = 0
    group_by_modality: bool = True
    accelerate: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- parsing
def _fail(path: Path, where: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {problem}")


def _check_keys(path: Path, where: str, value: Any, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, where, f"expected a mapping, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise _fail(path, where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - set(value)
    if missing:
        raise _fail(path, where, f"missing required key(s) {sorted(missing)}")
    return value


def _typed(path: Path, where: str, value: Any, kind: type | tuple[type, ...], positive: bool = False) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise _fail(path, where, f"expected {getattr(kind, '__name__', kind)}, got a boolean")
    if not isinstance(value, kind):
        raise _fail(path, where, f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
    if positive and value <= 0:
        raise _fail(path, where, f"must be positive, got {value!r}")
    return value


_STAGE_FIELDS = {f.name: f for f in dataclasses.fields(Stage)}
_STAGE_KEYS = (set(_STAGE_FIELDS) - {"start_from"}) | {"from"}
_DEFAULTABLE = _STAGE_KEYS - {"name", "data", "train", "from", "steps", "epochs"}


def _parse_lora(path: Path, where: str, value: Any) -> LoraSpec | None:
    if value in (None, False):
        return None
    if value is True:
        return LoraSpec()
    value = _check_keys(path, where, value, {f.name for f in dataclasses.fields(LoraSpec)})
    spec = LoraSpec(**value)
    _typed(path, f"{where}.r", spec.r, int, positive=True)
    _typed(path, f"{where}.alpha", spec.alpha, (int, float), positive=True)
    spec.dropout = _typed(path, f"{where}.dropout", spec.dropout, float)
    if not (isinstance(spec.targets, list) and spec.targets and all(isinstance(t, str) for t in spec.targets)):
        raise _fail(path, f"{where}.targets", "expected a non-empty list of module names (e.g. q_proj)")
    return spec


def _parse_stage(path: Path, index: int, raw: Any, defaults: dict) -> Stage:
    where = f"stages[{index}]"
    raw = _check_keys(path, where, raw, _STAGE_KEYS, {"name", "data", "train"})
    merged = {**defaults, **raw}
    name = _typed(path, f"{where}.name", merged.pop("name"), str)
    where = f"stages[{index}] ({name})"
    data = merged.pop("data")
    if not isinstance(data, dict):
        raise _fail(path, f"{where}.data", "expected a mapping of source name -> weight")
    kwargs: dict[str, Any] = {"name": name}
    kwargs["data"] = {k: _typed(path, f"{where}.data.{k}", v, float, positive=True) for k, v in data.items()}
    if not kwargs["data"]:
        raise _fail(path, f"{where}.data", "names no data source")
    train = merged.pop("train")
    if not (isinstance(train, list) and all(isinstance(t, str) for t in train)):
        raise _fail(path, f"{where}.train", "expected a list of module names, e.g. [vision_connector, llm]")
    kwargs["train"] = train
    if "from" in merged:
        kwargs["start_from"] = _typed(path, f"{where}.from", merged.pop("from"), str)
    if "lora" in merged:
        kwargs["lora"] = _parse_lora(path, f"{where}.lora", merged.pop("lora"))
    if "lr" in merged:
        lr = merged.pop("lr")
        lr = {"default": lr} if isinstance(lr, (int, float)) and not isinstance(lr, bool) else lr
        lr = _check_keys(path, f"{where}.lr", lr, {"default", *train, "lora"})
        kwargs["lr"] = {k: _typed(path, f"{where}.lr.{k}", v, float, positive=True) for k, v in lr.items()}
        kwargs["lr"].setdefault("default", 1e-4)
    for key, value in merged.items():
        f = _STAGE_FIELDS[key]
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type).replace(" | None", ""))
        if kind is not None and value is not None:
            value = _typed(path, f"{where}.{key}", value, kind)
        kwargs[key] = value
    stage = Stage(**kwargs)
    choices = {"precision": PRECISIONS, "scheduler": SCHEDULERS, "sampling": SAMPLINGS, "objective": OBJECTIVES,
               "attention": ATTENTIONS}
    for key, allowed in choices.items():
        if getattr(stage, key) not in allowed:
            raise _fail(path, f"{where}.{key}", f"{getattr(stage, key)!r} is not one of {list(allowed)}")
    if (stage.steps is None) == (stage.epochs is None):
        raise _fail(path, where, "give exactly one of `steps` or `epochs`")
    if stage.steps is not None:
        _typed(path, f"{where}.steps", stage.steps, int, positive=True)
    if stage.epochs is not None:
        _typed(path, f"{where}.epochs", stage.epochs, float, positive=True)
    for key in ("batch_size", "grad_accum", "max_length", "save_every", "log_every"):
        _typed(path, f"{where}.{key}", getattr(stage, key), int, positive=True)
    if not 0 <= stage.warmup_ratio < 1:
        raise _fail(path, f"{where}.warmup_ratio", f"must be in [0, 1), got {stage.warmup_ratio}")
    if not stage.train and stage.lora is None:
        raise _fail(path, f"{where}.train", "nothing to train: name modules or give `lora`")
    if stage.lora is not None and any(MODULE_ALIASES.get(t) == "model.language_model" for t in stage.train):
        raise _fail(path, f"{where}.lora", "LoRA and full training of the LLM in one stage: choose one")
    if stage.objective == "siglip" and (stage.lora is not None or
                                        {MODULE_ALIASES.get(t, t) for t in stage.train} != {"model.vision_tower"}):
        raise _fail(path, f"{where}.train", "a siglip stage trains the vision tower alone: train: [vision_tower], "
                                            "no lora")
    if stage.objective == "ctc" and (stage.lora is not None or
                                     {MODULE_ALIASES.get(t, t) for t in stage.train} != {"model.audio_connector"}):
        raise _fail(path, f"{where}.train", "a ctc stage trains the audio connector alone: train: [audio_connector], "
                                            "no lora")
    if stage.objective == "ground" and (stage.lora is not None or not stage.train or not
                                        {MODULE_ALIASES.get(t, t) for t in stage.train} <= {"model.vision_tower",
                                                                                             "model.vision_connector"}):
        raise _fail(path, f"{where}.train", "a ground stage trains the vision side alone: train: [vision_tower, "
                                            "vision_connector] or one of them, no lora")
    return stage


def _parse_sources(path: Path, raw: Any, tiny_root: Path | None) -> dict[str, Source]:
    raw = _check_keys(path, "sources", raw or {}, set(raw or {}))
    sources = {}
    for name, spec in raw.items():
        where = f"sources.{name}"
        spec = _check_keys(path, where, spec, {"files", "data_root", "tiny_world", "split", "modality", "path_map",
                                               "templates"})
        if ("files" in spec) == ("tiny_world" in spec):
            raise _fail(path, where, "give exactly one of `files` (record files) or `tiny_world` (a kind)")
        if "tiny_world" in spec:
            if tiny_root is None:
                raise _fail(path, where, "a tiny_world source needs `data.tiny_world` (the built world's folder)")
            kind = spec["tiny_world"]
            from ..data.tiny_world import KIND_MODALITY
            if kind not in KIND_MODALITY:
                raise _fail(path, f"{where}.tiny_world", f"unknown kind {kind!r}; kinds: {sorted(KIND_MODALITY)}")
            source = Source(name, [], tiny_root, spec.get("modality", KIND_MODALITY[kind]),
                            tiny_world=(kind, spec.get("split", "train")))
        else:
            files = spec["files"]
            files = [files] if isinstance(files, str) else files
            if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
                raise _fail(path, f"{where}.files", "expected a record file or a list of them")
            root = expand_path(spec["data_root"], path.parent) if spec.get("data_root") else None
            source = Source(name, [expand_path(f, path.parent) for f in files], root, spec.get("modality", "mixed"))
        source.path_map = dict(spec.get("path_map") or {})
        if "templates" in spec:
            templates = spec["templates"]
            if not (isinstance(templates, list) and templates and all(isinstance(t, str) for t in templates)):
                raise _fail(path, f"{where}.templates", "expected a list of template names, e.g. [name]")
            source.templates = templates
        sources[name] = source
    return sources


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Reads and validates a recipe file (everything that can be checked without the model and the data)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    top = {"name", "description", "model", "data", "sources", "defaults", "stages", "seed", "num_workers",
           "group_by_modality", "accelerate"}
    raw = _check_keys(path, "recipe", raw, top, {"name", "model", "sources", "stages"})
    model = _check_keys(path, "model", raw["model"], {"build", "from"})
    if len(model) != 1:
        raise _fail(path, "model", "give exactly one of `build` (a BuildSpec) or `from` (a model directory)")
    if "build" in model:
        from ..components import BuildSpec

        fields = {f.name for f in dataclasses.fields(BuildSpec)}
        _check_keys(path, "model.build", model["build"] or {}, fields)
        model = {"build": dict(model["build"] or {})}
    else:
        model = {"from": expand_path(_typed(path, "model.from", model["from"], str), path.parent)}
    data = _check_keys(path, "data", raw.get("data") or {}, {"tiny_world", "video_audio"})
    tiny_root = expand_path(data["tiny_world"], path.parent) if data.get("tiny_world") else None
    video_audio = data.get("video_audio", "markers")
    if video_audio not in ("markers", "sound_track"):
        raise _fail(path, "data.video_audio", f"{video_audio!r} is not one of ['markers', 'sound_track']")
    sources = _parse_sources(path, raw["sources"], tiny_root)

    defaults = _check_keys(path, "defaults", raw.get("defaults") or {}, _DEFAULTABLE)
    stages_raw = raw["stages"]
    if not (isinstance(stages_raw, list) and stages_raw):
        raise _fail(path, "stages", "expected a non-empty list of stages")
    stages = []
    for i, s in enumerate(stages_raw):
        if isinstance(s, dict) and isinstance(s.get("data"), dict):
            unknown = set(s["data"]) - set(sources)
            if unknown:
                raise _fail(path, f"stages[{i}].data", f"unknown source(s) {sorted(unknown)}; sources: {sorted(sources)}")
        stages.append(_parse_stage(path, i, s, defaults))

    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        if names.count(stage.name) > 1:
            raise _fail(path, f"stages[{i}].name", f"duplicate stage name {stage.name!r}")
        start = stage.start_from
        if start in ("previous", "base") or start in names[:i]:
            continue
        if start in names[i:]:
            raise _fail(path, f"stages[{i}].from", f"stage {start!r} comes later; stages chain forwards only")
        if not expand_path(start, path.parent).is_dir():
            raise _fail(path, f"stages[{i}].from", f"{start!r} is neither an earlier stage nor a model directory")
    for key, kind in (("seed", int), ("num_workers", int)):
        if key in raw:
            _typed(path, key, raw[key], int)
    accelerate = _check_keys(path, "accelerate", raw.get("accelerate") or {}, {"config", "notes"})
    return Recipe(
        name=_typed(path, "name", raw["name"], str),
        path=path,
        model=model,
        sources=sources,
        stages=stages,
        description=raw.get("description", ""),
        seed=raw.get("seed", 0),
        video_audio=video_audio,
        num_workers=raw.get("num_workers", 0),
        group_by_modality=bool(raw.get("group_by_modality", True)),
        accelerate=accelerate,
    )


def resolve_module_names(recipe: Recipe, model) -> None:
    """Checks every stage's `train` names against the model; raises ConfigError naming the stage and field."""
    for i, stage in enumerate(recipe.stages):
        for name in stage.train:
            target = MODULE_ALIASES.get(name, name)
            try:
                module = model.get_submodule(target)
            except AttributeError:
                module = None
            if module is None:
                raise _fail(
                    recipe.path, f"stages[{i}] ({stage.name}).train",
                    f"the model has no module {name!r}; names: {sorted(MODULE_ALIASES)} or a dotted path such as "
                    "model.language_model.layers.0",
                )


def module_path(name: str) -> str:
    return MODULE_ALIASES.get(name, name)


def packaged_recipe(name: str) -> Path:
    """The path of a recipe shipped with omniola (`recipes/<name>.yaml`)."""
    folder = Path(__file__).resolve().parent.parent / "recipes"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"no recipe file {name!r} and no shipped recipe of that name; shipped: {shipped}")
    return path
