"""Video in, soundtrack out: decode -> frame features -> MDSGen sampling -> VAE -> vocoder ->
windows joined with an equal-power crossfade -> WAV and the video muxed with it."""
from __future__ import annotations

import csv
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from . import storage
from .audio import vocode
from .checkpoint import Checkpoint, load_checkpoint
from .diffusion import SamplingConfig, sample
from .encoders import build_frame_encoder
from .errors import MediaError
from .video import SILENT_TAIL_SECONDS, ReadLimits, VideoWindows, frames_to_tensor, mux_audio, read_video_windows

FRAME_CHUNK = 64  # frames converted and encoded at a time
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".wmv", ".3gp",
                  ".png", ".jpg", ".jpeg", ".webp", ".bmp"}  # a picture is a still scene


@dataclass
class Soundtrack:
    wave: np.ndarray      # float32 mono, as long as the video
    sample_rate: int
    windows: int
    timings: dict = field(default_factory=dict)  # seconds per stage
    model_version: str = ""                       # the served version, for soundtracks from a server


class VideoToAudio:
    """A loaded generator. Build once, call `soundtrack` per video."""

    def __init__(self, checkpoint: Checkpoint | str, device: str = "cpu", batch_size: int = 8,
                 still_seconds: float | None = None):
        self.ckpt = load_checkpoint(checkpoint, device) if isinstance(checkpoint, str) else checkpoint
        self.device = device
        self.batch_size = batch_size
        self.still_seconds = still_seconds  # how long a still image's sound lasts (None: one window)
        self.encoder = build_frame_encoder(self.ckpt.frame_encoder).to(device)
        if self.encoder.feature_dim != self.ckpt.model.config.feature_dim:
            raise ValueError(f"frame encoder {self.encoder.name} gives {self.encoder.feature_dim}-d features, "
                             f"the denoiser expects {self.ckpt.model.config.feature_dim}")

    def read(self, path, limits: ReadLimits = ReadLimits(), still_seconds: float | None = None) -> VideoWindows:
        """The video's windows; a still image lasts `still_seconds` (default: the generator's setting)."""
        return read_video_windows(path, self.ckpt.video, self.ckpt.audio.clip_seconds, limits,
                                  self.still_seconds if still_seconds is None else still_seconds)

    @torch.inference_mode()
    def features(self, windows: VideoWindows) -> torch.Tensor:
        """Frame features [windows, 32, F]: each 4 fps frame is encoded once, however many windows share it."""
        chunks = [self.encoder(frames_to_tensor(part).to(self.device)[None])[0]  # bounded memory for long videos
                  for part in np.array_split(windows.grid, max(1, len(windows.grid) // FRAME_CHUNK))]
        feats = torch.cat(chunks)
        return torch.stack([feats[s] for s in windows.slices()])

    def noise(self, windows: int, seed: int) -> torch.Tensor:
        """The initial noise of a video's windows: it depends only on the seed and window index, so a
        video sounds the same however its windows are batched (here, or with other requests on a server)."""
        c = self.ckpt.model.config
        return torch.randn((windows, c.in_channels, *c.input_size), generator=torch.Generator().manual_seed(seed))

    @torch.inference_mode()
    def denoise(self, features: torch.Tensor, noise: torch.Tensor, sampling: SamplingConfig,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Sample latents for any number of windows, `batch_size` at a time; `on_step(done, total)` counts
        solver steps over all batches."""
        batches = list(zip(features.split(self.batch_size), noise.split(self.batch_size)))

        def progress(batch: int):
            return None if on_step is None else lambda done, steps: on_step(batch * steps + done, steps * len(batches))

        return torch.cat([sample(self.ckpt.model, f, sampling, noise=n, on_step=progress(b))
                          for b, (f, n) in enumerate(batches)])

    def latents(self, features: torch.Tensor, sampling: SamplingConfig, seed: int) -> torch.Tensor:
        return self.denoise(features, self.noise(len(features), seed), sampling)

    @torch.inference_mode()
    def waves(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode and vocode `batch_size` windows at a time: a long video's memory stays bounded."""
        return torch.cat([vocode(self.ckpt.vae.decode(z).float(), self.ckpt.audio).cpu()
                          for z in latents.split(self.batch_size)])

    def batch(self, features: list[torch.Tensor], durations: list[float], seeds: list[int], sampling: SamplingConfig,
              on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Soundtracks of several videos (or of one video with several seeds) whose windows are denoised and
        decoded together: features[i] [windows, 32, F] -> a wave `durations[i]` seconds long."""
        noise = torch.cat([self.noise(len(f), seed) for f, seed in zip(features, seeds)])
        waves = self.waves(self.denoise(torch.cat(features), noise, sampling, on_step))
        return [self.join(part, duration) for part, duration in zip(waves.split([len(f) for f in features]), durations)]

    def join(self, waves: torch.Tensor, duration: float) -> np.ndarray:
        """Overlap-add consecutive windows with an equal-power crossfade, cut to the video's length; a video
        up to `SILENT_TAIL_SECONDS` longer than its windows ends with a 10 ms fade-out and silence."""
        a, v = self.ckpt.audio, self.ckpt.video
        hop = round(v.hop_seconds * a.sample_rate)
        overlap = a.clip_samples - hop
        out = np.zeros(hop * (len(waves) - 1) + a.clip_samples, dtype=np.float32)
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap).astype(np.float32)
        for i, wave in enumerate(waves.numpy()):
            wave = wave.copy()
            if i > 0:
                wave[:overlap] *= ramp
            if i < len(waves) - 1:
                wave[-overlap:] *= ramp[::-1]
            out[i * hop:i * hop + a.clip_samples] += wave
        length = round(duration * a.sample_rate)
        if len(out) < length:
            fade = min(len(out), round(0.01 * a.sample_rate))
            out[len(out) - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
            out = np.pad(out, (0, length - len(out)))
        return out[:length]

    def soundtrack(self, path, sampling: SamplingConfig | None = None, seed: int = 0) -> Soundtrack:
        sampling = sampling or self.ckpt.sampling
        timings, clock = {}, time.perf_counter()

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        windows = self.read(path); lap("decode")
        feats = self.features(windows); lap("frame_features")
        latents = self.latents(feats, sampling, seed); lap("denoise")
        waves = self.waves(latents); lap("vae_and_vocoder")
        wave = self.join(waves, windows.duration)
        return Soundtrack(wave, self.ckpt.audio.sample_rate, windows.count, timings)


def write_wav(path, wave: np.ndarray, sample_rate: int) -> None:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wave, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    storage.write_bytes(path, buffer.getvalue())


def list_inputs(source, split: str | None = None) -> list[Path]:
    """A video file, a folder of videos, or a CSV listing them: a `path`/`video`/`file` column (else the
    first) relative to the CSV, or a dataset's metadata.csv (`clip_id` -> clips/<clip_id>.mp4).
    `split` keeps the CSV rows of that split."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        for other in sorted(set(source.iterdir()) - set(files)):
            print(f"skipped: {other} ({'a folder' if other.is_dir() else 'not a video or picture file name'})",
                  file=sys.stderr)
        if not files:
            raise FileNotFoundError(f"{source}: no video files in this folder")
        return files
    if source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise ValueError(f"{source}: empty CSV")
        header = [h.strip().lower() for h in rows[0]]
        named = next((c for c in ("path", "video", "file", "clip_id") if c in header), None)
        body = rows[1:] if named else rows
        column = header.index(named) if named else 0
        if split is not None:
            if "split" not in header:
                raise ValueError(f"{source}: no split column to select {split!r} from")
            body = [r for r in body if r[header.index("split")].strip() == split]
        values = [r[column].strip() for r in body if len(r) > column and r[column].strip()]
        if named == "clip_id":
            return [source.parent / "clips" / f"{v}.mp4" for v in values]
        return [source.parent / v for v in values]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    return [source]


@dataclass
class Result:
    input: Path
    wav: Path | None = None
    video: Path | None = None
    error: str | None = None
    seconds: float = 0.0


def generate_files(source, outdir, checkpoint: str, sampling: SamplingConfig | None = None,
                   seed: int = 0, device: str = "cpu", batch_size: int = 8, mux: bool = True,
                   split: str | None = None, limit: int | None = None,
                   still_seconds: float | None = None) -> list[Result]:
    """Generate in this process for every input; a bad input is reported and skipped, the rest still run."""
    inputs = list_inputs(source, split)[:limit]
    generator = VideoToAudio(checkpoint, device=device, batch_size=batch_size, still_seconds=still_seconds)
    sampling = sampling or generator.ckpt.sampling
    return write_soundtracks(inputs, outdir, lambda path: generator.soundtrack(path, sampling, seed), mux)


def output_stems(inputs: list[Path]) -> list[str]:
    """One output name per input: `<stem>`, and `<stem>-2`, `<stem>-3`... for later inputs whose name is taken
    (a/clip.mp4 and b/clip.mp4 in one batch must not overwrite each other or share a temporary file)."""
    taken, stems = set(), []
    for path in inputs:
        stem, n = path.stem, 1
        while stem in taken:
            n += 1
            stem = f"{path.stem}-{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def write_soundtracks(inputs: list[Path], outdir, make: Callable[[Path], Soundtrack], mux: bool = True,
                      workers: int = 1) -> list[Result]:
    """`make` a soundtrack for every input and write `<stem>.wav` (and the muxed video) into `outdir`.
    A failing input is reported and skipped; `workers` > 1 runs inputs concurrently (for a server)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    def one(path: Path, stem: str) -> Result:
        result, start = Result(path), time.perf_counter()
        try:
            track = make(path)
            result.wav = outdir / f"{stem}.wav"
            write_wav(result.wav, track.wave, track.sample_rate)
            if mux:
                result.video = mux_audio(path, track.wave, track.sample_rate, outdir / stem)
        except MediaError as err:
            result.error = str(err)
        except Exception as err:  # one broken file must not stop a batch; say what broke
            result.error = f"{path}: {type(err).__name__}: {err}"
        result.seconds = time.perf_counter() - start
        if result.error:
            print(f"error: {result.error}", file=sys.stderr)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(one, inputs, output_stems(inputs)), total=len(inputs), desc="generate", unit="video",
                         disable=len(inputs) < 2))


def with_overrides(sampling: SamplingConfig, **values) -> SamplingConfig:
    return replace(sampling, **{k: v for k, v in values.items() if v is not None})
