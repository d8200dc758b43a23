"""Experiments as data: named arms (a recipe plus overrides) and what to evaluate and report.

An **arm** is one variant of an experiment: a recipe (a shipped name such as `tiny`, or a YAML path) and overrides
applied to the loaded `Recipe` object, never to a file on disk. A **run** is an arm trained with one seed. The
overrides an arm can make are plain data, so each result file records exactly what was changed:

    vision_connector   {"type": "mlp2x_gelu"} -> recipe.model["build"]["vision_connector"] (needs `model.build`)
    drop_sources       ["video_cross_qa"]     -> that source leaves every stage's data mixture (steps are kept)

Every run also gets `seed` (-> `recipe.seed`: model initialisation and data order) and `stage_steps` (the
experiment's common step budget spread over the recipe's stages, see `omniola.experiments.budget`), and, with
`--data`, `tiny_world` (the root of every tiny-world source).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .budget import distribute_steps

#: Readable names of the tiny world's kinds, for tables and figures.
KIND_LABELS = {
    "image_qa": "image QA",
    "image_speech_qa": "spoken question about an image",
    "asr": "ASR",
    "audio_qa": "sound QA",
    "video_visual_qa": "video QA (visual)",
    "video_audio_qa": "video QA (audio)",
    "video_cross_qa": "video QA (cross-modal)",
    "caption": "caption",
}
ALL_QA_KINDS = ("image_qa", "image_speech_qa", "asr", "audio_qa", "video_visual_qa", "video_audio_qa",
                "video_cross_qa")
OVERRIDE_KEYS = ("vision_connector", "drop_sources")


@dataclass(frozen=True)
class Arm:
    """One variant of an experiment.

    Attributes:
        name: Short name, used in run folders (`<name>-seed<k>`) and `--arms`.
        recipe: A shipped recipe's name (`tiny`) or a recipe YAML path.
        overrides: Changes to the loaded recipe (keys: `vision_connector`, `drop_sources`; see the module docstring).
        label: How tables and figures name it (default: `name`).
    """

    name: str
    recipe: str | Path
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        unknown = set(self.overrides) - set(OVERRIDE_KEYS)
        if unknown:
            raise ConfigError(f"arm {self.name!r}: unknown override(s) {sorted(unknown)}; known: {list(OVERRIDE_KEYS)}")

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Experiment:
    """An experiment: its arms, what each run is evaluated on, and how the report compares them.

    Attributes:
        name: The name `omniola experiment NAME` takes.
        title: The report's heading.
        description: What is compared and why (the report's first paragraph).
        arms: The variants, in report order.
        kinds: Tiny-world kinds each run is evaluated on (test split).
        figure_kinds: The kinds the figures and the Findings paragraph compare (default: `kinds`).
        default_seeds: Seeds per arm when `--seeds` is not given (seeds 0 .. N-1).
        reference: An arm every score is normalised to, as in Ola's Figure 3 (accuracy: arm / reference; WER:
            reference / arm, so above 1 is better either way); `None`: raw scores only.
        measure_connector: Also record the vision connector's parameters and the LLM tokens of one test image.
        modality_removal: Also ask every video + audio question without its audio and without its frames (the
            evaluation's modality-removal control): how much each arm's answers depend on each modality.
    """

    name: str
    title: str
    description: str
    arms: tuple[Arm, ...]
    kinds: tuple[str, ...]
    figure_kinds: tuple[str, ...] = ()
    default_seeds: int = 1
    reference: str | None = None
    measure_connector: bool = False
    modality_removal: bool = False

    def __post_init__(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"experiment {self.name!r}: duplicate arm names {names}")
        if self.reference is not None and self.reference not in names:
            raise ConfigError(f"experiment {self.name!r}: reference arm {self.reference!r} is not one of {names}")
        if not set(self.figure_kinds) <= set(self.kinds):
            raise ConfigError(f"experiment {self.name!r}: figure_kinds {self.figure_kinds} are not all evaluated")

    @property
    def compared_kinds(self) -> tuple[str, ...]:
        return self.figure_kinds or self.kinds

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"experiment {self.name!r} has no arm {name!r}; arms: {[a.name for a in self.arms]}")


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; experiments: {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]


register(Experiment(
    name="progressive-vs-mixing",
    title="Progressive modality alignment vs direct mixing vs balanced sampling (Ola Figure 3)",
    description=(
        "Ola's Figure 3 on the tiny omni world: the progressive recipe `tiny` (image, then video, then audio with "
        "the video-audio bridge data) against one stage that mixes all data as it comes (`tiny-direct-mix`) and one "
        "stage that resamples the sources so image, video and audio get equal shares (`tiny-balanced`). Same model, "
        "data and number of optimizer steps; scores normalised to the progressive recipe's mean."
    ),
    arms=(
        Arm("progressive", "tiny", label="progressive (tiny)"),
        Arm("direct-mix", "tiny-direct-mix", label="direct mixing"),
        Arm("balanced", "tiny-balanced", label="balanced sampling"),
    ),
    kinds=("image_qa", "video_visual_qa", "asr"),
    default_seeds=3,
    reference="progressive",
))

register(Experiment(
    name="connectors",
    title="Vision connectors under the same recipe and budget",
    description=(
        "The `tiny` recipe with each vision connector: Ola's local-global attention pooling (`ola_pooling`, the "
        "default), LLaVA-1.5's two-layer MLP (`mlp2x_gelu`), a BLIP-2-style Q-Former (`qformer`) and OneLLM-style "
        "soft-routed projection experts (`upm`). Everything else (audio connector, data, steps, seed) is the same. "
        "Besides the scores: the connector's parameters, the LLM tokens one test image costs, and training time."
    ),
    # Ola pooling is the recipe's own connector: no override, so this arm is the same run as `progressive`
    arms=(Arm("ola_pooling", "tiny", label="Ola pooling"),) + tuple(
        Arm(name, "tiny", {"vision_connector": {"type": name}}, label=label) for name, label in (
            ("mlp2x_gelu", "MLP 2x GELU (LLaVA-1.5)"), ("qformer", "Q-Former (BLIP-2)"), ("upm", "UPM (OneLLM)"),
        )),
    kinds=ALL_QA_KINDS,
    figure_kinds=("image_qa", "image_speech_qa", "video_visual_qa", "video_cross_qa"),
    default_seeds=2,
    measure_connector=True,
))

register(Experiment(
    name="cross-modal-data",
    title="With vs without the cross-modal video-audio data",
    description=(
        "The `tiny` recipe with and without its cross-modal video-audio records (`video_cross_qa`: questions whose "
        "answer needs both the frames and the narration). Without them the source leaves every stage's mixture and "
        "the stages keep their steps, so the other sources fill the budget. Ola uses such data as the bridge "
        "between video and audio; the question is whether it helps on the tiny world's cross-modal questions and "
        "what it costs elsewhere, and, with the modality-removal control, how much each arm's answers to video + "
        "audio questions depend on the audio and on the frames."
    ),
    arms=(
        Arm("with-cross", "tiny", label="with video-audio data"),
        Arm("without-cross", "tiny", {"drop_sources": ["video_cross_qa"]}, label="without"),
    ),
    kinds=("video_cross_qa", "video_audio_qa", "video_visual_qa", "image_qa", "asr"),
    figure_kinds=("video_cross_qa", "video_audio_qa", "video_visual_qa"),
    default_seeds=3,
    modality_removal=True,
))


# ---------------------------------------------------------------------------------------------- recipes of arms
def load_arm_recipe(arm: Arm):
    """The arm's recipe as loaded from disk (before overrides)."""
    from ..training import load_recipe
    from ..training.recipe import packaged_recipe

    source = Path(arm.recipe)
    is_file = isinstance(arm.recipe, Path) or source.suffix in (".yaml", ".yml")
    return load_recipe(source if is_file else packaged_recipe(str(arm.recipe)))


def budget_stages(recipe) -> list:
    """The stages a step budget counts and scales: the LLM stages. A vision tower pretraining stage
    (`objective: siglip`) is the arms' common starting point, as a pretrained SigLIP tower is Ola's: it runs as
    written in every arm and scale. A CTC pre-alignment of the speech connector (`objective: ctc`) has no LLM
    forward pass and is not counted either: it is one of the steps of the progressive order, run as written."""
    return [stage for stage in recipe.stages if stage.objective == "lm"]


def recipe_steps(recipe, arm_name: str) -> list[int]:
    """The budget stages' optimizer steps (what a step budget counts)."""
    steps = []
    for stage in budget_stages(recipe):
        if stage.steps is None:
            raise ConfigError(f"{recipe.path}: stage {stage.name!r} (arm {arm_name!r}) is given in epochs; "
                              "experiments compare equal step budgets, so its stages need `steps`")
        steps.append(stage.steps)
    return steps


def apply_overrides(recipe, arm: Arm, *, seed: int, total_steps: int, tiny_world: Path | None = None):
    """A copy of `recipe` with the arm's overrides, the seed and `total_steps` spread over its stages.

    Returns:
        `(recipe, effective)`: the changed copy and the overrides as applied (recorded in every result file).

    Raises:
        ConfigError: an override that does not fit the recipe (a connector for a `model.from` recipe, a source no
            stage uses, a stage left with no data), or too few steps for the stages.
    """
    from ..modeling.connectors import vision_connector_class

    recipe = copy.deepcopy(recipe)
    effective: dict[str, Any] = {"seed": seed}
    recipe.seed = seed
    if tiny_world is not None:
        for source in recipe.sources.values():
            if source.tiny_world is not None:
                source.data_root = Path(tiny_world)
        effective["tiny_world"] = str(tiny_world)
    for name in arm.overrides.get("drop_sources", ()):
        if not any(name in stage.data for stage in recipe.stages):
            raise ConfigError(f"{recipe.path}: arm {arm.name!r} drops source {name!r}, which no stage uses")
        for stage in recipe.stages:
            stage.data.pop(name, None)
            if not stage.data:
                raise ConfigError(f"{recipe.path}: arm {arm.name!r}: without {name!r} stage {stage.name!r} has no data")
        effective["drop_sources"] = list(arm.overrides["drop_sources"])
    if "vision_connector" in arm.overrides:
        spec = dict(arm.overrides["vision_connector"])
        vision_connector_class(spec)  # an unknown type or option fails here, naming the registered ones
        if "build" not in recipe.model:
            raise ConfigError(f"{recipe.path}: model: arm {arm.name!r} sets the vision connector, which needs a "
                              "recipe that builds its model (`model.build`), not one that starts `from` a checkpoint")
        recipe.model["build"]["vision_connector"] = spec
        effective["vision_connector"] = spec
    try:
        steps = distribute_steps(recipe_steps(recipe, arm.name), total_steps)
    except ConfigError as err:
        raise ConfigError(f"{recipe.path}: arm {arm.name!r}: {err}") from err
    stages = budget_stages(recipe)
    for stage, n in zip(stages, steps):
        stage.steps = n
    effective["stage_steps"] = {stage.name: n for stage, n in zip(stages, steps)}
    return recipe, effective


def tiny_world_root(recipe) -> Path | None:
    """The tiny world a recipe's tiny-world sources read (the first such source's root)."""
    for source in recipe.sources.values():
        if source.tiny_world is not None:
            return Path(source.data_root)
    return None
