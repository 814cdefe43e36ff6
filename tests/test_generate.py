"""`mdsgen generate` end to end on real videos, through the command line."""
import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import yaml

from media import make_audio_only, make_video, streams, video_packets
from procs import ROOT


def run_generate(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "mdsgen", "generate", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def generated(tmp_path_factory, bigbuckbunny, video_20s, untrained_checkpoint):
    inputs = tmp_path_factory.mktemp("inputs")
    shutil.copy(bigbuckbunny, inputs / "bunny.mp4")
    shutil.copy(video_20s, inputs / "twenty.mp4")
    out = tmp_path_factory.mktemp("out")
    proc = run_generate(inputs, "-o", out, "--checkpoint", untrained_checkpoint, "--steps", "5", check=True)
    return inputs, out, proc


@pytest.mark.parametrize("name,duration", [("bunny", 5.28), ("twenty", 20.0)])
def test_outputs_have_both_streams_and_the_original_video(generated, name, duration):
    inputs, out, _ = generated
    muxed = out / f"{name}.mp4"
    kinds = streams(muxed)
    assert [k[0] for k in kinds] == ["video", "audio"]
    (_, video_codec, video_seconds), (_, audio_codec, audio_seconds) = kinds
    assert video_codec == "h264" and audio_codec == "aac"
    assert abs(video_seconds - duration) < 0.05
    assert abs(audio_seconds - video_seconds) < 0.07  # within one AAC frame at 16 kHz
    assert video_packets(muxed) == video_packets(inputs / f"{name}.mp4")  # copied, not re-encoded
    wave, rate = sf.read(out / f"{name}.wav")
    assert rate == 16000 and len(wave) == round(duration * 16000)
    assert np.abs(wave).max() > 0.01


def test_same_seed_same_audio(generated, untrained_checkpoint, tmp_path):
    inputs, out, _ = generated
    again = tmp_path / "again"
    run_generate(inputs / "bunny.mp4", "-o", again, "--checkpoint", untrained_checkpoint, "--steps", "5",
                 "--no-mux", check=True)
    assert sf.read(again / "bunny.wav")[0].tolist() == sf.read(out / "bunny.wav")[0].tolist()
    other = tmp_path / "other"
    run_generate(inputs / "bunny.mp4", "-o", other, "--checkpoint", untrained_checkpoint, "--steps", "5",
                 "--seed", "1", "--no-mux", check=True)
    assert not np.allclose(sf.read(other / "bunny.wav")[0], sf.read(out / "bunny.wav")[0])
    assert not (again / "bunny.mp4").exists()


def test_bad_inputs_fail_alone(tmp_path, bigbuckbunny, untrained_checkpoint):
    batch = tmp_path / "batch"
    batch.mkdir()
    make_video(batch / "good.mp4", seconds=3.0)
    (batch / "empty.mp4").write_bytes(b"")
    (batch / "text.mp4").write_text("definitely not a video\n" * 10)
    (batch / "truncated.mp4").write_bytes(bigbuckbunny.read_bytes()[:300_000])
    make_audio_only(batch / "audio_only.mp4")
    out = tmp_path / "out"
    proc = run_generate(batch, "-o", out, "--checkpoint", untrained_checkpoint, "--steps", "3")
    assert proc.returncode == 1
    for name, reason in [("empty.mp4", "file is empty"), ("text.mp4", "cannot be opened"),
                         ("truncated.mp4", "cannot be opened"), ("audio_only.mp4", "has no video stream")]:
        assert f"error: {batch / name}: {reason}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.mp4", "good.wav"]
    assert "1 of 5 videos done" in proc.stderr


def test_max_seconds_refuses_a_longer_video_before_generating(tmp_path, untrained_checkpoint):
    batch = tmp_path / "batch"
    batch.mkdir()
    make_video(batch / "short.mp4", seconds=2.0)
    make_video(batch / "long.mp4", seconds=6.0)
    out = tmp_path / "out"
    proc = run_generate(batch, "-o", out, "--checkpoint", untrained_checkpoint, "--steps", "2", "--max-seconds", "4")
    assert proc.returncode == 1
    assert f"error: {batch / 'long.mp4'}: video runs to 6 s, past the limit of 4 s" in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["short.mp4", "short.wav"]
    for bad in ("0", "-3", "nan", "ten"):
        proc = run_generate(batch, "-o", out, "--checkpoint", untrained_checkpoint, "--max-seconds", bad)
        assert proc.returncode == 2 and "is not a positive number of seconds" in proc.stderr, proc.stderr
    # without the flag, params.yaml's `generate` section sets the limits
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"] = {"max_seconds": 4.0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (batch / "short.mp4").unlink()
    proc = run_generate(batch, "-o", tmp_path / "out2", "--checkpoint", untrained_checkpoint,
                        "--params", tmp_path / "params.yaml")
    assert proc.returncode == 1 and "past the limit of 4 s" in proc.stderr, proc.stderr
    params["generate"] = {"max_seconds": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_generate(batch, "-o", tmp_path / "out3", "--checkpoint", untrained_checkpoint,
                        "--params", tmp_path / "params.yaml")
    assert proc.returncode == 2 and "max_seconds 0: must be a number of at least" in proc.stderr, proc.stderr


def test_inputs_with_the_same_name_get_their_own_outputs(tmp_path):
    """a/clip.mp4, b/clip.mp4 and c/clip.mkv in one batch (concurrently, as a server runs them): three WAVs,
    three videos, each with its own input's sound."""
    from mdsgen.media.files import Soundtrack, write_soundtracks

    inputs = []
    for i, (folder, suffix) in enumerate((("a", "mp4"), ("b", "mp4"), ("c", "mkv"))):
        (tmp_path / folder).mkdir()
        inputs.append(make_video(tmp_path / folder / f"clip.{suffix}", seconds=1.0, audio=False))
    tones = {path: np.full(16000, 0.1 * (i + 1), dtype=np.float32) for i, path in enumerate(inputs)}
    results = write_soundtracks(inputs, tmp_path / "out", lambda p: Soundtrack(tones[p], 16000, 1), workers=3)
    assert not any(r.error for r in results)
    assert [r.wav.name for r in results] == ["clip.wav", "clip-2.wav", "clip-3.wav"]
    assert len({r.video for r in results}) == 3 and all(r.video.is_file() for r in results)
    for r in results:
        wave, _ = sf.read(r.wav, dtype="float32")
        assert np.allclose(wave, tones[r.input], atol=1e-3)


def test_a_picture_gets_a_soundtrack_and_a_video_of_the_still(tmp_path, untrained_checkpoint):
    from PIL import Image

    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(tmp_path / "poster.jpg")
    run_generate(tmp_path / "poster.jpg", "-o", tmp_path / "out", "--checkpoint", untrained_checkpoint,
                 "--steps", "2", "--duration", "3", check=True)
    wave, rate = sf.read(tmp_path / "out" / "poster.wav")
    assert len(wave) == round(3 * rate)
    kinds = {kind: (codec, seconds) for kind, codec, seconds in streams(tmp_path / "out" / "poster.mp4")}
    assert kinds["video"][0] == "h264" and kinds["audio"][0] == "aac"
    assert kinds["audio"][1] == pytest.approx(3.0, abs=0.1)


def test_csv_input(tmp_path, untrained_checkpoint):
    make_video(tmp_path / "a.mp4", seconds=2.0)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], ["a.mp4", "dog"]])
    run_generate(tmp_path / "list.csv", "-o", tmp_path / "out", "--checkpoint", untrained_checkpoint,
                 "--steps", "3", check=True)
    assert (tmp_path / "out" / "a.wav").is_file() and (tmp_path / "out" / "a.mp4").is_file()


def test_dataset_metadata_as_input(tmp_path):
    from mdsgen.media.files import list_inputs

    (tmp_path / "metadata.csv").write_text("clip_id,start_seconds,label,split\na,0,dog,train\nb,0,cow,test\n")
    assert list_inputs(tmp_path / "metadata.csv") == [tmp_path / "clips/a.mp4", tmp_path / "clips/b.mp4"]
    assert list_inputs(tmp_path / "metadata.csv", split="test") == [tmp_path / "clips/b.mp4"]


def test_bad_checkpoints_are_refused(tmp_path, untrained_checkpoint, bigbuckbunny):
    proc = run_generate(bigbuckbunny, "-o", tmp_path / "o", "--checkpoint", tmp_path / "absent")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(untrained_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    proc = run_generate(bigbuckbunny, "-o", tmp_path / "o", "--checkpoint", broken)
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # generates a 20 s video twice
def test_windows_do_not_depend_on_batching(video_20s, untrained_checkpoint):
    from mdsgen.inference.generate import VideoToAudio
    from mdsgen.model.diffusion import SamplingConfig

    one = VideoToAudio(str(untrained_checkpoint), batch_size=1)
    many = VideoToAudio(one.ckpt, batch_size=8)
    windows = one.read(video_20s)
    features = one.features(windows)
    sampling = SamplingConfig(steps=3)
    a, b = one.latents(features, sampling, seed=5), many.latents(features, sampling, seed=5)
    assert a.shape == (3, 4, 16, 64) and np.allclose(a, b, atol=1e-3)


def test_the_core_shapes_the_texture_with_the_checkpoint_texture_only_when_asked(untrained_checkpoint):
    from dataclasses import replace

    import torch

    from mdsgen.inference.generate import FeaturesToAudio
    from mdsgen.model.diffusion import SamplingConfig

    core = FeaturesToAudio(str(untrained_checkpoint))
    features = torch.randn(1, 32, core.ckpt.model.config.feature_dim, generator=torch.Generator().manual_seed(0))
    textured, smooth = SamplingConfig(steps=2, texture_noise=0.3), SamplingConfig(steps=2)
    flat = core.latents(features, textured, seed=1)
    assert not torch.allclose(flat, core.latents(features, smooth, seed=1), atol=1e-2)
    core.ckpt = replace(core.ckpt, texture=torch.zeros(core.ckpt.model.config.in_channels,
                                                       core.ckpt.model.config.input_size[0], 1))
    assert torch.equal(core.latents(features, textured, seed=1), flat)  # flat: the fitted shape is not used
    fitted = replace(textured, texture_shape="fitted")
    assert torch.allclose(core.latents(features, fitted, seed=1), core.latents(features, smooth, seed=1), atol=1e-4)


def test_a_video_a_moment_longer_than_one_window_costs_one_window(tmp_path, untrained_checkpoint):
    from mdsgen.inference.generate import VideoToAudio
    from mdsgen.media.video import SILENT_TAIL_SECONDS
    from mdsgen.model.diffusion import SamplingConfig

    v2a = VideoToAudio(str(untrained_checkpoint))
    window = v2a.ckpt.audio.clip_seconds
    rate = v2a.ckpt.audio.sample_rate
    just_over = make_video(tmp_path / "over.mp4", seconds=window + SILENT_TAIL_SECONDS / 2, fps=50, audio=False)
    well_over = make_video(tmp_path / "well.mp4", seconds=window + 0.25, fps=50, audio=False)
    windows = v2a.read(just_over)
    assert windows.count == 1 and windows.duration > window
    assert v2a.read(well_over).count == 2
    waves = v2a.waves(v2a.latents(v2a.features(windows), SamplingConfig(steps=2), seed=0))
    wave = v2a.join(waves, windows.duration)
    covered = v2a.ckpt.audio.clip_samples
    assert len(wave) == round(windows.duration * rate) > covered
    assert not wave[covered:].any()                                 # the tail is silence
    assert np.abs(wave[covered - 10:covered]).max() < np.abs(wave[:covered]).max() * 0.5  # faded into it
