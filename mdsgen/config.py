"""params.yaml, the one source of settings, read into the typed configs of each module."""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from mdsgen.base.errors import refuse_unknown_keys
from mdsgen.data.dataset import DatasetConfig
from mdsgen.data.features import FeatureExtraction
from mdsgen.evaluation.align import AlignTraining
from mdsgen.evaluation.evaluate import EvaluateConfig
from mdsgen.evaluation.tracking import TrackingConfig
from mdsgen.media.audio import AudioConfig
from mdsgen.media.video import ReadLimits, VideoConfig
from mdsgen.model.diffusion import SamplingConfig
from mdsgen.model.encoders import FrameEncoderSpec
from mdsgen.model.network import ModelSettings
from mdsgen.model.vae import VAESettings
from mdsgen.serving.app import AppConfig
from mdsgen.serving.monitoring import MonitoringConfig
from mdsgen.serving.server import ServingConfig
from mdsgen.training.ablations import AblationConfig
from mdsgen.training.train import TrainConfig
from mdsgen.training.vae_train import VAETrainConfig
from mdsgen.training.vocoder_train import VocoderTrainConfig


@dataclass(frozen=True)
class Params:
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generate: ReadLimits = field(default_factory=ReadLimits)
    train: TrainConfig = field(default_factory=TrainConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    vae_train: VAETrainConfig = field(default_factory=VAETrainConfig)
    vocoder_train: VocoderTrainConfig = field(default_factory=VocoderTrainConfig)
    model: ModelSettings = field(default_factory=ModelSettings)
    vae: VAESettings = field(default_factory=VAESettings)
    frame_encoder: FrameEncoderSpec = field(default_factory=FrameEncoderSpec)
    features: FeatureExtraction = field(default_factory=FeatureExtraction)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    align: AlignTraining = field(default_factory=AlignTraining)
    serving: ServingConfig = field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    app: AppConfig = field(default_factory=AppConfig)
    profile: str = "default"


def _typed(cls, values: dict | None, section: str):
    refuse_unknown_keys(values or {}, {f.name for f in fields(cls)}, section)
    return cls(**(values or {}))


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(yaml.safe_load(Path(path).read_text()) or {})


FREE_SECTIONS = {"model", "evaluate", "profile"}  # parsed by their own rules below


def parse_params(raw: dict) -> Params:
    """Each typed section from its dataclass (the field's default factory); the free ones by their own rules."""
    typed = {f.name: _typed(f.default_factory, raw.get(f.name), f.name)
             for f in fields(Params) if f.name not in FREE_SECTIONS}
    return Params(
        **typed,
        profile=raw.get("profile", "default"),
        model=ModelSettings.from_params(raw.get("model")),
        evaluate=EvaluateConfig.from_params(raw.get("evaluate")),
    )


def _merge(target, source) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)  # a shared node would be written as a YAML alias


def apply_profile(doc: dict, name: str, where: str = "params.yaml") -> dict:
    """Copy `profiles.<name>` over the active sections of a params document (in place)."""
    profiles = doc.get("profiles") or {}
    if name not in profiles:
        raise ValueError(f"{where}: no profile {name!r}; profiles: {', '.join(profiles) or 'none'}")
    for section, values in profiles[name].items():
        _merge(doc.setdefault(section, {}), values)
    doc["profile"] = name
    return doc


def use_profile(name: str, path: str | Path = "params.yaml") -> None:
    """Copy `profiles.<name>` over the active sections of params.yaml, keeping its comments.

    Stages read only the active sections, so DVC sees exactly which parameters changed and re-runs only
    the stages that depend on them.
    """
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.width = 4096  # keep flow lists on one line
    path = Path(path)
    doc = apply_profile(yaml_rt.load(path.read_text()), name, str(path))
    buffer = io.StringIO()
    yaml_rt.dump(doc, buffer)
    parse_params(yaml.safe_load(buffer.getvalue()))  # a bad profile raises here, before the file changes
    path.write_text(buffer.getvalue())


def resolve_params(text: str, profile: str | None = None, overrides: dict | None = None) -> str:
    """A params.yaml text with a profile applied and `section.key` overrides set, checked; for runs that
    carry their settings with them (Kubeflow tasks get the project's params.yaml as a parameter)."""
    doc = yaml.safe_load(text) or {}
    if profile:
        apply_profile(doc, profile)
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        doc.setdefault(section, {})[key] = value
    resolved = yaml.safe_dump(doc, sort_keys=False)
    parse_params(yaml.safe_load(resolved))
    return resolved
