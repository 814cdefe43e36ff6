"""params.yaml, the one source of settings, read into the typed configs of each module."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .audio import AudioConfig
from .diffusion import SamplingConfig
from .train import TrainConfig
from .video import VideoConfig


@dataclass
class Params:
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: dict = field(default_factory=lambda: {"size": "T"})       # size + MDSGenConfig overrides
    vae: dict = field(default_factory=lambda: {"config": "small", "decode_channel": 1})
    frame_encoder: dict = field(default_factory=lambda: {"name": "efficientnet-lite0"})


def _typed(cls, values: dict | None, section: str):
    values = values or {}
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"params.yaml [{section}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def load_params(path: str | Path = "params.yaml") -> Params:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return Params(
        audio=_typed(AudioConfig, raw.get("audio"), "audio"),
        video=_typed(VideoConfig, raw.get("video"), "video"),
        sampling=_typed(SamplingConfig, raw.get("sampling"), "sampling"),
        train=_typed(TrainConfig, raw.get("train"), "train"),
        model=dict(Params().model, **(raw.get("model") or {})),
        vae=dict(Params().vae, **(raw.get("vae") or {})),
        frame_encoder=dict(raw.get("frame_encoder") or Params().frame_encoder),
    )
