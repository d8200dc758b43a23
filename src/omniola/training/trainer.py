"""The trainer: runs a recipe's stages in order with HF Accelerate.

One process on CPU, one GPU, or many through `accelerate launch` (DDP, FSDP, DeepSpeed: configs in
`recipes/accelerate/`). Per stage: load the start checkpoint, freeze everything but the named modules (LoRA on
the LLM through PEFT), draw the stage's data order from its mixture, train with bf16 autocast, gradient
accumulation and clipping, write periodic resume checkpoints atomically, and end with a `save_pretrained`
checkpoint that `omniola chat` loads directly.

Output layout (`OUT`):

    recipe.yaml                 the recipe as run
    metrics.jsonl               one line per logged step: stage, step, loss, lr, samples/s, elapsed
    loss.png                    loss curves of all stages
    summary.json                per stage: steps, wall time, samples/s, final loss, peak RSS
    train.lock                  held by the trainer writing OUT (a second one is refused)
    01-<stage>/model/           the stage's checkpoint (LoRA merged), loadable by `omniola chat --model`; its
                                training_stage.json is the stage's summary entry, saved with it
    01-<stage>/lora_adapter/    the stage's LoRA adapter alone (PEFT format), when the stage uses LoRA
    01-<stage>/checkpoints/     resume state while the stage runs (removed when it ends)
    final -> NN-<last stage>/model

Nothing is lost to a kill at any instant: every file and folder above is replaced atomically (`..files`), and
`--resume` drops a torn last line of metrics.jsonl and rebuilds a stage's missing summary entry from its model
folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..files import FolderLock, new_partial_folder, recover_folder, replace_folder, write_text_atomic
from .recipe import Recipe, Stage, module_path, resolve_module_names
from .sampler import MixtureBatchSampler, mixture_probabilities

logger = logging.getLogger(__name__)

CHECKPOINT_POINTER = "latest"
LOCK_FILE = "train.lock"
STAGE_RECORD = "training_stage.json"  # in a stage's model folder: the stage's summary entry


# ------------------------------------------------------------------------------------------------ model setup
def load_start_model(recipe: Recipe, stage_index: int, out: Path):
    """The model and processor a stage starts from (float32 on CPU; the accelerator moves it)."""
    from ..components import BuildSpec, build_model
    from ..modeling_ola import OlaForConditionalGeneration
    from ..processing_ola import OlaProcessor

    stage = recipe.stages[stage_index]
    start = stage.start_from
    if start == "previous" and stage_index > 0:
        path = stage_dir(out, stage_index - 1, recipe.stages[stage_index - 1]) / "model"
    elif start in ("previous", "base"):
        if "from" in recipe.model:
            path = recipe.model["from"]
        else:
            model, processor = build_model(BuildSpec(**recipe.model["build"]))
            return model.float(), processor
    elif start in [s.name for s in recipe.stages]:
        i = [s.name for s in recipe.stages].index(start)
        path = stage_dir(out, i, recipe.stages[i]) / "model"
    else:
        from .recipe import expand_path

        path = expand_path(start, recipe.path.parent)
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{recipe.path}: stages[{stage_index}] ({stage.name}) starts from {path}, which is not a "
                          "model directory")
    model = OlaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model, OlaProcessor.from_pretrained(path)


def configure_trainable(model, stage: Stage) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Freezes all but the stage's modules; applies LoRA to the LLM. Returns named parameter groups."""
    model.requires_grad_(False)
    groups = []
    for name in stage.train:
        module = model.get_submodule(module_path(name))
        module.requires_grad_(True)
        groups.append((name, list(module.parameters())))
    if stage.lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                            target_modules=list(stage.lora.targets))
        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model.model.language_model = get_peft_model(model.model.language_model, config)
        lora = [p for n, p in model.model.language_model.named_parameters() if "lora_" in n]
        groups.append(("lora", lora))
    # Frozen parts run in eval mode (no dropout); trained parts in train mode.
    model.eval()
    for name in stage.train:
        model.get_submodule(module_path(name)).train()
    if stage.lora is not None:
        model.model.language_model.train()
    return groups


def attention_kernel(stage: Stage, device: torch.device) -> str:
    """The LLM's attention implementation in a stage. `auto`: `eager` on CPU, where torch's fused `sdpa` kernel is
    2.5x slower under bf16 autocast for a batch of 8 x 121 tokens, forward and backward (31 vs 12 ms a layer,
    2026-12-07); `sdpa` on accelerators (docs/training.md, "Training speed on CPU")."""
    if stage.attention != "auto":
        return stage.attention
    return "eager" if device.type == "cpu" else "sdpa"


def merge_lora(model, stage_path: Path | None = None) -> None:
    """Folds the stage's LoRA weights into the LLM (saving the adapter alone first, when `stage_path` is given)."""
    from peft import PeftModel

    lm = model.model.language_model
    if isinstance(lm, PeftModel):
        if stage_path is not None:
            lm.save_pretrained(stage_path / "lora_adapter")
        model.model.language_model = lm.merge_and_unload()


def frozen_encoders(model, stage: Stage) -> tuple[str, ...]:
    """The encoders whose outputs a feature cache may serve in this stage (frozen and present)."""
    trained = {module_path(t) for t in stage.train}

    def is_frozen(path: str) -> bool:
        return not any(t == path or path.startswith(t + ".") or t.startswith(path + ".") for t in trained)

    out = []
    if model.model.audio_encoder is not None and is_frozen("model.audio_encoder"):
        out.append("audio")
    if model.model.vision_tower is not None and is_frozen("model.vision_tower"):
        out.append("vision")
    return tuple(out)


# ------------------------------------------------------------------------------------------------------- data
def source_files(source) -> list[Path]:
    if source.tiny_world is None:
        return source.files
    from ..data.tiny_world import tiny_world_files

    kind, split = source.tiny_world
    return tiny_world_files(source.data_root, split, [kind])


def stage_data(recipe: Recipe, stage: Stage, processor, transform=None):
    """The stage's datasets (one per source) and what the sampler needs about them."""
    from ..data import OlaDataset

    datasets, modalities, weights = [], [], []
    for name, weight in stage.data.items():
        source = recipe.sources[name]
        root = source.data_root if source.tiny_world is None else None
        dataset = OlaDataset(source_files(source), root, processor, video_audio=recipe.video_audio,
                             path_map=source.path_map, max_length=stage.max_length, transform=transform)
        if source.templates is not None:
            dataset = dataset.select(lambda record: record_template(record) in source.templates)
        datasets.append(dataset)
        modalities.append(source.modality)
        weights.append(weight)
    return datasets, modalities, weights


def _group_key(datasets, offsets):
    """Sort key: (source, record's media kinds); within the tiny world a source is one kind already."""
    import bisect

    def key(index: int):
        s = bisect.bisect_right(offsets, index) - 1
        try:
            record = datasets[s].record(index - offsets[s])
            media = tuple(k for k in ("image", "video", "audio", "audio_q") if k in record)
        except Exception:  # the dataset reports bad records itself when it loads them
            media = ()
        return (media, s)

    return key


# -------------------------------------------------------------------------------------------------- checkpoints
def stage_dir(out: Path, index: int, stage: Stage) -> Path:
    return out / f"{index + 1:02d}-{stage.name}"


def _rng_state() -> dict:
    py, n = random.getstate(), np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [n[0], n[1].tolist(), int(n[2]), int(n[3]), float(n[4])]}


def _set_rng_state(state: dict, torch_states: dict[str, torch.Tensor]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch_states["torch"])
    if torch.cuda.is_available() and "cuda" in torch_states:
        torch.cuda.set_rng_state(torch_states["cuda"])


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_resume_checkpoint(path: Path, accelerator, model, optimizer, scheduler, step: int, extra: dict) -> Path:
    """Writes `checkpoints/step-N` atomically (temporary folder, fsync, rename), then points `latest` at it."""
    from safetensors.torch import save_file

    ckpts = path / "checkpoints"
    final = ckpts / f"step-{step:07d}"
    if accelerator.is_main_process:
        tmp = new_partial_folder(final)
        unwrapped = accelerator.unwrap_model(model)
        save_file(_trainable_state(unwrapped), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "rng": _rng_state(), **extra}))
        replace_folder(tmp, final)
        write_text_atomic(ckpts / CHECKPOINT_POINTER, final.name)
        for old in ckpts.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(path: Path) -> Path | None:
    pointer = path / "checkpoints" / CHECKPOINT_POINTER
    if not pointer.is_file():
        return None
    ckpt = recover_folder(path / "checkpoints" / pointer.read_text().strip())
    if not (ckpt / "state.json").is_file():
        logger.warning("resume pointer %s names %s, which is incomplete; starting the stage over", pointer, ckpt)
        return None
    return ckpt


def load_resume_checkpoint(ckpt: Path, accelerator, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    state = load_file(ckpt / "trainable.safetensors")
    names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if set(state) != names:
        raise ConfigError(f"{ckpt}: its trainable parameters do not match this stage's; was the recipe changed? "
                          f"(differing: {sorted(set(state) ^ names)[:5]})")
    unwrapped.load_state_dict(state, strict=False)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    info = json.loads((ckpt / "state.json").read_text())
    _set_rng_state(info["rng"], torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True))
    return info


# ----------------------------------------------------------------------------------------------------- metrics
def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a whole row (the torn last line of a killed run) is skipped
    with a warning."""
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"stage_index", "step", "loss"} <= row.keys():
                raise ValueError("not a metrics row")
        except ValueError:
            logger.warning("%s: line %d is not a whole metrics row (a run killed while writing it?); skipped: %.80r",
                           path, number, line)
            continue
        rows.append(row)
    return rows


class MetricsLog:
    """Appends JSON lines; on resume, drops lines past the resumed step (and a torn last line) so the curve
    continues seamlessly."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate(self, stage_index: int, step: int) -> None:
        if not (self.enabled and self.path.is_file()):
            return
        keep = [row for row in read_metrics(self.path)
                if row["stage_index"] < stage_index or (row["stage_index"] == stage_index and row["step"] <= step)]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_losses(metrics: Path, png: Path, title: str = "") -> Path | None:
    """Loss over global step for every stage, with stage boundaries; smoothed curve over the raw one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    stages = sorted({(r["stage_index"], r["stage"]) for r in rows})
    for i, name in stages:
        part = [r for r in rows if r["stage_index"] == i]
        x = np.array([r["global_step"] for r in part])
        y = np.array([r["loss"] for r in part])
        line = ax.plot(x, y, alpha=0.25)[0]
        k = max(1, len(y) // 20)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], smooth, color=line.get_color(), label=f"{i + 1}. {name}")
        ax.axvline(x[0], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("training loss")
    fig.text(0.01, 0.01, "per answer token; siglip stages: per picture; ctc stages: per transcript token",
             fontsize=8, color="dimgrey")
    ax.set_yscale("log")
    ax.set_title(title or "training loss")
    ax.legend()
    return save_figure(fig, png)


def record_template(record) -> str | None:
    """A record's question template (`meta.template`, as the tiny world writes it), or `None`."""
    meta = record.get("meta") if isinstance(record, dict) else None
    return meta.get("template") if isinstance(meta, dict) else None


def check_record_files(recipe: Recipe) -> None:
    """Every record file the recipe's stages read exists, and every template a source names occurs in its records
    (before any training starts)."""
    from ..data.ola_format import read_records

    for name in sorted({n for stage in recipe.stages for n in stage.data}):
        source = recipe.sources[name]
        try:
            files = source_files(source)
        except ConfigError as err:
            raise ConfigError(f"{recipe.path}: sources.{name}: {err}") from err
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"{recipe.path}: sources.{name}: record file {f} does not exist")
        if source.templates is not None:
            found = {record_template(r) for f in files for r in read_records(f)} - {None}
            missing = [t for t in source.templates if t not in found]
            if missing:
                raise ConfigError(f"{recipe.path}: sources.{name}.templates: no record has template(s) {missing}; "
                                  f"its records have {sorted(found)}")


def save_figure(fig, png: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Writes a matplotlib figure atomically (temporary file, then rename) and closes it; `rect`: `tight_layout`'s."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -------------------------------------------------------------------------------------------------- the loop
def _build_optimizer(groups, stage: Stage, total_steps: int):
    from transformers import get_scheduler

    param_groups = []
    for name, params in groups:
        params = [p for p in params if p.requires_grad]
        if params:
            lr = stage.lr.get(name, stage.lr["default"])
            param_groups.append({"params": params, "lr": lr, "name": name})
    optimizer = torch.optim.AdamW(param_groups, weight_decay=stage.weight_decay, betas=(0.9, 0.98))
    warmup = int(round(stage.warmup_ratio * total_steps))
    scheduler = get_scheduler(stage.scheduler if stage.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def stage_steps(stage: Stage, sizes: list[int]) -> int:
    """Optimizer steps of a stage: given, or `epochs` passes over its mixture."""
    if stage.steps is not None:
        return stage.steps
    records = sum(sizes) if stage.sampling == "proportional" else max(sizes) * len(sizes)
    return max(1, math.ceil(stage.epochs * records / (stage.batch_size * stage.grad_accum)))


def train(recipe: Recipe, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          max_steps: int | None = None, feature_cache_dir: str | os.PathLike | None = None) -> Path:
    """Runs every stage of `recipe` into `out`; returns the final model's directory.

    Args:
        recipe: A loaded recipe (`load_recipe`).
        out: Output folder (see the module docstring for its layout).
        resume: Continue a run in `out`: finished stages are kept, a running stage continues from its last
            checkpoint with the same data order, optimizer, scheduler and RNG state. Without it, `out` must not
            hold an earlier run. A run killed at any instant resumes (see the module docstring).
        progress: Show a progress bar per stage.
        max_steps: Stop the run after this many optimizer steps in total (for tests of interruption).
        feature_cache_dir: Where frozen encoders' outputs are cached (`None`: `<omniola home>/feature_cache`).

    Raises:
        ConfigError: the recipe's files or settings are wrong, or `out` holds a run and `resume` is false.
        OutputInUseError: another trainer is writing `out` (it holds `out/train.lock`).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    out = Path(out)
    check_record_files(recipe)
    precision = {s.precision for s in recipe.stages}
    if len(precision) > 1:
        raise ConfigError(f"{recipe.path}: stages use different precisions {sorted(precision)}; use one per recipe")
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision.pop()]
    # A process may run several recipes (tests, experiments): forget the previous run's precision setting. The
    # distributed process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # split_batches: the recipe's batch_size is the global batch, cut across processes, so N processes see exactly
    # the samples one process would. find_unused_parameters: a process's half of a batch may hold no audio (or no
    # image), so that encoder's connector gets no gradient there.
    accelerator = Accelerator(
        mixed_precision=mixed, dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    # One trainer per output folder, for the whole run: the main process holds out/train.lock (the others write
    # nothing there). The kernel releases it when the process ends, however it ends.
    lock = FolderLock(out, LOCK_FILE, holder="trainer") if accelerator.is_main_process else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None:
            if not resume and any(p.name != LOCK_FILE for p in out.iterdir()):
                raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
            write_text_atomic(out / "recipe.yaml", Path(recipe.path).read_text(encoding="utf-8"))
        accelerator.wait_for_everyone()
        return _run_stages(recipe, out, accelerator, mixed, resume=resume, progress=progress, max_steps=max_steps,
                           feature_cache_dir=feature_cache_dir)
    finally:
        if lock is not None:
            lock.release()


def _write_summary(path: Path, summary: dict) -> None:
    write_text_atomic(path, json.dumps(summary, indent=2))


def finished_stage_entry(sdir: Path, index: int, stage: Stage, metrics: Path) -> dict:
    """A finished stage's summary entry, read back from its model folder (`training_stage.json`, swapped in with
    the model, so a stage whose model is there always has it); for a model folder written without one, the steps
    are taken from metrics.jsonl (or the recipe)."""
    record = sdir / "model" / STAGE_RECORD
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    logged = [r["step"] for r in read_metrics(metrics) if r["stage_index"] == index]
    steps = max(logged) if logged else (stage.steps or 0)
    logger.warning("stage %s: no summary entry and no %s; its steps (%d) are taken from %s", stage.name,
                   record, steps, "metrics.jsonl" if logged else "the recipe")
    return {"name": stage.name, "steps": steps, "rebuilt_from": "metrics.jsonl" if logged else "recipe"}


def _run_stages(recipe: Recipe, out: Path, accelerator, mixed: str, *, resume: bool, progress: bool,
                max_steps: int | None, feature_cache_dir: str | os.PathLike | None) -> Path:
    """`train`'s stage loop, in `out` (locked by this trainer)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..data import OlaCollator

    main = accelerator.is_main_process
    metrics = MetricsLog(out / "metrics.jsonl", main)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {"stages": []}
    validated = False
    global_step = 0
    run_start = time.perf_counter()
    for index, stage in enumerate(recipe.stages):
        sdir = stage_dir(out, index, stage)
        n_before = global_step
        if main:
            recover_folder(sdir / "model")  # a save killed during its swap: finished or undone
        accelerator.wait_for_everyone()
        if (sdir / "model" / "config.json").is_file():
            done = next((s for s in summary["stages"] if s["name"] == stage.name), None)
            if done is None:  # killed between the stage's save and the summary's
                done = finished_stage_entry(sdir, index, stage, metrics.path)
                summary["stages"].append(done)
                if main:
                    _write_summary(summary_path, summary)
            global_step += done["steps"]
            if main:
                shutil.rmtree(sdir / "checkpoints", ignore_errors=True)  # killed while removing them
                logger.info("stage %d (%s) already finished: %s", index + 1, stage.name, sdir / "model")
            continue
        set_seed(recipe.seed + index)
        model, processor = load_start_model(recipe, index, out)
        if not validated:  # module names, against the real model, before any training
            resolve_module_names(recipe, model)
            validated = True
        model.model.language_model.set_attn_implementation(attention_kernel(stage, accelerator.device))
        groups = configure_trainable(model, stage)
        if stage.gradient_checkpointing:
            model.model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
        if stage.objective == "siglip":  # the Ola model inside a wrapper with SigLIP's heads (dropped at the end)
            from .siglip import SiglipObjective

            model = SiglipObjective(model)
            groups.append(("siglip_head", model.head_parameters()))
        elif stage.objective == "ctc":  # likewise, with CTC's blank and scale
            from .ctc import CtcObjective

            model = CtcObjective(model, ignore_ids=processor.tokenizer.all_special_ids)
            groups.append(("ctc_head", model.head_parameters()))
        elif stage.objective == "ground":  # no heads: the targets are the LLM's own word embeddings
            from .grounding import GroundingObjective

            model = GroundingObjective(model, processor.tokenizer)

        model = accelerator.prepare(model)
        unwrapped = accelerator.unwrap_model(model)
        ola = unwrapped if stage.objective == "lm" else unwrapped.ola  # what the stage checkpoint saves
        cache = None
        cached = frozen_encoders(ola, stage) if stage.feature_cache and stage.objective != "siglip" else ()
        if cached:
            from ..data.feature_cache import EncoderFeatureCache
            from ..inference import omniola_home

            cache_root = Path(feature_cache_dir) if feature_cache_dir else omniola_home() / "feature_cache"
            modalities = [m for c in cached for m in (("image", "video") if c == "vision" else (c,))]
            cache = EncoderFeatureCache(cache_root, ola, modalities=modalities,
                                        autocast_dtype=torch.bfloat16 if mixed == "bf16" else None)
        datasets, modalities, weights = stage_data(recipe, stage, processor, cache)
        sizes = [len(d) for d in datasets]
        offsets = np.cumsum([0] + sizes[:-1]).tolist()
        probabilities = mixture_probabilities(sizes, weights, modalities, stage.sampling)
        steps = stage_steps(stage, sizes)
        sampler = MixtureBatchSampler(
            offsets, sizes, probabilities, steps * stage.grad_accum, stage.batch_size, seed=recipe.seed * 1000 + index,
            group_key=_group_key(datasets, offsets) if recipe.group_by_modality else None,
        )
        if cache is not None and main:  # encode what this stage will draw, once; later stages and runs reuse it
            drawn = np.unique(np.concatenate(sampler.batches))
            for d, (dataset, start) in enumerate(zip(datasets, offsets)):
                mine = drawn[(drawn >= start) & (drawn < start + sizes[d])] - start
                if len(mine):
                    cache.fill(torch.utils.data.Subset(dataset, mine.tolist()), progress=progress)
        accelerator.wait_for_everyone()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.ConcatDataset(datasets), batch_sampler=sampler,
            collate_fn=OlaCollator(processor.tokenizer.pad_token_id), num_workers=recipe.num_workers,
        )
        optimizer, scheduler = _build_optimizer(groups, stage, steps)
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)

        start_step = 0
        ckpt = find_resume_checkpoint(sdir) if resume else None
        if ckpt is not None:
            info = load_resume_checkpoint(ckpt, accelerator, model, optimizer, scheduler)
            start_step = info["step"]
            global_step += start_step  # the steps trained before the interruption count towards the run's total
            if main:
                logger.info("resuming stage %s at step %d from %s", stage.name, start_step, ckpt)
        metrics.truncate(index, start_step)
        batches = accelerator.skip_first_batches(loader, start_step * stage.grad_accum) if start_step else loader
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        bar = tqdm(total=steps, initial=start_step, desc=f"stage {index + 1}/{len(recipe.stages)} {stage.name}",
                   disable=not (progress and main), dynamic_ncols=True, unit="step")
        stage_start = time.perf_counter()
        step = start_step
        smoothed = None
        samples_since, time_since = 0, time.perf_counter()
        micro = 0
        loss_acc = 0.0
        stopped = False
        for batch in batches:
            if batch is None:
                continue
            labels = batch.pop("labels")
            n_local = (labels[:, 1:] != -100).sum()
            n_global = accelerator.reduce(n_local.detach().clone(), reduction="sum")
            sync = (micro + 1) % stage.grad_accum == 0
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
            with ctx, accelerator.autocast():
                loss = model(**batch, labels=labels, loss_only=True).loss
                # Sum over this process's answer tokens / all processes' tokens x processes: after DDP's mean
                # this is the mean over the global batch's answer tokens, exactly as one process would compute.
                scaled = loss * n_local * accelerator.num_processes / n_global.clamp(min=1) / stage.grad_accum
                accelerator.backward(scaled)
            loss_acc += float((loss * n_local).detach()) / max(1, float(n_global)) * accelerator.num_processes
            samples_since += labels.shape[0] * accelerator.num_processes
            micro += 1
            if not sync:
                continue
            if stage.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            global_step += 1
            step_loss = float(accelerator.reduce(torch.tensor(loss_acc / stage.grad_accum), reduction="sum"))
            step_loss /= accelerator.num_processes
            loss_acc = 0.0
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"stage {stage.name}: loss became {step_loss} at step {step}; lower the "
                                         "learning rate or check the data")
            smoothed = step_loss if smoothed is None else 0.9 * smoothed + 0.1 * step_loss
            if step % stage.log_every == 0 or step == steps:
                now = time.perf_counter()
                rate = samples_since / max(now - time_since, 1e-9)
                samples_since, time_since = 0, now
                metrics.write({"stage": stage.name, "stage_index": index, "step": step,
                               "global_step": n_before + step, "loss": step_loss,
                               "lr": scheduler.get_last_lr()[0], "samples_per_s": rate,
                               "elapsed_s": now - run_start})
                bar.set_postfix(loss=f"{smoothed:.3f}", samples_s=f"{rate:.1f}")
            bar.update(1)
            if step % stage.save_every == 0 and step < steps:
                save_resume_checkpoint(sdir, accelerator, model, optimizer, scheduler, step, {"stage": stage.name})
            if max_steps is not None and global_step >= max_steps:
                stopped = True
                break
        bar.close()
        if stopped:
            save_resume_checkpoint(sdir, accelerator, model, optimizer, scheduler, step, {"stage": stage.name})
            if main:
                plot_losses(metrics.path, out / "loss.png", recipe.name)
            return sdir / "checkpoints"
        wall = time.perf_counter() - stage_start
        accelerator.wait_for_everyone()
        if main:
            from ..components import save_model

            entry = {
                "name": stage.name, "steps": steps, "trained_steps_this_run": step - start_step,
                "wall_s": round(wall, 1),
                "samples_per_s": round((step - start_step) * stage.batch_size * stage.grad_accum / max(wall, 1e-9), 2),
                "final_loss_smoothed": smoothed, "trainable_parameters": trainable,
                "feature_cache": list(cached), "peak_rss_mib": round(peak_rss_mib(), 1),
            }
            merge_lora(ola, sdir)
            if stage.objective == "ctc" and ola.config.snap_audio_tokens:  # later stages see tokens snapped to words
                ola.model.set_audio_snap(unwrapped.blank, unwrapped.ignore_ids)
            # The entry is saved with the model too, so a kill before the summary is written loses nothing.
            save_model(ola, processor, sdir / "model", extra_files={STAGE_RECORD: json.dumps(entry, indent=2) + "\n"})
            if stage.objective == "ctc":  # CTC's learned blank: a greedy readout of the connector needs it
                unwrapped.save_blank(sdir / "ctc_blank.safetensors")
            shutil.rmtree(sdir / "checkpoints", ignore_errors=True)
            summary["stages"] = [s for s in summary["stages"] if s["name"] != stage.name] + [entry]
            _write_summary(summary_path, summary)
            plot_losses(metrics.path, out / "loss.png", recipe.name)
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        del model, ola, optimizer, scheduler, loader
    final = stage_dir(out, len(recipe.stages) - 1, recipe.stages[-1]) / "model"
    if main:
        link = out / "final.tmp"  # a new link renamed over the old one: `final` is always there once made
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(final.relative_to(out))
        os.replace(link, out / "final")
        summary["total_wall_s_this_run"] = round(time.perf_counter() - run_start, 1)
        summary["num_processes"] = accelerator.num_processes
        summary["peak_rss_mib"] = round(peak_rss_mib(), 1)
        _write_summary(summary_path, summary)
    accelerator.wait_for_everyone()
    return final
