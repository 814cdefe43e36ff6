"""params.yaml, the one source of settings, read into the typed configs of each module."""
from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from mdsgen.data.dataset import DatasetConfig
from mdsgen.evaluation.evaluate import Checks
from mdsgen.media.audio import AudioConfig
from mdsgen.media.video import ReadLimits, VideoConfig
from mdsgen.model.diffusion import SamplingConfig
from mdsgen.model.network import MDSGenConfig
from mdsgen.serving.app import AppConfig
from mdsgen.training.train import TrainConfig
from mdsgen.training.vae_train import VAETrainConfig


MLFLOW_DEFAULTS = {"tracking_uri": None, "experiment": "mdsgen", "registered_model": "mdsgen",
                   "gate": {"frechet_distance": "lower", "onset_f1": "higher"}}
EVALUATE_DEFAULTS = {"seed": 0, "clips": None, "batch_size": 8,
                     "checks": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(Checks()).items()}}
SERVING_DEFAULTS = {"host": "127.0.0.1", "ports": [8000, 8001, 8002], "config": None,
                    "model": "models:/mdsgen@champion", "state_dir": "runs/serving",
                    "limits": {}}  # none given: the shipped configs' values
MONITORING_DEFAULTS = {"reference_clips": 48, "components": 4, "seed": 0, "log": "runs/serving/records",
                       "drift_share": 0.5}
ABLATIONS_DEFAULTS = {"steps": 100, "batch_size": 8, "seeds": [0, 1, 2], "clips": None,
                      "experiment": "mdsgen-ablations", "out": "reports/ablations", "state_dir": "runs/ablations"}
ALIGN_DEFAULTS = {"steps": 600, "batch_size": 32, "lr": 1e-3, "max_shift_seconds": 2.0, "seed": 0}


@dataclass
class Params:
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generate: ReadLimits = field(default_factory=ReadLimits)
    train: TrainConfig = field(default_factory=TrainConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    vae_train: VAETrainConfig = field(default_factory=VAETrainConfig)
    model: dict = field(default_factory=lambda: {"size": "T"})       # size + MDSGenConfig overrides
    vae: dict = field(default_factory=lambda: {"config": "small", "decode_channel": 1, "path": None})
    frame_encoder: dict = field(default_factory=lambda: {"name": "efficientnet-lite0"})
    features: dict = field(default_factory=lambda: {"workers": 2})
    mlflow: dict = field(default_factory=lambda: copy.deepcopy(MLFLOW_DEFAULTS))
    evaluate: dict = field(default_factory=lambda: dict(EVALUATE_DEFAULTS))
    align: dict = field(default_factory=lambda: dict(ALIGN_DEFAULTS))
    serving: dict = field(default_factory=lambda: copy.deepcopy(SERVING_DEFAULTS))
    monitoring: dict = field(default_factory=lambda: dict(MONITORING_DEFAULTS))
    ablations: dict = field(default_factory=lambda: copy.deepcopy(ABLATIONS_DEFAULTS))
    app: AppConfig = field(default_factory=AppConfig)
    profile: str = "default"


def _typed(cls, values: dict | None, section: str):
    values = values or {}
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"params.yaml [{section}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def _section(defaults: dict, values: dict | None, section: str) -> dict:
    unknown = set(values or {}) - set(defaults)
    if unknown:
        raise ValueError(f"params.yaml [{section}]: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**copy.deepcopy(defaults), **(values or {})}


def _free_section(defaults: dict, values: dict | None, section: str, known: set[str]) -> dict:
    """A section whose keys go on to another function's keyword arguments: refused unless in `known`."""
    unknown = set(values or {}) - known
    if unknown:
        raise ValueError(f"params.yaml [{section}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return dict(defaults, **(values or {}))


def _evaluate_section(values: dict | None) -> dict:
    section = _section(EVALUATE_DEFAULTS, values, "evaluate")
    Checks.from_params(section["checks"])  # unknown or malformed checks are refused when params are read
    return section


MODEL_KEYS = {"size"} | {f.name for f in fields(MDSGenConfig)}
FRAME_ENCODER_KEYS = {"name", "weights"}


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(yaml.safe_load(Path(path).read_text()) or {})


def parse_params(raw: dict) -> Params:
    return Params(
        audio=_typed(AudioConfig, raw.get("audio"), "audio"),
        video=_typed(VideoConfig, raw.get("video"), "video"),
        sampling=_typed(SamplingConfig, raw.get("sampling"), "sampling"),
        generate=_typed(ReadLimits, raw.get("generate"), "generate"),
        train=_typed(TrainConfig, raw.get("train"), "train"),
        dataset=_typed(DatasetConfig, raw.get("dataset"), "dataset"),
        vae_train=_typed(VAETrainConfig, raw.get("vae_train"), "vae_train"),
        features=_section(Params().features, raw.get("features"), "features"),
        profile=raw.get("profile", "default"),
        model=_free_section(Params().model, raw.get("model"), "model", MODEL_KEYS),
        vae=_section(Params().vae, raw.get("vae"), "vae"),
        frame_encoder=_free_section({}, raw.get("frame_encoder") or Params().frame_encoder, "frame_encoder",
                                    FRAME_ENCODER_KEYS),
        mlflow=_section(MLFLOW_DEFAULTS, raw.get("mlflow"), "mlflow"),
        evaluate=_evaluate_section(raw.get("evaluate")),
        align=_section(ALIGN_DEFAULTS, raw.get("align"), "align"),
        serving=_section(SERVING_DEFAULTS, raw.get("serving"), "serving"),
        monitoring=_section(MONITORING_DEFAULTS, raw.get("monitoring"), "monitoring"),
        ablations=_section(ABLATIONS_DEFAULTS, raw.get("ablations"), "ablations"),
        app=_typed(AppConfig, raw.get("app"), "app"),
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
