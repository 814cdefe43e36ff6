"""MLflow plumbing shared by training, evaluation and the registry: where the store is, which run to log
into, and what to record about the environment."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import metadata
from pathlib import Path

DEFAULT_STORE = "mlflow.db"           # sqlite file under the working directory (the repo for DVC stages)
DEFAULT_ARTIFACTS = "mlartifacts"


@dataclass(frozen=True)
class TrackingConfig:
    """params.yaml `mlflow`: the tracking store, the experiment, the registered model and its promotion gate."""
    tracking_uri: str | None = None   # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = "mdsgen"
    registered_model: str = "mdsgen"
    # the challenger must not be worse on any and be better on one
    gate: dict = field(default_factory=lambda: {"frechet_distance": "lower", "onset_f1": "higher"})


PACKAGES = ("torch", "diffusers", "numpy", "librosa", "av", "mlflow", "dvc", "adan-pytorch", "safetensors")


def tracking_uri(configured: str | None = None) -> str:
    """params.yaml's `mlflow.tracking_uri`, else MLFLOW_TRACKING_URI, else a sqlite store in the cwd."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def use_tracking(configured: str | None, experiment: str) -> str:
    """Point mlflow at the store and experiment; returns the experiment id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(configured)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        # a local sqlite store keeps its artifacts beside it, not in whatever folder a command ran from
        location = Path(DEFAULT_ARTIFACTS).resolve().as_uri() if uri.startswith("sqlite:") else None
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except MlflowException as error:  # another job against the same server created it meanwhile
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    return mlflow.set_experiment(experiment).experiment_id


def run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


def flat_params(params) -> dict:
    """params.yaml's active sections as `section.key` -> value (MLflow params are flat strings)."""
    out = {}
    for section in ("audio", "video", "sampling", "train", "model", "vae", "frame_encoder", "mlflow"):
        values = getattr(params, section, None)
        # model and frame_encoder: the keys params.yaml sets, as it writes them
        values = values.as_dict() if hasattr(values, "as_dict") else asdict(values) if is_dataclass(values) \
            else (values or {})
        for key, value in values.items():
            out[f"{section}.{key}"] = str(value)[:500]
    out["profile"] = params.profile
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if cuda else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "world_size": int(os.environ.get("WORLD_SIZE", 1)), "git_commit": git_commit(), "packages": versions}
