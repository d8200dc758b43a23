"""The trainer and recipes on a micro random model and the small tiny world: stages, trainable parameters,
resume, two processes, validation errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omniola import OlaForConditionalGeneration
from omniola.errors import ConfigError
from omniola.experiments import budget_stages
from omniola.training import load_recipe, train
from omniola.training.recipe import packaged_recipe
from omniola.training.sampler import MixtureBatchSampler, mixture_probabilities

from conftest import micro_model_and_world

RECIPE = """
name: micro
model: {{from: {model}}}
data: {{tiny_world: {world}}}
sources:
  caption: {{tiny_world: caption}}
  image_qa: {{tiny_world: image_qa}}
  asr: {{tiny_world: asr}}
  video: {{tiny_world: video_cross_qa}}
defaults: {{batch_size: 4, precision: {precision}, save_every: 2, max_length: 4096, feature_cache: false}}
stages:
  - {{name: align, data: {{caption: 1}}, train: [vision_connector], lr: 1.0e-3, steps: 3}}
  - {{name: video, data: {{caption: 1, video: 1}}, train: [vision_tower, vision_connector], steps: 3}}
  - {{name: audio, data: {{asr: 1, video: 1, image_qa: 1}}, train: [audio_connector], lora: {{r: 4, alpha: 8}},
     steps: 4, sampling: balanced}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return micro_model_and_world(tmp_path_factory.mktemp("training"))


def write_recipe(root: Path, folder: Path | None = None, precision: str = "bf16", edit=lambda text: text) -> Path:
    path = (folder or root) / "r.yaml"
    path.write_text(edit(RECIPE.format(model=root / "micro", world=root / "world", precision=precision)))
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory) -> Path:
    """The micro recipe trained without interruption (bf16), for the resume tests to compare with."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(load_recipe(write_recipe(setup)), out, progress=False)
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    """`run` reproduces `reference`: the loss curve, every global step once, the final weights, the summary."""
    rows, expected = metric_rows(run), metric_rows(reference)
    assert [r["global_step"] for r in rows] == [r["global_step"] for r in expected] == list(range(1, 11))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in expected], rtol=1e-5, atol=1e-6)
    a, b = weights(reference / "final"), weights(run / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    stages = json.loads((run / "summary.json").read_text())["stages"]
    expected_stages = json.loads((reference / "summary.json").read_text())["stages"]
    assert [(s["name"], s["steps"]) for s in stages] == [(s["name"], s["steps"]) for s in expected_stages]
    for stage, expected_stage in zip(stages, expected_stages):  # (a resumed stage smooths its own steps only)
        if stage["trained_steps_this_run"] == stage["steps"]:
            assert stage["final_loss_smoothed"] == pytest.approx(expected_stage["final_loss_smoothed"], rel=1e-5)


@pytest.mark.filterwarnings("error::FutureWarning")  # no library deprecation noise reaches a user
def test_three_stages_train_exactly_the_named_modules(setup, tmp_path):
    recipe = load_recipe(write_recipe(setup))
    final = train(recipe, tmp_path / "run", progress=False)
    assert final == tmp_path / "run" / "03-audio" / "model" and (tmp_path / "run" / "final").resolve() == final
    start, s1, s2, s3 = (weights(p) for p in (setup / "micro", tmp_path / "run" / "01-align" / "model",
                                              tmp_path / "run" / "02-video" / "model", final))

    def changed(a, b):
        return {k.split(".")[1] if k.startswith("model.") else k.split(".")[0]
                for k in a if not torch.equal(a[k], b[k])}

    assert changed(start, s1) == {"vision_connector"}
    assert changed(s1, s2) == {"vision_tower", "vision_connector"}
    assert changed(s2, s3) == {"audio_connector", "language_model"}  # LoRA merged into the LLM
    assert set(s3) == set(start)  # merged: no LoRA names left, nothing missing
    assert (tmp_path / "run" / "03-audio" / "lora_adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "run" / "03-audio" / "checkpoints").exists()

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows][:4] == [("align", 1), ("align", 2), ("align", 3), ("video", 1)]
    assert [r["global_step"] for r in rows] == list(range(1, 11)) and all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["align", "video", "audio"]

    # the stage checkpoint loads for chat
    from omniola.inference import load_model

    model, processor = load_model(final)
    inputs = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                           add_generation_prompt=True)
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] >= inputs["input_ids"].shape[1]


def test_lora_stage_trains_only_lora_and_named_modules(setup):
    from omniola.training.trainer import configure_trainable

    recipe = load_recipe(write_recipe(setup))
    model = OlaForConditionalGeneration.from_pretrained(setup / "micro")
    configure_trainable(model, recipe.stages[2])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.audio_connector.") or "lora_" in n for n in trained)
    assert any(n.startswith("model.audio_connector.") for n in trained)
    lora_layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained if "lora_" in n}
    assert lora_layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_resume_after_interruption_reproduces_the_uninterrupted_run(setup, full_run, tmp_path):
    recipe = load_recipe(write_recipe(setup))
    # stopped in the middle of stage 2 (after its step-2 checkpoint), as if killed while writing the next metrics
    # line (a torn last line), then resumed
    stopped = train(recipe, tmp_path / "resumed", progress=False, max_steps=5)
    assert (stopped / "latest").read_text() == "step-0000002"
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"stage": "video", "stage_index": 1, "st')
    with pytest.raises(ConfigError, match="--resume"):
        train(recipe, tmp_path / "resumed", progress=False)
    train(recipe, tmp_path / "resumed", progress=False, resume=True)
    assert_same_run(tmp_path / "resumed", full_run)


KILLED_TRAINING = """
import os, signal, sys
from pathlib import Path

from omniola.training import load_recipe, train, trainer

recipe, out, kill_at = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if kill_at == "stage-save":  # stage 1's model complete in model.partial, not yet renamed into place
    rename = os.rename
    os.rename = lambda a, b: die() if Path(a).name == "model.partial" else rename(a, b)
elif kill_at == "before-summary":  # stage 1's model saved, the summary not yet written
    trainer._write_summary = lambda path, summary: die()
train(load_recipe(recipe), out, progress=False, resume=out.exists())
"""


def test_a_run_sigkilled_at_its_writes_resumes_to_the_uninterrupted_run(setup, full_run, tmp_path):
    recipe_path, out = write_recipe(setup), tmp_path / "run"

    def run_killed(kill_at: str) -> None:
        killed = subprocess.run([sys.executable, "-c", KILLED_TRAINING, str(recipe_path), str(out), kill_at],
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-3000:]

    run_killed("stage-save")
    assert (out / "01-align" / "model.partial").is_dir() and not (out / "01-align" / "model").exists()
    run_killed("before-summary")  # a second kill, in the resumed run (which redoes stage 1's last step)
    assert (out / "01-align" / "model" / "config.json").is_file() and not (out / "summary.json").exists()
    train(load_recipe(recipe_path), out, progress=False, resume=True)
    assert_same_run(out, full_run)
    saved = json.loads((out / "01-align" / "model" / "training_stage.json").read_text())
    assert json.loads((out / "summary.json").read_text())["stages"][0] == saved  # the entry the kill lost
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".partial", ".previous", ".tmp")) or
                 p.name == "checkpoints"]
    assert leftovers == []


def test_a_second_trainer_on_the_same_out_is_refused(setup, tmp_path):
    from typer.testing import CliRunner

    from omniola.cli import app
    from test_files import hold_lock

    recipe_path, out = write_recipe(setup), tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out / "train.lock")  # a trainer running in another process
    try:
        result = CliRunner().invoke(app, ["train", str(recipe_path), "--out", str(out), "--resume", "--quiet"])
        assert result.exit_code == 2
        assert f"{out} is in use by another trainer (pid {holder.pid}" in " ".join(result.output.split())
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the killed trainer's lock file is left behind, but does not block the next one
    train(load_recipe(recipe_path), out, progress=False, max_steps=1)
    assert (out / "01-align" / "checkpoints" / "latest").is_file()


def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path):
    recipe_path = write_recipe(setup, precision="fp32")
    one = train(load_recipe(recipe_path), tmp_path / "one", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu-2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "-m", "omniola", "train", str(recipe_path), "--out", str(tmp_path / "two"), "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_processes"] == 2
    a, b = weights(one), weights(tmp_path / "two" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_feature_cache_serves_frozen_encoders_with_the_same_losses(setup, tmp_path):
    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    plain = load_recipe(write_recipe(setup, tmp_path, precision="fp32"))
    train(plain, tmp_path / "plain", progress=False)
    cached = load_recipe(write_recipe(setup, tmp_path, precision="fp32",
                                      edit=lambda t: t.replace("feature_cache: false", "feature_cache: true")))
    train(cached, tmp_path / "cached", progress=False, feature_cache_dir=tmp_path / "cache")
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert [s["feature_cache"] for s in summary["stages"]] == [["audio", "vision"], ["audio"], ["audio", "vision"]]
    assert any((tmp_path / "cache").glob("audio-*/*.safetensors"))
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "plain"), rtol=1e-5, atol=1e-6)


def test_siglip_stage_pretrains_the_tower_alone_resumes_and_saves_no_heads(setup, tmp_path):
    def siglip_first(text):  # a tower-pretraining stage before the others
        return text.replace("stages:\n", "stages:\n  - {name: tower, data: {caption: 1}, train: [vision_tower], "
                                          "objective: siglip, lr: 1.0e-3, batch_size: 8, steps: 4}\n")

    recipe = load_recipe(write_recipe(setup, tmp_path, edit=siglip_first))
    assert recipe.stages[0].objective == "siglip" and recipe.stages[1].objective == "lm"
    train(recipe, tmp_path / "full", progress=False, max_steps=5)
    start, tower = weights(setup / "micro"), weights(tmp_path / "full" / "01-tower" / "model")
    assert set(tower) == set(start)  # the SigLIP heads are not part of the checkpoint
    assert {k.split(".")[1] for k in start if not torch.equal(start[k], tower[k])} == {"vision_tower"}
    # killed after the siglip stage's step-2 checkpoint, resumed: the same losses (the heads are in the checkpoint)
    train(recipe, tmp_path / "resumed", progress=False, max_steps=3)
    train(recipe, tmp_path / "resumed", progress=False, resume=True, max_steps=5)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "full")) == 5 and all(np.isfinite(losses(tmp_path / "full")))
    np.testing.assert_allclose(losses(tmp_path / "resumed"), losses(tmp_path / "full"), rtol=1e-5, atol=1e-6)


def test_siglip_objective_learns_to_match_pictures_and_captions():
    from omniola.training.siglip import SiglipObjective

    from conftest import micro_config, micro_tokenizer

    torch.manual_seed(0)
    model = OlaForConditionalGeneration(micro_config(micro_tokenizer(), image_views="native"))
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    objective = SiglipObjective(model)
    classes = torch.arange(8) % 4  # four captions, each twice: duplicates are positives, not negatives
    patches = 2 * 2  # a 16x16 picture, patch 8: 2x2 patches of 3 * 8 * 8 values
    pixel_values = torch.randn(4, 3 * 64)[classes].repeat_interleave(patches, 0)
    pixel_values = pixel_values + 0.1 * torch.randn_like(pixel_values)
    grid = torch.tensor([[2, 2]] * 8)
    input_ids = torch.stack([torch.tensor([7, 20 + c, 30 + c, 2]) for c in classes.tolist()])
    labels = input_ids.clone()
    labels[:, 0] = -100  # the prompt token is not part of the caption
    optimizer = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(200):  # a plateau while the bias settles, then the pairs separate (~step 140)
        out = objective(input_ids=input_ids, labels=labels, pixel_values=pixel_values, image_grid_hw=grid)
        first = float(out.loss.detach()) if first is None else first
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert float(out.loss) < 0.05 * first  # duplicates counted as negatives would keep it near ln 2 per picture
    assert torch.equal(out.logits.argmax(1) % 4, classes)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("model.vision_tower."))


@pytest.mark.parametrize("snap", [False, True])
def test_ctc_stage_trains_the_audio_connector_alone_and_keeps_its_blank_out_of_the_model(setup, tmp_path, snap):
    """The blank is saved beside the model; with `snap_audio_tokens` it is also stored in the model for snapping."""
    from omniola.training.ctc import load_ctc_blank

    from conftest import micro_config, micro_processor, micro_tokenizer

    # the micro tokenizer spells words out byte by byte: one connector token per encoder frame so transcripts fit
    tokenizer = micro_tokenizer()
    config = micro_config(tokenizer)
    config.audio_connector = {**config.audio_connector, "frames_per_token": 1}
    config.snap_audio_tokens = snap
    torch.manual_seed(0)
    OlaForConditionalGeneration(config).save_pretrained(tmp_path / "micro")
    micro_processor(tokenizer, config).save_pretrained(tmp_path / "micro")

    def ctc_first(text):  # a speech pre-alignment stage before the others
        text = text.replace(str(setup / "micro"), str(tmp_path / "micro"))
        return text.replace("stages:\n", "stages:\n  - {name: speech, data: {asr: 1}, train: [audio_connector], "
                                          "objective: ctc, lr: 1.0e-3, batch_size: 4, steps: 3}\n")

    recipe = load_recipe(write_recipe(setup, tmp_path, edit=ctc_first))
    train(recipe, tmp_path / "run", progress=False)
    start, speech = weights(tmp_path / "micro"), weights(tmp_path / "run" / "01-speech" / "model")
    assert set(speech) == set(start)  # CTC's blank and scale are not part of the checkpoint
    blank = load_ctc_blank(tmp_path / "run" / "01-speech" / "ctc_blank.safetensors")  # for a greedy readout
    assert blank.shape == (config.text_config.hidden_size,) and torch.isfinite(blank).all()
    changed = {k.split(".")[1] for k in start if not torch.equal(start[k], speech[k])}
    assert changed == ({"audio_connector", "audio_snap_blank", "audio_snap_ids"} if snap else {"audio_connector"})
    if snap:
        assert torch.equal(speech["model.audio_snap_blank"], blank)
        allowed = speech["model.audio_snap_ids"]
        assert not allowed[[i for i in tokenizer.all_special_ids if i < len(allowed)]].any() and allowed.sum() > 10
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows[:3]] == ["speech"] * 3 and all(np.isfinite(r["loss"]) for r in rows)


def test_snap_audio_tokens_puts_words_on_their_embeddings(tmp_path):
    """`snap_audio_tokens`: once a blank is set, audio tokens the CTC readout reads as a word are that word's input
    embedding (never a special token), the rest stay; the gradient reaches the connector; the blank is saved."""
    from omniola.modeling.connectors import audio_layout_mask, ctc_labels

    from conftest import micro_config, micro_tokenizer

    torch.manual_seed(0)
    model = OlaForConditionalGeneration(micro_config(micro_tokenizer(), snap_audio_tokens=True)).eval()
    states, lengths = torch.randn(40, 16), torch.tensor([40])

    def tokens(**kwargs):
        return model.model.get_audio_features(None, None, None, encoder_states=states, encoder_lengths=lengths,
                                              **kwargs)[0]

    clip = tokens(snap=False)
    assert torch.equal(tokens(), clip)  # no blank yet (before a ctc stage): nothing snaps
    table = model.get_input_embeddings().weight.detach()
    content = ~audio_layout_mask(model.model.audio_connector, clip)
    blank = clip[content][0].detach()  # the first content token reads as the blank
    special = ctc_labels(table, blank, clip)[content][1:2]  # a word some token reads: made a special token
    model.model.set_audio_snap(blank, special)
    labels = ctc_labels(table, blank, clip, special)
    words = content & (labels >= 0)
    snapped = tokens()
    assert words.any() and (labels[content] == -1).any() and not (labels == special).any()
    assert torch.allclose(snapped[words], table[labels[words]]) and torch.equal(snapped[~words], clip[~words])
    batch = model.model.get_audio_features(None, None, None, encoder_states=torch.cat([states, states[:24]]),
                                           encoder_lengths=torch.tensor([40, 24]))  # a batch's clips snap together
    alone = model.model.get_audio_features(None, None, None, encoder_states=states[:24],
                                           encoder_lengths=torch.tensor([24]))[0]
    assert torch.equal(batch[0], snapped) and torch.equal(batch[1], alone)
    model.model.audio_connector.requires_grad_(True)
    tokens()[words].sum().backward()  # straight through: the connector learns from the snapped tokens
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.audio_connector.parameters())
    model.save_pretrained(tmp_path / "m")
    loaded = OlaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded.model.audio_snap_blank, blank) and torch.equal(
        loaded.model.get_audio_features(None, None, None, encoder_states=states, encoder_lengths=lengths)[0], snapped)
    with pytest.raises(ConfigError, match="snap_audio_tokens"):
        OlaForConditionalGeneration(micro_config(micro_tokenizer())).model.set_audio_snap(blank, special)


def test_a_source_can_take_only_some_templates(setup):
    """`templates`: the source's records whose `meta.template` is named, all of them, in order."""
    from omniola.data.ola_format import read_records
    from omniola.processing_ola import OlaProcessor
    from omniola.training.trainer import source_files, stage_data

    recipe = load_recipe(write_recipe(setup, edit=lambda t: t.replace(
        "video: {tiny_world: video_cross_qa}", "video: {tiny_world: video_cross_qa, templates: [name, change_tone]}")))
    datasets, _, _ = stage_data(recipe, recipe.stages[1], OlaProcessor.from_pretrained(setup / "micro"))
    records = read_records(source_files(recipe.sources["video"])[0])
    wanted = [r["id"] for r in records if r["meta"]["template"] in ("name", "change_tone")]
    assert 0 < len(wanted) < len(records)
    assert [datasets[1].record(i)["id"] for i in range(len(datasets[1]))] == wanted


def test_attention_kernel_is_eager_on_cpu_unless_the_stage_names_one():
    from omniola.training.recipe import Stage
    from omniola.training.trainer import attention_kernel

    stage = Stage(name="s", data={"a": 1.0}, train=["llm"])
    assert attention_kernel(stage, torch.device("cpu")) == "eager"
    assert attention_kernel(stage, torch.device("cuda")) == "sdpa"
    assert attention_kernel(dataclasses.replace(stage, attention="sdpa"), torch.device("cpu")) == "sdpa"


def test_ctc_objective_aligns_the_audio_connector_to_the_llm_embeddings():
    """Encoder frames that say three tokens in order: CTC teaches the connector to emit those tokens' embeddings."""
    from omniola.training.ctc import CtcObjective, content_tokens, greedy_readout

    from conftest import micro_config, micro_tokenizer

    torch.manual_seed(0)
    model = OlaForConditionalGeneration(micro_config(micro_tokenizer()))
    model.requires_grad_(False)
    model.model.audio_connector.requires_grad_(True)
    objective = CtcObjective(model, ignore_ids=[2])
    words = torch.randn(12, 16)  # an encoder-frame pattern per token 20..31
    targets = torch.randint(0, 12, (6, 3))
    frames = torch.cat([words[t].repeat_interleave(20, 0) + 0.05 * torch.randn(60, 16) for t in targets])
    input_ids = torch.cat([torch.full((6, 1), 7), targets + 20, torch.full((6, 1), 2)], dim=1)  # prompt, 3, end
    labels = input_ids.clone()
    labels[:, 0] = -100
    batch = dict(input_ids=input_ids, labels=labels, audio_encoder_states=frames,
                 audio_encoder_lengths=torch.full((6,), 60))
    optimizer = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(300):
        out = objective(**batch)
        first = float(out.ctc) if first is None else first
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert float(out.ctc) < 0.1 * first
    # greedy CTC decoding of the connector's outputs against the embedding table gives the spoken tokens
    clips = [content_tokens(model.model.audio_connector, c) for c in model.model.get_audio_features(
        None, None, None, encoder_states=frames, encoder_lengths=torch.full((6,), 60))]
    for clip, target in zip(clips, targets):
        assert greedy_readout(model.get_input_embeddings().weight, objective.blank, clip) == (target + 20).tolist()
    # a blank between two runs of one token keeps both; without it they merge
    table, blank = torch.eye(4)[:3], torch.eye(4)[3]
    assert greedy_readout(table, blank, torch.eye(4)[[1, 1, 3, 1, 0, 0, 3]]) == [1, 1, 0]
    near_0 = torch.eye(4)[0] + 0.1 * torch.eye(4)[1]
    assert greedy_readout(table, blank, near_0[None]) == [0]
    assert greedy_readout(table, blank, near_0[None], ignore_ids=torch.tensor([0, 7])) == [1]  # never a special token
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("model.audio_connector."))
    # a clip too short for its transcript is left out and counted
    short = dict(batch, audio_encoder_states=frames[:6 * 10], audio_encoder_lengths=torch.full((6,), 10))
    assert float(objective(**short).loss) == 0.0 and objective.skipped == 6


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("name: micro", "name: micro\nbogus: 1"), r"recipe: unknown key\(s\) \['bogus'\]"),
    (lambda t: t.replace("train: [vision_connector], lr", "train: [vision_connector], objective: ctc, lr"),
     r"a ctc stage trains the audio connector alone"),
    (lambda t: t.replace("{caption: 1}, train: [vision_connector]", "{captions: 1}, train: [vision_connector]"),
     r"stages\[0\].data: unknown source\(s\) \['captions'\]"),
    (lambda t: t.replace("train: [vision_connector], lr", "train: [vision_conector], lr"),
     r"stages\[0\] \(align\).train: the model has no module 'vision_conector'"),
    (lambda t: t.replace("name: align, data", "name: align, from: audio, data"), r"stages\[0\].from: stage 'audio' comes later"),
    (lambda t: t.replace("steps: 3}", "steps: 3, epochs: 1}", 1), r"exactly one of `steps` or `epochs`"),
    (lambda t: t.replace("lr: 1.0e-3", "lr: {default: 1.0e-3, audio_connector: 1.0}"), r"stages\[0\] \(align\).lr: unknown"),
    (lambda t: t.replace("precision: bf16", "precision: fp8"), r"precision: 'fp8' is not one of"),
    (lambda t: t.replace("precision: bf16", "precision: bf16, attention: flash"), r"attention: 'flash' is not one of"),
    (lambda t: t.replace("{tiny_world: video_cross_qa}", "{tiny_world: video_cross_qa, templates: [nam]}"),
     r"sources.video.templates: no record has template\(s\) \['nam'\]; its records have \[.*'name'"),
    (lambda t: t.replace("{tiny_world: asr}", "{files: [missing.jsonl]}"), r"sources.asr: record file .*missing.jsonl does not exist"),
    (lambda t: t.replace("{tiny_world: asr}", "{tiny_world: speech}"), r"sources.asr.tiny_world: unknown kind 'speech'"),
    (lambda t: t.replace("train: [vision_connector], lr", "train: [vision_connector], objective: siglip, lr"),
     r"stages\[0\] \(align\).train: a siglip stage trains the vision tower alone"),
    (lambda t: t.replace("train: [vision_connector], lr", "train: [vision_connector], objective: clip, lr"),
     r"stages\[0\] \(align\).objective: 'clip' is not one of"),
])
def test_recipe_errors_name_the_file_and_field(setup, tmp_path, edit, message):
    path = write_recipe(setup, tmp_path, edit=edit)
    with pytest.raises(ConfigError, match=message) as info:
        train(load_recipe(path), tmp_path / "run", progress=False)
    assert str(path) in str(info.value)
    assert not (tmp_path / "run" / "01-align" / "model").exists()


def test_shipped_recipes_validate_and_baselines_match_the_step_budget():
    recipes = {name: load_recipe(packaged_recipe(name)) for name in ("tiny", "tiny-direct-mix", "tiny-balanced",
                                                                      "tiny-grounded", "tiny-dialog", "tiny-motion",
                                                                      "tiny-count", "tiny-grounded-long", "ola-7b")}
    def lm_steps(recipe):
        return sum(s.steps * s.grad_accum for s in budget_stages(recipe))

    tower = recipes["tiny"].stages[0]
    assert tower.objective == "siglip"
    for name in ("tiny-direct-mix", "tiny-balanced"):
        assert len(recipes[name].stages) == 2 and recipes[name].stages[0] == tower  # the same tower pretraining
        assert lm_steps(recipes[name]) == lm_steps(recipes["tiny"])
    grounded = recipes["tiny-grounded"].stages  # the tower as tiny's, then grounding; the vision side then fixed
    assert grounded[0] == tower and grounded[1].objective == "ground"
    assert all(not {"vision_tower", "vision_connector"} & set(s.train) for s in grounded[2:])
    dialog, tiny = recipes["tiny-dialog"].stages, recipes["tiny"].stages  # tiny with the omni stage's clips as chats
    assert dialog[:-1] == tiny[:-1] and dialog[-1].steps == tiny[-1].steps
    assert {k: w for k, w in dialog[-1].data.items() if k != "video_dialog"} == {
        k: w for k, w in tiny[-1].data.items() if not k.startswith("video_")}
    motion = recipes["tiny-motion"].stages  # tiny with a motion stage before video, the vision side fixed from there
    assert motion[:3] + motion[4:] == tiny[:3] + [dataclasses.replace(s, train=motion[4 + i].train, lr=motion[4 + i].lr)
                                                  for i, s in enumerate(tiny[3:])]
    assert motion[3].name == "motion" and motion[3].data == {"video_motion": 1.0}
    assert all(not {"vision_tower", "vision_connector"} & set(s.train) for s in motion[3:])
    count = recipes["tiny-count"].stages  # tiny with a counting stage before omni, whose vision connector is fixed
    assert count[:5] == tiny[:5] and count[-1] == dataclasses.replace(tiny[-1], train=["audio_connector"])
    assert count[5].name == "count" and count[5].data == {"audio_count": 1.0} and count[5].train == []
    long = recipes["tiny-grounded-long"]  # grounding from a scratch tower, the vision side fixed; snapped audio tokens
    assert [s.objective for s in long.stages][:2] == ["ground", "lm"] and long.model["build"]["snap_audio_tokens"]
    assert all(not {"vision_tower", "vision_connector"} & set(s.train) for s in long.stages[1:])
    assert recipes["tiny-balanced"].stages[1].sampling == "balanced"
    assert [s.name for s in recipes["ola-7b"].stages][0] == "image-align"
    with pytest.raises(ConfigError, match="shipped"):
        packaged_recipe("nope")


def test_mixture_sampler_is_deterministic_weighted_and_grouped():
    p = mixture_probabilities([100, 300, 50], [1, 1, 1], ["image", "image", "audio"], "proportional")
    np.testing.assert_allclose(p, [100 / 450, 300 / 450, 50 / 450])
    p = mixture_probabilities([100, 300, 50], [1, 1, 1], ["image", "image", "audio"], "balanced")
    np.testing.assert_allclose(p, [0.25, 0.25, 0.5])
    args = ([0, 100, 400], [100, 300, 50], p, 200, 8, 5)
    a = MixtureBatchSampler(*args, group_key=lambda i: i >= 400)
    assert list(a) == list(MixtureBatchSampler(*args, group_key=lambda i: i >= 400))
    drawn = np.concatenate(list(a))
    assert abs((drawn >= 400).mean() - 0.5) < 0.05
    mixed = sum(len({i >= 400 for i in batch}) > 1 for batch in a)
    assert mixed <= len(a) // 16 + 1  # at most one mixed batch per grouping window
