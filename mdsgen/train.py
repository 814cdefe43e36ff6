"""Denoiser training on cached latents and frame features: the paper's recipe (Adan, EMA, CFG dropout,
two-pass masked loss). This is the in-memory loop; the `mdsgen train` stage builds on it."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from adan_pytorch import Adan

from .diffusion import training_loss
from .model import MDSGen


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500_000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999      # 0 turns EMA off (short runs, tests)
    cfg_dropout: float = 0.1
    masked_weight: float = 1.0     # lambda in L_full + lambda * L_masked
    grad_clip: float = 1.0
    seed: int = 0


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def fit(model: MDSGen, latents: torch.Tensor, features: torch.Tensor, cfg: TrainConfig,
        on_step: Callable[[int, dict], None] | None = None) -> MDSGen:
    """Train on in-memory tensors (latents [N, C, H, W], features [N, T, F]); returns the EMA model
    (or the trained model itself when EMA is off)."""
    generator = torch.Generator(device=latents.device).manual_seed(cfg.seed)
    optimizer = Adan(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    model.train()
    for step in range(1, cfg.steps + 1):
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator, device=latents.device)
        losses = training_loss(model, latents[index], features[index], cfg_dropout=cfg.cfg_dropout,
                               masked_weight=cfg.masked_weight, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, cfg.ema_decay)
        if on_step is not None:
            on_step(step, {k: v.item() for k, v in losses.items()})
    model.eval()
    return (ema if ema is not None else model).eval()
