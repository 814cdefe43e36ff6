"""Fine-tuning the universal HiFi-GAN on the training split's own audio (REPORT.md 5o).

The stock generator was trained on speech; the dataset's sounds are animals, instruments and engines.
It is fine-tuned on short segments that hold sound (RMS above `min_rms`): the segment's own mel in, the
segment out, with HiFi-GAN's mel L1 (natural-log magnitude, its weight 45) and a multi-resolution STFT
loss (spectral convergence + log magnitude, Yamamoto et al. 2020). The wheel ships only the generator,
so there is no discriminator: a small learning rate keeps the generator near the adversarially trained start.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mdsgen.data.dataset import read_metadata
from mdsgen.media.audio import AudioConfig, load_audio, log_mel, wave_to_mel
from mdsgen.media.vocoder import FINE_TUNED, load_generator, save_generator

STFT_SIZES = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop) of the multi-resolution loss
VAL_SEGMENTS = 64  # held-out segments the stage scores stock and fine-tuned on


@dataclass(frozen=True)
class VocoderTrainConfig:
    steps: int = 0                # 0: the stock universal HiFi-GAN, nothing trained
    batch_size: int = 8
    segment_samples: int = 8192   # 32 mel frames
    min_rms: float = 0.01         # segments quieter than this teach nothing about the sounds
    lr: float = 5e-5
    warmup_steps: int = 50        # linear: full-rate Adam steps on the start disturb it (held-out mel L1 0.33 -> 0.54)
    mel_weight: float = 45.0
    stft_weight: float = 2.5
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"vocoder_train: steps {self.steps} must be >= 0 and batch_size {self.batch_size} >= 1")


def sound_segments(waves: list[np.ndarray], length: int, min_rms: float, hop: int | None = None) -> torch.Tensor:
    """Every `length`-sample window (starting every `hop`) whose RMS is above `min_rms`: [N, length]."""
    hop = hop or length // 4
    kept = [w[s:s + length] for w in waves for s in range(0, len(w) - length + 1, hop)
            if np.sqrt(np.mean(w[s:s + length] ** 2)) > min_rms]
    if not kept:
        raise ValueError(f"no {length}-sample segment of the training audio is louder than RMS {min_rms}")
    return torch.from_numpy(np.stack(kept))


def multi_resolution_stft_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = out.new_zeros(())
    for n_fft, hop in STFT_SIZES:
        window = torch.hann_window(n_fft, device=out.device)
        mag_out, mag_target = (torch.stft(w, n_fft, hop, window=window, return_complex=True).abs().clamp_min(1e-7)
                               for w in (out, target))
        convergence = torch.linalg.norm(mag_target - mag_out) / torch.linalg.norm(mag_target)
        loss = loss + convergence + (mag_out.log() - mag_target.log()).abs().mean()
    return loss / len(STFT_SIZES)


def rebuild(generator: torch.nn.Module, waves: torch.Tensor, audio_cfg: AudioConfig):
    """`waves` [B, samples] through their mel and `generator`, and the rebuilt mel's L1 to theirs (natural log)."""
    mel = log_mel(wave_to_mel(waves, audio_cfg))
    out = generator(mel).squeeze(1)[..., :waves.shape[-1]]
    return out, (log_mel(wave_to_mel(out, audio_cfg)) - mel).abs().mean()


def fine_tune_vocoder(waves: list[np.ndarray], cfg: VocoderTrainConfig, audio_cfg: AudioConfig,
                      on_step=None) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a copy of the stock generator on `waves` (training audio at audio_cfg.sample_rate)."""
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    segments = sound_segments(waves, cfg.segment_samples, cfg.min_rms)
    generator = copy.deepcopy(load_generator("cpu")).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, betas=(0.8, 0.99), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / max(1, cfg.warmup_steps)))
    start, history = time.perf_counter(), []
    for step in range(1, cfg.steps + 1):
        target = segments[torch.randint(len(segments), (cfg.batch_size,), generator=rng)]
        out, mel_l1 = rebuild(generator, target, audio_cfg)
        loss = cfg.mel_weight * mel_l1 + cfg.stft_weight * multi_resolution_stft_loss(out, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        history.append(mel_l1.item())
        if on_step:
            on_step(step, {"loss": loss.item(), "mel_l1": mel_l1.item()})
    metrics = {"steps": cfg.steps, "segments": len(segments), "train_seconds": time.perf_counter() - start,
               "mel_l1_first": float(np.mean(history[:10])) if history else None,
               "mel_l1_last": float(np.mean(history[-10:])) if history else None, "config": asdict(cfg)}
    return generator.eval().requires_grad_(False), metrics


def split_audio(dataset_dir, split: str, audio_cfg: AudioConfig) -> list[np.ndarray]:
    clips = Path(dataset_dir) / "clips"
    return [load_audio(clips / f"{row['clip_id']}.mp4", audio_cfg.sample_rate)
            for row in read_metadata(dataset_dir) if row["split"] == split]


@torch.no_grad()
def held_out_mel_l1(generator: torch.nn.Module, segments: torch.Tensor, audio_cfg: AudioConfig,
                    batch: int = 8) -> float:
    return float(np.mean([rebuild(generator, part, audio_cfg)[1].item() for part in segments.split(batch)]))


def train_vocoder(dataset_dir, out_dir, cfg: VocoderTrainConfig, audio_cfg: AudioConfig, on_step=None) -> dict:
    """The `train_vocoder` stage: `out_dir` gets the fine-tuned generator (nothing with `steps: 0`: the
    checkpoint then keeps the stock weights) and the metrics, held-out mel L1 of stock and fine-tuned included."""
    if cfg.steps and audio_cfg.vocoder != "hifigan":  # refused before the folder's last weights are removed
        raise ValueError(f"vocoder_train.steps {cfg.steps}: only HiFi-GAN is fine-tuned, audio.vocoder is "
                         f"{audio_cfg.vocoder!r} (set vocoder_train.steps: 0)")
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if cfg.steps == 0:
        metrics = {"steps": 0, "fine_tuned": False}
    else:
        generator, metrics = fine_tune_vocoder(split_audio(dataset_dir, "train", audio_cfg), cfg, audio_cfg, on_step)
        val = sound_segments(split_audio(dataset_dir, "val", audio_cfg), cfg.segment_samples, cfg.min_rms,
                             hop=cfg.segment_samples)[:VAL_SEGMENTS]
        metrics.update(fine_tuned=True, val_segments=len(val),
                       val_mel_l1_stock=held_out_mel_l1(load_generator("cpu"), val, audio_cfg),
                       val_mel_l1=held_out_mel_l1(generator, val, audio_cfg))
        save_generator(generator, out / FINE_TUNED)
    (out / "vocoder.json").write_text(json.dumps(metrics, indent=1))
    return metrics
