import numpy as np
import pytest
import torch

from mdsgen.audio import (AudioConfig, fit_length, griffin_lim, griffin_lim_librosa, load_audio, scale_mel,
                          unscale_mel, wave_to_mel)
from mdsgen.errors import MediaError


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
    assert torch.allclose(batch[0], griffin_lim(mel), atol=1e-4)
    assert torch.allclose(batch[1], griffin_lim(mel.flip(-1)), atol=1e-4)


def test_unreadable_audio_is_named(tmp_path):
    text = tmp_path / "notes.ogg"
    text.write_text("not audio")
    with pytest.raises(MediaError, match="notes.ogg"):
        load_audio(text)
