"""Video in, soundtrack out: decode -> frame features -> MDSGen sampling -> VAE -> vocoder ->
windows joined with an equal-power crossfade -> WAV and the video muxed with it."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from mdsgen.media.audio import vocode
from mdsgen.media.files import Result, Soundtrack, list_inputs, write_soundtracks
from mdsgen.media.video import ReadLimits, VideoWindows, frames_to_tensor, read_video_windows
from mdsgen.model.checkpoint import Checkpoint, load_checkpoint
from mdsgen.model.diffusion import SamplingConfig, sample
from mdsgen.model.encoders import build_frame_encoder

FRAME_CHUNK = 64  # frames converted and encoded at a time


class FeaturesToAudio:
    """The inference core that every path shares (generate, the Triton model, evaluation, training samples,
    ablations, the monitoring reference): frame features -> seeded noise -> sampled latents -> VAE -> vocoder."""

    def __init__(self, checkpoint: Checkpoint | str, device: str = "cpu", batch_size: int = 8):
        self.ckpt = load_checkpoint(checkpoint, device) if isinstance(checkpoint, str) else checkpoint
        self.device = device
        self.batch_size = batch_size

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

        return torch.cat([sample(self.ckpt.model, f.to(self.device), sampling, noise=n,
                                on_step=progress(b), texture=self.ckpt.texture)
                          for b, (f, n) in enumerate(batches)])

    def latents(self, features: torch.Tensor, sampling: SamplingConfig, seed: int) -> torch.Tensor:
        return self.denoise(features, self.noise(len(features), seed), sampling)

    @torch.inference_mode()
    def mels(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's mels of `latents`, `batch_size` at a time (float32, on the CPU)."""
        return torch.cat([self.ckpt.vae.decode(z.to(self.device)).float().cpu() for z in latents.split(self.batch_size)])

    @torch.inference_mode()
    def waves(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode and vocode `batch_size` windows at a time: a long video's memory stays bounded."""
        return torch.cat([vocode(self.ckpt.vae.decode(z.to(self.device)).float(), self.ckpt.audio, self.ckpt.vocoder).cpu()
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
        up to `video.SILENT_TAIL_SECONDS` longer than its windows ends with a 10 ms fade-out and silence."""
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

class VideoToAudio(FeaturesToAudio):
    """A loaded generator. Build once, call `soundtrack` per video."""

    def __init__(self, checkpoint: Checkpoint | str, device: str = "cpu", batch_size: int = 8,
                 still_seconds: float | None = None, limits: ReadLimits = ReadLimits()):
        super().__init__(checkpoint, device, batch_size)
        self.still_seconds = still_seconds  # how long a still image's sound lasts (None: one window)
        self.limits = limits  # what one input may cost to read (length, frame size)
        self.encoder = build_frame_encoder(self.ckpt.frame_encoder).to(device)
        if self.encoder.feature_dim != self.ckpt.model.config.feature_dim:
            raise ValueError(f"frame encoder {self.encoder.name} gives {self.encoder.feature_dim}-d features, "
                             f"the denoiser expects {self.ckpt.model.config.feature_dim}")

    def read(self, path, limits: ReadLimits | None = None, still_seconds: float | None = None) -> VideoWindows:
        """The video's windows; `limits` and a still image's `still_seconds` default to the generator's."""
        return read_video_windows(path, self.ckpt.video, self.ckpt.audio.clip_seconds, limits or self.limits,
                                  self.still_seconds if still_seconds is None else still_seconds)

    @torch.inference_mode()
    def features(self, windows: VideoWindows) -> torch.Tensor:
        """Frame features [windows, 32, F]: each 4 fps frame is encoded once, however many windows share it."""
        chunks = [self.encoder(frames_to_tensor(part).to(self.device)[None])[0]  # bounded memory for long videos
                  for part in np.array_split(windows.grid, max(1, len(windows.grid) // FRAME_CHUNK))]
        feats = torch.cat(chunks)
        return torch.stack([feats[s] for s in windows.slices()])

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


def generate_files(source, outdir, checkpoint: str, sampling: SamplingConfig | None = None,
                   seed: int = 0, device: str = "cpu", batch_size: int = 8, mux: bool = True,
                   split: str | None = None, limit: int | None = None,
                   still_seconds: float | None = None, limits: ReadLimits = ReadLimits()) -> list[Result]:
    """Generate in this process for every input; a bad input is reported and skipped, the rest still run."""
    inputs = list_inputs(source, split)[:limit]
    generator = VideoToAudio(checkpoint, device=device, batch_size=batch_size, still_seconds=still_seconds,
                             limits=limits)
    sampling = sampling or generator.ckpt.sampling
    return write_soundtracks(inputs, outdir, lambda path: generator.soundtrack(path, sampling, seed), mux)


def with_overrides(sampling: SamplingConfig, **values) -> SamplingConfig:
    return replace(sampling, **{k: v for k, v in values.items() if v is not None})
