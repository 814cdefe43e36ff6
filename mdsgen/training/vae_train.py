"""Training the small mel VAE on the dataset's training mels (the embedded default has no pretrained one).

The VAE is fully convolutional, so it trains on random crops of `crop_frames` mel frames (the cost of a
full 512-frame clip is dominated by full-resolution convolutions) and is evaluated on whole clips.
Loss: L1 reconstruction + kl_weight * KL (as Stable Diffusion's VAE, without the GAN term). After
training, the latent scale is set so the training latents have unit standard deviation, as the
diffusion model expects (SD's 0.18215 was found the same way).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mdsgen.data.features import load_split
from mdsgen.media.audio import AudioConfig, vocode
from mdsgen.model.vae import MelStandardizer, MelVAE, VAESettings


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 600
    batch_size: int = 8
    crop_frames: int = 128
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0


def vae_loss(vae: MelVAE, mels: torch.Tensor, kl_weight: float, generator=None) -> dict:
    images = vae._images(mels)
    posterior = vae.vae.encode(images).latent_dist
    reconstruction = vae.vae.decode(posterior.sample(generator)).sample
    l1 = (reconstruction - images).abs().mean()
    kl = posterior.kl().mean() / images[0].numel()
    return {"loss": l1 + kl_weight * kl, "l1": l1, "kl": kl}


def random_crops(mels: torch.Tensor, batch: int, frames: int, generator) -> torch.Tensor:
    index = torch.randint(len(mels), (batch,), generator=generator)
    starts = torch.randint(mels.shape[-1] - frames + 1, (batch,), generator=generator)
    return torch.stack([mels[i, :, s:s + frames] for i, s in zip(index.tolist(), starts.tolist())])


@torch.no_grad()
def reconstruction_l1(vae: MelVAE, mels: torch.Tensor, batch_size: int = 8) -> float:
    errors = [(vae.decode(vae.encode(m)) - m).abs().mean(dim=(1, 2)) for m in mels.split(batch_size)]
    return torch.cat(errors).mean().item()


def train_vae(dataset_dir, features_dir, out_dir, report_dir, cfg: VAETrainConfig = VAETrainConfig(),
              audio_cfg: AudioConfig = AudioConfig(), vae_params: VAESettings = VAESettings(), on_step=None) -> dict:
    """Train, set the latent scale, save the VAE to `out_dir`, and write the listen-check report.
    With `vae.config: none` there is no VAE: the mels' mean and spread are fitted and saved instead.

    `vae_params` is params.yaml's `vae` section: with a `path` (e.g. Stable Diffusion's VAE) nothing is
    trained; that VAE is copied to `out_dir` and evaluated the same way.
    """
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train = load_split(dataset_dir, features_dir, "train")["mels"]
    val = load_split(dataset_dir, features_dir, "val")
    if vae_params.path:
        from mdsgen.model.vae import load_vae

        vae = load_vae(vae_params.path, vae_params.decode_channel)
        vae.save(str(out_dir))
        metrics = evaluate_vae(vae, train, val, cfg, seconds=0.0, history=[])
        metrics["pretrained"] = vae_params.path
        write_report(vae, val, Path(report_dir), audio_cfg)
        return metrics
    vae = MelVAE.from_config(vae_params.config, vae_params.decode_channel)
    if isinstance(vae, MelStandardizer):  # no VAE: only the mels' mean and spread to fit
        vae.fit(train).save(str(out_dir))
        metrics = evaluate_vae(vae, train, val, replace(cfg, steps=0), seconds=0.0, history=[])
        write_report(vae, val, Path(report_dir), audio_cfg)
        return metrics
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, cfg.steps))
    start, history = time.perf_counter(), []
    vae.train()
    for step in range(1, cfg.steps + 1):
        losses = vae_loss(vae, random_crops(train, cfg.batch_size, cfg.crop_frames, generator),
                          cfg.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(losses["l1"].item())
        if on_step:
            on_step(step, {k: v.item() for k, v in losses.items()})
    seconds = time.perf_counter() - start
    vae.eval()
    with torch.no_grad():
        raw = torch.cat([vae.vae.encode(vae._images(m)).latent_dist.mode() for m in train.split(16)])
    vae.vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    vae.save(str(out_dir))
    metrics = evaluate_vae(vae, train, val, cfg, seconds, history)
    write_report(vae, val, Path(report_dir), audio_cfg)
    return metrics


def evaluate_vae(vae: MelVAE, train: torch.Tensor, val: dict, cfg: VAETrainConfig, seconds: float,
                 history: list) -> dict:
    mean_mel = train.mean(0, keepdim=True)
    return {
        "val_mel_l1": reconstruction_l1(vae, val["mels"]),
        "val_mel_l1_of_mean_mel": (val["mels"] - mean_mel).abs().mean().item(),  # the no-model baseline
        "train_l1_step_1": history[0] if history else None,  # before any update: init and first batch only
        "train_l1_first": float(np.mean(history[:10])) if history else None,
        "train_l1_last": float(np.mean(history[-10:])) if history else None,
        "scaling_factor": vae.scaling_factor, "steps": cfg.steps if history else 0, "train_seconds": seconds,
        "train_clips": len(train), "val_clips": len(val["mels"]), "config": asdict(cfg),
    }


def write_report(vae: MelVAE, val: dict, report_dir: Path, audio_cfg: AudioConfig, clips: int = 3) -> None:
    """Original vs VAE mels as a PNG, and both through the vocoder as WAVs, for a few val clips."""
    from mdsgen.media.files import write_wav
    from mdsgen.media.plots import mel_grid

    report_dir.mkdir(parents=True, exist_ok=True)
    mels = val["mels"][:clips]
    with torch.no_grad():
        rebuilt = vae.decode(vae.encode(mels))
    mel_grid([(clip_id, [(original, "original"), (again, "VAE")])
              for clip_id, original, again in zip(val["clip_ids"], mels, rebuilt)], report_dir / "mels.png")
    waves = vocode(torch.cat([mels, rebuilt]), audio_cfg)
    for i, clip_id in enumerate(val["clip_ids"][:len(mels)]):
        write_wav(report_dir / f"{clip_id}_original.wav", waves[i].numpy(), audio_cfg.sample_rate)
        write_wav(report_dir / f"{clip_id}_vae.wav", waves[len(mels) + i].numpy(), audio_cfg.sample_rate)
