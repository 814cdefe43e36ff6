"""Audio front-end: waveform <-> mel in [0, 1] (what the VAE sees), in one of two formats.

- `paper` (the paper's path): 16 kHz, n_fft 1024, hop 256, Hann, centered; Slaney mel filters 125-7600 Hz
  (librosa), 128 bins; scaling clip((20 log10(max(M, 1e-5)) - 20 + 100) / 100, 0, 1). The way back is the
  pseudo-inverse of the filters and Griffin-Lim with momentum (Diff-Foley: 32 iterations, momentum 0.99),
  batched in torch (see `griffin_lim`; a librosa path is kept for the speed comparison).
- `log` (HiFi-GAN's format, the demo default): 22,050 Hz, n_fft 1024, hop 256, 80 bins 0-8000 Hz, natural
  log of the magnitude clamped at 1e-5, framed as the HiFi-GAN repository does (reflect padding of
  (n_fft - hop) / 2, uncentred); mapped linearly from [ln 1e-5, LOG_MEL_MAX] to [0, 1]. The way back is the
  universal HiFi-GAN (mdsgen/media/vocoder.py), or Griffin-Lim.

`vocode` is the one way from mels to waves: every caller (generation, evaluation, training samples,
the VAE report) goes through it, so what is scored is what ships.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import av
import librosa
import numpy as np
import torch

from mdsgen.base.errors import MediaError, describe
from mdsgen.base.precision import PRECISIONS
from mdsgen.media.video import open_media

MEL_SCALES = ("paper", "log")
VOCODERS = ("griffin-lim", "hifigan")
MEL_FIELDS = ("sample_rate", "clip_samples", "n_fft", "hop_length", "n_mels", "fmin", "fmax", "mel_scale")
LOG_MEL_MIN = float(np.log(1e-5))   # HiFi-GAN's clamp
LOG_MEL_MAX = 2.5                   # headroom above the loudest bin of the demo clips (measured 1.84); clipped


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    clip_samples: int = 131072  # 8.192 s
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 128
    fmin: float = 125.0
    fmax: float = 7600.0
    griffin_lim_iters: int = 32
    griffin_lim_momentum: float = 0.99
    mel_scale: str = "paper"        # "paper" (dB to [0, 1]) or "log" (HiFi-GAN's natural log, to [0, 1])
    vocoder: str = "griffin-lim"    # or "hifigan": the universal HiFi-GAN, which needs its own mel format
    vocoder_precision: str = "fp32"  # HiFi-GAN under bf16 autocast: 1.7x on CPUs with AVX-512-BF16, same scores ("auto": there)
    lowpass_hz: float = 0.0         # the vocoder's output above this is removed (0: kept); see `lowpass`

    def __post_init__(self):
        if self.mel_scale not in MEL_SCALES:
            raise ValueError(f"audio.mel_scale {self.mel_scale!r}: use one of {', '.join(MEL_SCALES)}")
        if self.vocoder not in VOCODERS:
            raise ValueError(f"audio.vocoder {self.vocoder!r}: use one of {', '.join(VOCODERS)}")
        if self.vocoder_precision not in PRECISIONS:
            raise ValueError(f"audio.vocoder_precision {self.vocoder_precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.lowpass_hz < 0:
            raise ValueError(f"audio.lowpass_hz {self.lowpass_hz} is negative: give a cut-off in Hz, or 0 for none")
        if self.clip_samples % self.hop_length:
            raise ValueError(f"audio.clip_samples {self.clip_samples} is not a multiple of hop {self.hop_length}")
        if self.vocoder == "hifigan":
            wanted = dict(sample_rate=22050, n_fft=1024, hop_length=256, n_mels=80, fmin=0.0, fmax=8000.0,
                          mel_scale="log")
            wrong = {k: getattr(self, k) for k, v in wanted.items() if getattr(self, k) != v}
            if wrong:
                raise ValueError(f"audio.vocoder hifigan needs its own mel format {wanted}; these differ: {wrong}")

    def mel_settings(self) -> dict:
        """The fields that shape the mel (what the features stage computes); the vocoder's are left out."""
        return {name: getattr(self, name) for name in MEL_FIELDS}

    @property
    def clip_seconds(self) -> float:
        return self.clip_samples / self.sample_rate

    @property
    def mel_frames(self) -> int:
        return self.clip_samples // self.hop_length


def recorded_rate(path) -> int:
    """The sample rate the first audio stream was recorded at (the band it can hold is half of it)."""
    with open_media(path, "audio") as container:
        return container.streams.audio[0].rate


def load_audio(path, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream of any file PyAV reads (audio or video) to mono float32."""
    with open_media(path, "audio") as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(audio=0):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
        except av.error.FFmpegError as err:
            raise MediaError(path, f"audio cannot be decoded ({describe(err)})") from err
    if not chunks:
        raise MediaError(path, "audio stream holds no samples")
    return np.concatenate(chunks).astype(np.float32)


def fit_length(wave: np.ndarray | torch.Tensor, length: int):
    """Cut or zero-pad the last axis to `length` samples."""
    n = wave.shape[-1]
    if n >= length:
        return wave[..., :length]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, length - n)]
    if isinstance(wave, torch.Tensor):
        return torch.nn.functional.pad(wave, (0, length - n))
    return np.pad(wave, pad)


@lru_cache(maxsize=4)
def _mel_basis(cfg: AudioConfig) -> tuple[torch.Tensor, torch.Tensor]:
    basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                fmin=cfg.fmin, fmax=cfg.fmax)  # Slaney scale and norm
    basis = torch.from_numpy(basis).float()
    return basis, torch.linalg.pinv(basis)


def scale_mel(magnitude: torch.Tensor, mel_scale: str = "paper") -> torch.Tensor:
    """Mel magnitude -> [0, 1] on the format's scale."""
    if mel_scale == "log":
        return ((torch.log(magnitude.clamp_min(1e-5)) - LOG_MEL_MIN) / (LOG_MEL_MAX - LOG_MEL_MIN)).clamp(0.0, 1.0)
    db = 20.0 * torch.log10(magnitude.clamp_min(1e-5))
    return ((db - 20.0 + 100.0) / 100.0).clamp(0.0, 1.0)


def unscale_mel(mel: torch.Tensor, mel_scale: str = "paper") -> torch.Tensor:
    """[0, 1] -> mel magnitude; the inverse of `scale_mel` inside its range."""
    if mel_scale == "log":
        return torch.exp(log_mel(mel))
    db = mel.clamp(0.0, 1.0) * 100.0 - 100.0 + 20.0
    return torch.pow(10.0, db / 20.0)


def log_mel(mel: torch.Tensor) -> torch.Tensor:
    """A `log`-scale mel in [0, 1] -> HiFi-GAN's input (natural log of the magnitude)."""
    return mel.clamp(0.0, 1.0) * (LOG_MEL_MAX - LOG_MEL_MIN) + LOG_MEL_MIN


def _stft(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    window = torch.hann_window(cfg.n_fft, device=wave.device)
    return torch.stft(wave, cfg.n_fft, cfg.hop_length, window=window, center=True,
                      pad_mode="constant", return_complex=True)


def _analysis_magnitude(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """|STFT| [B, bins, samples // hop] framed as the format's vocoder expects."""
    frames = wave.shape[-1] // cfg.hop_length
    if cfg.mel_scale == "paper":
        return _stft(wave, cfg).abs()[..., :frames]
    pad = (cfg.n_fft - cfg.hop_length) // 2  # HiFi-GAN's framing: frame i covers samples i*hop .. i*hop+n_fft
    padded = torch.nn.functional.pad(wave[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(padded, cfg.n_fft, cfg.hop_length, window=torch.hann_window(cfg.n_fft, device=wave.device),
                      center=False, return_complex=True)
    return (spec.real ** 2 + spec.imag ** 2 + 1e-9).sqrt()[..., :frames]


def wave_to_mel(wave: torch.Tensor | np.ndarray, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """[..., samples] waveform -> [..., n_mels, samples // hop] mel in [0, 1] (paper: 128 x 512)."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    spec = _analysis_magnitude(wave.reshape(-1, wave.shape[-1]), cfg)
    basis, _ = _mel_basis(cfg)
    mel = scale_mel(torch.matmul(basis.to(spec.device), spec), cfg.mel_scale)
    return mel.reshape(*wave.shape[:-1], cfg.n_mels, spec.shape[-1])


def mel_to_linear(mel: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Scaled mel -> non-negative linear magnitude through the filters' pseudo-inverse."""
    _, inverse = _mel_basis(cfg)
    return torch.matmul(inverse.to(mel.device), unscale_mel(mel, cfg.mel_scale)).clamp_min(0.0)


def vocode(mel: torch.Tensor | np.ndarray, cfg: AudioConfig = AudioConfig(),
           generator: torch.nn.Module | None = None) -> torch.Tensor:
    """Mel [..., n_mels, frames] in [0, 1] -> waveform [..., frames * hop] with the configured vocoder
    (HiFi-GAN: `generator`, a checkpoint's fine-tuned one, else the stock weights)."""
    if cfg.vocoder == "hifigan":
        from mdsgen.media.vocoder import hifigan

        mel = torch.as_tensor(mel, dtype=torch.float32)
        wave = hifigan(mel.reshape(-1, *mel.shape[-2:]), cfg, generator).reshape(*mel.shape[:-2], -1)
    else:
        wave = griffin_lim(mel, cfg)
    return lowpass(wave, cfg.lowpass_hz, cfg.sample_rate)


def lowpass(wave: torch.Tensor, cutoff_hz: float, sample_rate: int) -> torch.Tensor:
    """Remove every frequency above `cutoff_hz` (a brick wall over the whole clip: one FFT, exact).

    Why: the universal HiFi-GAN invents a faint hiss above its mel's top band (8 kHz), where 16 kHz
    training audio has nothing (REPORT.md 5p: energy share above 8 kHz 7.5e-4 against the data's 3.5e-5).
    0, or a cut-off at or above Nyquist, leaves the wave."""
    if not 0 < cutoff_hz < sample_rate / 2:
        return wave
    spectrum = torch.fft.rfft(wave, dim=-1)
    spectrum[..., int(cutoff_hz * wave.shape[-1] / sample_rate) + 1:] = 0
    return torch.fft.irfft(spectrum, n=wave.shape[-1], dim=-1)


def griffin_lim(mel: torch.Tensor | np.ndarray, cfg: AudioConfig = AudioConfig(),
                iters: int | None = None, seed: int = 0) -> torch.Tensor:
    """Scaled mel [..., n_mels, frames] -> waveform [..., frames * hop], batched fast Griffin-Lim."""
    mel = torch.as_tensor(mel, dtype=torch.float32)
    lead = mel.shape[:-2]
    magnitude = mel_to_linear(mel.reshape(-1, *mel.shape[-2:]), cfg)
    frames = magnitude.shape[-1]
    length = frames * cfg.hop_length
    magnitude = torch.nn.functional.pad(magnitude, (0, 1))  # the centered STFT has frames + 1 columns
    window = torch.hann_window(cfg.n_fft, device=mel.device)
    # one initial phase shared by every clip of the batch: a clip's sound must not depend on its batch position
    phase = torch.rand(magnitude.shape[-2:], generator=torch.Generator().manual_seed(seed)) * 2 * torch.pi
    angles = torch.polar(torch.ones_like(magnitude), phase.to(mel.device))
    previous = torch.zeros_like(angles)
    alpha = cfg.griffin_lim_momentum
    for _ in range(cfg.griffin_lim_iters if iters is None else iters):
        wave = torch.istft(magnitude * angles, cfg.n_fft, cfg.hop_length, window=window,
                           center=True, length=length)
        rebuilt = _stft(wave, cfg)
        angles = rebuilt - (alpha / (1 + alpha)) * previous  # Perraudin et al.'s fast Griffin-Lim
        angles = angles / angles.abs().clamp_min(1e-16)
        previous = rebuilt
    wave = torch.istft(magnitude * angles, cfg.n_fft, cfg.hop_length, window=window,
                       center=True, length=length)
    return wave.reshape(*lead, length)


def griffin_lim_librosa(mel: np.ndarray, cfg: AudioConfig = AudioConfig(), seed: int = 0) -> np.ndarray:
    """The same inversion through librosa, one clip at a time (kept to compare speed and quality)."""
    magnitude = mel_to_linear(torch.as_tensor(mel, dtype=torch.float32), cfg).numpy()
    length = magnitude.shape[-1] * cfg.hop_length
    magnitude = np.pad(magnitude, [(0, 0)] * (magnitude.ndim - 1) + [(0, 1)])
    return librosa.griffinlim(magnitude, n_iter=cfg.griffin_lim_iters, hop_length=cfg.hop_length,
                              n_fft=cfg.n_fft, momentum=cfg.griffin_lim_momentum, length=length,
                              pad_mode="constant", random_state=seed)
