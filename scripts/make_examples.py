"""Write omniola's small example media into ``examples/``.

Run from the repository root (``python scripts/make_examples.py``; ``--output-dir`` picks another folder).
It writes

- ``shapes.png``: 256x192, a red circle, a blue square and a green triangle on white;
- ``question.wav``: 16 kHz mono 16-bit speech, "What color is the circle?";
- ``clip.mp4``: 128x128 at 8 fps, H.264 + AAC (16 kHz mono): a circle moves to the right while turning from
  red to blue, narrated "The red circle moves right and turns blue."

Speech comes from Piper (``omniola.tts.synthesize_piper``, the bundled ``en_US-joe-medium`` voice), fully
offline. Piper's VITS decoder draws random noise; seeding onnxruntime before the voice is first loaded (done
in :func:`main`) makes the speech, and so every file, identical from run to run on the same install. The
drawings are fixed. Each file is then loaded back with ``omniola.media`` as a check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image, ImageDraw

from omniola.media import load_audio, load_image, load_video
from omniola.tts import synthesize_piper

REPO_ROOT = Path(__file__).resolve().parent.parent

SAMPLING_RATE = 16000  # what the audio encoder consumes; Piper's 22.05 kHz is resampled to it
QUESTION = "What color is the circle?"
NARRATION = "The red circle moves right and turns blue."

CLIP_SIZE = 128  # pixels, square
CLIP_FPS = 8
CLIP_LEAD_IN_S = 0.15  # silence before the narration starts
CLIP_TAIL_S = 0.15  # and after it ends
ONNX_SEED = 20250206  # any fixed value; see the module docstring

RED = (220, 30, 30)
GREEN = (40, 170, 60)
BLUE = (30, 70, 220)


def draw_shapes() -> Image.Image:
    """A 256x192 RGB picture: red circle (left), blue square (middle), green triangle (right) on white."""
    image = Image.new("RGB", (256, 192), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((16, 60, 86, 130), fill=RED)  # circle, diameter 70
    draw.rectangle((98, 62, 164, 128), fill=BLUE)  # square, side 66
    draw.polygon([(210, 58), (246, 130), (174, 130)], fill=GREEN)  # triangle
    return image


def speech(text: str) -> np.ndarray:
    """``text`` spoken by Piper as float32 mono at SAMPLING_RATE, shape [T]."""
    samples, rate = synthesize_piper(text)
    return load_audio((samples, rate), sampling_rate=SAMPLING_RATE)


def write_question_wav(path: Path) -> None:
    """Write the spoken question as 16 kHz mono 16-bit PCM WAV."""
    soundfile.write(path, speech(QUESTION), SAMPLING_RATE, subtype="PCM_16")


def clip_frame(progress: float) -> np.ndarray:
    """Frame at ``progress`` in [0, 1]: the circle slides left to right and blends from red to blue.

    Returns:
        uint8 RGB, shape [CLIP_SIZE, CLIP_SIZE, 3].
    """
    image = Image.new("RGB", (CLIP_SIZE, CLIP_SIZE), "white")
    draw = ImageDraw.Draw(image)
    draw.line((0, 100, CLIP_SIZE, 100), fill=(160, 160, 160), width=2)  # a floor line for reference
    radius = 16
    centre_x = round(24 + progress * (CLIP_SIZE - 48))  # 24 -> 104
    colour = tuple(round(a + progress * (b - a)) for a, b in zip(RED, BLUE, strict=True))
    # The circle rests on the floor line.
    draw.ellipse((centre_x - radius, 99 - 2 * radius, centre_x + radius, 99), fill=colour)
    return np.asarray(image)


def write_clip_mp4(path: Path) -> None:
    """Write the narrated clip: H.264 video (yuv420p) and AAC mono audio at SAMPLING_RATE in MP4."""
    narration = speech(NARRATION)
    seconds = CLIP_LEAD_IN_S + narration.shape[0] / SAMPLING_RATE + CLIP_TAIL_S
    num_frames = int(np.ceil(seconds * CLIP_FPS))
    # The sound track spans exactly the video: lead-in silence, narration, silence to the last frame's end.
    track = np.zeros(num_frames * SAMPLING_RATE // CLIP_FPS, np.float32)
    start = int(CLIP_LEAD_IN_S * SAMPLING_RATE)
    track[start : start + narration.shape[0]] = narration

    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        video = container.add_stream("libx264", rate=CLIP_FPS)
        video.width = video.height = CLIP_SIZE
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "23", "preset": "medium", "threads": "1"}  # one thread: reproducible bytes
        audio = container.add_stream("aac", rate=SAMPLING_RATE)
        audio.layout = "mono"
        audio.bit_rate = 32000

        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(clip_frame(k / (num_frames - 1)), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)

        chunk = 1024  # AAC frame size
        for offset in range(0, track.shape[0], chunk):
            samples = track[None, offset : offset + chunk]  # [1, n]: planar mono
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = SAMPLING_RATE, offset
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)


def check(output_dir: Path) -> None:
    """Load every example back with omniola.media and print what came out."""
    image = load_image(output_dir / "shapes.png")
    print(f"shapes.png    {image.size[0]}x{image.size[1]} {image.mode}")
    question = load_audio(output_dir / "question.wav")
    print(f"question.wav  {question.shape[0] / SAMPLING_RATE:.2f} s at {SAMPLING_RATE} Hz")
    clip = load_video(output_dir / "clip.mp4", num_frames=8)
    audio_seconds = 0.0 if clip.audio is None else clip.audio.shape[0] / SAMPLING_RATE
    print(
        f"clip.mp4      {clip.duration:.2f} s, frames {tuple(clip.frames.shape)}, "
        f"timestamps {np.round(clip.timestamps, 3).tolist()}, audio {audio_seconds:.2f} s"
    )
    for name in ("shapes.png", "question.wav", "clip.mp4"):
        size = (output_dir / name).stat().st_size
        assert size < 200_000, f"{name} is {size} bytes; examples must stay well under 200 KB"


def main(argv: list[str] | None = None) -> None:
    """Write the three examples into ``--output-dir`` (default ``examples/``) and check they load."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "examples", help="where to write")
    args = parser.parse_args(argv)
    output_dir: Path = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)

    import onnxruntime  # installed with piper-tts

    onnxruntime.set_seed(ONNX_SEED)  # before Piper's session exists, so its noise ops are seeded

    draw_shapes().save(output_dir / "shapes.png", optimize=True)
    write_question_wav(output_dir / "question.wav")
    write_clip_mp4(output_dir / "clip.mp4")
    check(output_dir)


if __name__ == "__main__":
    main()
