"""The HiFi-GAN vocoder: its CPU layout, and the train_vocoder stage (fine-tuned on the training audio, carried
inside the checkpoint)."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from mdsgen.media.audio import AudioConfig, fit_length, load_audio, vocode
from mdsgen.training.vocoder_train import (VocoderTrainConfig, fine_tune_vocoder, held_out_mel_l1, sound_segments,
                                           train_vocoder)

HIFIGAN = AudioConfig(sample_rate=22050, clip_samples=180224, n_mels=80, fmin=0.0, fmax=8000.0, mel_scale="log",
                      vocoder="hifigan")


def test_sound_segments_are_the_windows_with_sound():
    tone = 0.1 * np.sin(np.arange(8192) * 0.3).astype(np.float32)  # RMS 0.071
    wave = np.concatenate([np.zeros(8192, np.float32), tone, np.zeros(8192, np.float32)])
    segments = sound_segments([wave], 4096, min_rms=0.05, hop=2048)
    assert segments.shape == (3, 4096)  # the windows starting at 8192, 10240 and 12288: inside the tone
    assert torch.equal(segments[0], torch.from_numpy(tone[:4096]))
    with pytest.raises(ValueError, match="louder than RMS 0.5"):
        sound_segments([wave], 4096, min_rms=0.5)


def test_the_channels_last_copy_renders_what_the_wheels_network_renders(badger):
    from mdsgen.media.audio import log_mel, wave_to_mel
    from mdsgen.media.vocoder import hifigan, load_generator

    wave = torch.from_numpy(load_audio(badger[1], HIFIGAN.sample_rate)[:2 * 64 * 256]).view(2, -1)
    mel = wave_to_mel(wave, HIFIGAN)  # two 64-frame pieces of a real recording
    stock = load_generator("cpu")
    louder = copy.deepcopy(stock)
    louder.conv_post.bias.data += 0.05  # a different generator, as a fine-tuned one is
    for generator, passed in ((stock, None), (louder, louder)):
        with torch.inference_mode():
            expected = generator(log_mel(mel)).squeeze(1)[..., :mel.shape[-1] * 256]
        rendered = hifigan(mel, HIFIGAN, passed)
        assert rendered.shape == expected.shape and expected.abs().max() > 0.05
        torch.testing.assert_close(rendered, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hifigan(mel, HIFIGAN, louder), hifigan(mel, HIFIGAN), atol=1e-3)


def test_a_fine_tuned_vocoder_fits_its_sound_and_travels_in_the_checkpoint(badger, tmp_path):
    from mdsgen.config import Params
    from mdsgen.media.vocoder import load_generator
    from mdsgen.model.checkpoint import CheckpointError, init_checkpoint, load_checkpoint, save_checkpoint

    wave = load_audio(badger[1], HIFIGAN.sample_rate)
    stock = load_generator("cpu")
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    # no warm-up and a lower rate than the stage's: six steps that improve (measured 0.333 -> 0.312)
    cfg = VocoderTrainConfig(steps=6, batch_size=4, segment_samples=4096, lr=1e-5, warmup_steps=0)
    generator, metrics = fine_tune_vocoder([wave], cfg, HIFIGAN)
    segments = sound_segments([wave], cfg.segment_samples, cfg.min_rms)
    assert metrics["steps"] == 6 and metrics["segments"] == len(segments)
    segments = segments[::4]  # 37 of the 147 it trained on
    stock_l1, tuned_l1 = (held_out_mel_l1(g, segments, HIFIGAN) for g in (stock, generator))
    assert tuned_l1 < 0.98 * stock_l1, (tuned_l1, stock_l1)
    assert all(torch.equal(v, before[k]) for k, v in stock.state_dict().items())  # the shared stock copy is untouched

    ckpt = replace(init_checkpoint(replace(Params(), audio=HIFIGAN)), vocoder=generator)
    save_checkpoint(ckpt, str(tmp_path / "ckpt"))
    loaded = load_checkpoint(str(tmp_path / "ckpt"))
    mel = torch.rand(1, 80, 16)
    assert torch.equal(vocode(mel, HIFIGAN, loaded.vocoder), vocode(mel, HIFIGAN, generator))
    assert not torch.allclose(vocode(mel, HIFIGAN, loaded.vocoder), vocode(mel, HIFIGAN))
    # without the file, the stock weights
    save_checkpoint(replace(ckpt, vocoder=None), str(tmp_path / "stock"))
    assert load_checkpoint(str(tmp_path / "stock")).vocoder is None

    (tmp_path / "ckpt" / "vocoder.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="vocoder.safetensors is not a HiFi-GAN generator's weights"):
        load_checkpoint(str(tmp_path / "ckpt"))


def test_a_fine_tuned_vocoder_beside_griffin_lim_is_refused(tmp_path):
    from mdsgen.config import Params
    from mdsgen.media.vocoder import load_generator
    from mdsgen.model.checkpoint import CheckpointError, init_checkpoint, load_checkpoint, save_checkpoint

    save_checkpoint(replace(init_checkpoint(Params()), vocoder=load_generator("cpu")), str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="fine-tuned HiFi-GAN .* its audio.vocoder is 'griffin-lim'"):
        load_checkpoint(str(tmp_path / "ckpt"))
    (tmp_path / "vocoder").mkdir()
    (tmp_path / "vocoder" / "vocoder.safetensors").write_bytes(b"an earlier run's weights")
    with pytest.raises(ValueError, match="only HiFi-GAN is fine-tuned, audio.vocoder is 'griffin-lim'"):
        train_vocoder(tmp_path / "no-dataset", tmp_path / "vocoder", VocoderTrainConfig(steps=5), AudioConfig())
    assert (tmp_path / "vocoder" / "vocoder.safetensors").read_bytes() == b"an earlier run's weights"  # kept


def test_zero_steps_keep_the_stock_vocoder(tmp_path):
    from mdsgen.media.vocoder import load_vocoder_dir

    (tmp_path / "vocoder").mkdir()
    (tmp_path / "vocoder" / "vocoder.safetensors").write_bytes(b"left from an earlier run")
    metrics = train_vocoder(tmp_path / "no-dataset", tmp_path / "vocoder", VocoderTrainConfig(steps=0), HIFIGAN)
    assert metrics == {"steps": 0, "fine_tuned": False}
    assert load_vocoder_dir(tmp_path / "vocoder") is None  # the old weights do not stay behind


def test_the_stage_scores_held_out_audio(tmp_path, badger):
    """The stage end to end on a two-clip dataset folder: weights written, stock and fine-tuned both scored."""
    from mdsgen.data.dataset import write_clip, write_metadata
    from mdsgen.media.vocoder import load_vocoder_dir

    wave = fit_length(load_audio(badger[1], 16000), 32768)
    (tmp_path / "data" / "clips").mkdir(parents=True)
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    for clip_id in ("a", "b"):
        write_clip(tmp_path / "data" / "clips" / f"{clip_id}.mp4", frames, wave, fps=4, sample_rate=16000)
    write_metadata(tmp_path / "data", [{"clip_id": "a", "start_seconds": 0, "label": "badger", "split": "train"},
                                       {"clip_id": "b", "start_seconds": 0, "label": "badger", "split": "val"}])
    cfg = VocoderTrainConfig(steps=2, batch_size=2, segment_samples=4096)
    metrics = train_vocoder(tmp_path / "data", tmp_path / "vocoder", cfg, HIFIGAN)
    assert metrics["fine_tuned"] and metrics["val_segments"] > 0
    assert 0 < metrics["val_mel_l1"] < 1 and 0 < metrics["val_mel_l1_stock"] < 1
    assert metrics["val_mel_l1"] != metrics["val_mel_l1_stock"]
    assert load_vocoder_dir(tmp_path / "vocoder") is not None
