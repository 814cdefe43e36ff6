import dataclasses

import numpy as np
import pytest
import torch

from mdsgen.base.errors import MediaError
from mdsgen.base.precision import native_bf16, resolve
from mdsgen.media.audio import (AudioConfig, fit_length, griffin_lim, griffin_lim_librosa, load_audio, lowpass,
                                scale_mel, unscale_mel, wave_to_mel)


@pytest.fixture(scope="module")
def clip(badger):
    wave = load_audio(badger[1])
    return fit_length(np.tile(wave, 2), AudioConfig().clip_samples)


def test_load_audio_resamples_to_16k_mono(badger, bigbuckbunny):
    import soundfile as sf

    ogg = load_audio(badger[1])  # 44.1 kHz Vorbis
    assert ogg.dtype == np.float32 and ogg.ndim == 1
    assert abs(len(ogg) / 16000 - sf.info(str(badger[1])).duration) < 0.05
    from_video = load_audio(bigbuckbunny)  # 48 kHz AAC inside an mp4
    assert abs(len(from_video) / 16000 - 5.31) < 0.05 and np.abs(from_video).max() > 0.01


def test_mel_shape_and_scaling(clip):
    mel = wave_to_mel(clip)
    assert mel.shape == (128, 512) and mel.dtype == torch.float32
    assert 0 <= mel.min() and mel.max() <= 1 and mel.std() > 0.05
    # the paper's scaling and its inverse agree inside the clipping range
    magnitude = torch.logspace(-3.9, 0.9, 50)
    assert torch.allclose(unscale_mel(scale_mel(magnitude)), magnitude, rtol=1e-4)


def test_mel_matches_librosa(clip):
    import librosa

    spec = np.abs(librosa.stft(clip, n_fft=1024, hop_length=256, pad_mode="constant"))[:, :512]
    reference = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=125, fmax=7600) @ spec
    assert (scale_mel(torch.from_numpy(reference)) - wave_to_mel(clip)).abs().max() < 1e-3


def test_griffin_lim_round_trip_on_a_real_recording(clip):
    """mel -> Griffin-Lim -> mel. Bound: 0.02 mean absolute error on the [0, 1] scale, i.e. 2 dB of the
    100 dB range, and under a third of the error random phase leaves (the same magnitudes, no iterations):
    the phase the iterations find must be consistent, not just the magnitudes copied."""
    mel = wave_to_mel(clip)
    wave = griffin_lim(mel)
    assert wave.shape == (131072,)
    error = (wave_to_mel(wave) - mel).abs().mean().item()
    random_phase = (wave_to_mel(griffin_lim(mel, iters=0)) - mel).abs().mean().item()
    assert error < 0.02 and error < random_phase / 3, (error, random_phase)
    librosa_wave = griffin_lim_librosa(mel.numpy())
    assert (wave_to_mel(librosa_wave) - mel).abs().mean().item() < 0.02


def test_griffin_lim_batches(clip):
    mel = wave_to_mel(clip)
    batch = griffin_lim(torch.stack([mel, mel.flip(-1)]))
    assert batch.shape == (2, 131072)
    # every clip sounds as it does alone, whatever its position in the batch (a server batches requests)
    # relative error: float rounding differs between batch shapes and machines (measured 1e-4; 2e-4 at the
    # peak), a batch-dependent phase gave 1.4
    for batched, alone in ((batch[0], griffin_lim(mel)), (batch[1], griffin_lim(mel.flip(-1)))):
        assert ((batched - alone).norm() / alone.norm()).item() < 1e-3


def test_unreadable_audio_is_named(tmp_path):
    text = tmp_path / "notes.ogg"
    text.write_text("not audio")
    with pytest.raises(MediaError, match="notes.ogg"):
        load_audio(text)


HIFIGAN = AudioConfig(sample_rate=22050, clip_samples=180224, n_mels=80, fmin=0.0, fmax=8000.0, mel_scale="log",
                      vocoder="hifigan")


def test_hifigan_mel_format_round_trips_a_real_recording(badger):
    from mdsgen.media.audio import vocode

    wave = load_audio(badger[1], HIFIGAN.sample_rate)
    clip = fit_length(np.tile(wave, 3), HIFIGAN.clip_samples)
    mel = wave_to_mel(clip, HIFIGAN)
    assert mel.shape == (80, 704) and 0.0 <= mel.min() and mel.max() < 1.0  # inside the [0, 1] mapping
    rebuilt = vocode(mel[None], HIFIGAN)
    assert rebuilt.shape == (1, HIFIGAN.clip_samples)
    again = wave_to_mel(rebuilt[0], HIFIGAN)
    error = (again - mel).abs().mean().item()
    late = (again - mel.roll(43, dims=-1)).abs().mean().item()  # the same sound half a second late
    # measured: 0.015-0.024 (mel L1 favours Griffin-Lim, which fits the spectrum; aisfx prefers HiFi-GAN)
    assert error < 0.04 and error < 0.5 * late, (error, late)
    # under bf16 autocast the vocoder renders the same sound; on a 64-frame piece, because a CPU without
    # native bf16 emulates it at minutes per clip
    piece = mel[None, :, :64]
    fp32, bf16 = (vocode(piece, dataclasses.replace(HIFIGAN, vocoder_precision=p)) for p in ("fp32", "bf16"))
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (1, 64 * HIFIGAN.hop_length)
    drift = (wave_to_mel(bf16[0], HIFIGAN) - wave_to_mel(fp32[0], HIFIGAN)).abs().mean().item()
    assert drift < 0.25 * error, (drift, error)  # measured 0.002 against 0.024 on the whole clip
    # "auto" (the demo's setting): bf16 where this CPU runs it natively, fp32 (no emulated bf16) elsewhere
    auto = vocode(piece, dataclasses.replace(HIFIGAN, vocoder_precision="auto"))
    assert torch.equal(auto, bf16 if native_bf16("cpu") else fp32)
    # the low-pass takes the vocoder's hiss above 8 kHz and nothing below it
    cut = vocode(piece, dataclasses.replace(HIFIGAN, lowpass_hz=8000.0))
    full, band = torch.fft.rfft(fp32[0]), torch.fft.rfft(cut[0])
    above = torch.fft.rfftfreq(fp32.shape[-1], 1 / HIFIGAN.sample_rate) > 8000
    assert full[above].abs().pow(2).sum() > 1e-4 * full.abs().pow(2).sum()  # there is hiss to remove
    assert band[above].abs().max() < 1e-3 * full.abs().max()
    assert torch.allclose(band[~above], full[~above], atol=1e-3 * full.abs().max().item())


def test_lowpass_keeps_the_band_below_the_cutoff_and_nothing_above():
    rate, t = 22050, torch.arange(22050, dtype=torch.float64) / 22050  # whole cycles: no leakage
    low, high = torch.sin(2 * torch.pi * 1000 * t), 0.5 * torch.sin(2 * torch.pi * 10000 * t)
    assert torch.allclose(lowpass(low + high, 8000.0, rate), low, atol=1e-9)
    for off in (0.0, rate / 2, 48000.0):  # 0 or a cut-off at or above Nyquist: the wave as it was
        assert torch.equal(lowpass(low + high, off, rate), low + high)
    with pytest.raises(ValueError, match="lowpass_hz -1"):
        AudioConfig(lowpass_hz=-1)


def test_hifigan_needs_its_own_mel_format():
    with pytest.raises(ValueError, match="hifigan needs its own mel format"):
        AudioConfig(vocoder="hifigan")  # the paper's 16 kHz, 128-bin mel
    with pytest.raises(ValueError, match="mel_scale"):
        AudioConfig(mel_scale="decibel")
    with pytest.raises(ValueError, match="vocoder_precision 'fp16'"):
        AudioConfig(vocoder_precision="fp16")
    with pytest.raises(ValueError, match="train.precision 'fp16'"):
        resolve("cpu", "fp16", "train.precision")
