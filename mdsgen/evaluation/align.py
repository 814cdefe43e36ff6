"""The audio-visual alignment classifier (Diff-Foley's "Align. Acc."): does this audio belong to this
video, in time? Trained by `mdsgen train-align` on real (frame features, mel) pairs of the training
split against two kinds of negatives: another clip's audio, and the clip's own audio shifted in time.

Both streams are brought to 32 steps of a quarter second (frame features averaged onto them at any frame
rate; mel frames pooled by a strided convolution), joined per step and read by a small temporal convolution
net, so timing as well as content decides. The grid stays fixed across frame rates: fed 8 fps frames step
for step (64 steps, its 5-step convolutions spanning half the seconds), the net learned a constant answer
in 600 steps (val accuracy 0.50 on the demo's 8 fps, 224 px features; 0.85 with the fixed grid).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mdsgen.data.features import load_split


@dataclass(frozen=True)
class AlignTraining:
    """params.yaml `align`: how `mdsgen train-align` trains the classifier."""
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    max_shift_seconds: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class AlignConfig:
    feature_dim: int = 1280
    n_mels: int = 128
    mel_frames: int = 512
    steps_per_clip: int = 32   # the time grid both streams are pooled onto, whatever the frame rate
    width: int = 128


class AlignmentClassifier(nn.Module):
    def __init__(self, cfg: AlignConfig):
        super().__init__()
        self.cfg = cfg
        pool = cfg.mel_frames // cfg.steps_per_clip
        self.video = nn.Sequential(nn.LayerNorm(cfg.feature_dim), nn.Linear(cfg.feature_dim, cfg.width))
        self.audio = nn.Conv1d(cfg.n_mels, cfg.width, kernel_size=pool, stride=pool)
        self.temporal = nn.Sequential(
            nn.Conv1d(2 * cfg.width, cfg.width, 5, padding=2), nn.GELU(),
            nn.Conv1d(cfg.width, cfg.width, 5, padding=2), nn.GELU(),
            nn.Conv1d(cfg.width, cfg.width, 5, padding=2), nn.GELU())
        self.head = nn.Linear(cfg.width, 1)

    def forward(self, features: torch.Tensor, mels: torch.Tensor) -> torch.Tensor:
        """Logit of "aligned" for features [B, frames, F] and mels [B, n_mels, mel_frames]."""
        steps = self.cfg.steps_per_clip
        v = self.video(features).transpose(1, 2)            # [B, W, frames]
        if v.shape[-1] != steps:
            v = nn.functional.adaptive_avg_pool1d(v, steps)  # [B, W, 32]
        a = self.audio(mels)[..., :steps]                   # [B, W, 32]
        h = self.temporal(torch.cat([v, a], dim=1))
        return self.head(h.mean(-1)).squeeze(-1)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "align.safetensors"))
        (folder / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, folder) -> "AlignmentClassifier":
        folder = Path(folder)
        model = cls(AlignConfig(**json.loads((folder / "config.json").read_text())))
        model.load_state_dict(load_file(str(folder / "align.safetensors")))
        return model.eval()

    @torch.no_grad()
    def aligned_share(self, features: torch.Tensor, mels: torch.Tensor) -> float:
        """Share of pairs judged aligned (probability > 0.5)."""
        return (self(features, mels) > 0).float().mean().item()


def negatives(features: torch.Tensor, mels: torch.Tensor, min_shift: int, max_shift: int,
              generator: torch.Generator) -> torch.Tensor:
    """Mels that do not fit their video: half from another clip, half the clip's own shifted (rolled)
    by min_shift..max_shift mel frames either way."""
    b = len(mels)
    out = mels.clone()
    other = (torch.arange(b) + torch.randint(1, max(2, b), (b,), generator=generator)) % b
    shift = torch.randint(min_shift, max_shift + 1, (b,), generator=generator)
    sign = torch.randint(0, 2, (b,), generator=generator) * 2 - 1
    for i in range(b):
        if i % 2 == 0:
            out[i] = mels[other[i]]
        else:
            out[i] = torch.roll(mels[i], int(sign[i] * shift[i]), dims=-1)
    return out


def train_align(dataset_dir, features_dir, out_dir, settings: AlignTraining, hop_seconds: float,
                on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train on the train split, report balanced accuracy on val (real pairs vs both negative kinds);
    `on_step(step, {"loss": ...})` after each step."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    train = load_split(dataset_dir, features_dir, "train")
    val = load_split(dataset_dir, features_dir, "val")
    cfg = AlignConfig(feature_dim=train["features"].shape[-1], n_mels=train["mels"].shape[1],
                      mel_frames=train["mels"].shape[2])
    model = AlignmentClassifier(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    max_shift = round(settings.max_shift_seconds / hop_seconds)
    min_shift = max(1, round(0.5 / hop_seconds))  # at least half a second: beyond the sync tolerance
    half = settings.batch_size // 2
    model.train()
    for step in range(1, settings.steps + 1):
        index = torch.randint(len(train["mels"]), (half,), generator=generator)
        feats, mels = train["features"][index], train["mels"][index]
        batch_feats = torch.cat([feats, feats])
        batch_mels = torch.cat([mels, negatives(feats, mels, min_shift, max_shift, generator)])
        labels = torch.cat([torch.ones(half), torch.zeros(half)])
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch_feats, batch_mels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, {"loss": loss.item()})
    model.eval()
    model.save(out_dir)
    held_out = negatives(val["features"], val["mels"], min_shift, max_shift, torch.Generator().manual_seed(1))
    positives = model.aligned_share(val["features"], val["mels"])
    rejected = 1.0 - model.aligned_share(val["features"], held_out)
    return {"val_accuracy": (positives + rejected) / 2, "val_real_judged_aligned": positives,
            "val_negatives_rejected": rejected, "final_loss": loss.item(), "train_clips": len(train["mels"]),
            "val_clips": len(val["mels"]), "settings": asdict(settings)}
