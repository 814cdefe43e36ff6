"""The whole DVC pipeline on the ci profile against a real MLflow server: training, evaluation, the
registry and its promotion gate, `models:/` loading, and `dvc exp run` sweeps."""
import json
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from mdsgen.config import load_params
from mdsgen.evaluation.evaluate import SYSTEMS, TABLE_METRICS
from procs import run


def client(server):
    return mlflow.MlflowClient(tracking_uri=server)


@pytest.mark.reads_pipeline
def test_every_stage_ran(ci_repo):
    _, output = ci_repo
    for stage in ("train_align", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in output


@pytest.mark.reads_pipeline
def test_the_trained_checkpoint_carries_the_texture_of_its_training_latents(ci_repo):
    from mdsgen.data.features import load_latents
    from mdsgen.model.checkpoint import load_checkpoint
    from mdsgen.model.diffusion import fit_texture

    repo, _ = ci_repo
    ckpt = load_checkpoint(str(repo / "models/mdsgen"))
    latents = load_latents(repo / "data/latents", "train")["latents"]
    assert torch.allclose(ckpt.texture, fit_texture(latents, ckpt.model.config.time_axis))
    assert not torch.equal(ckpt.texture, torch.ones_like(ckpt.texture))  # fitted, not init's flat


@pytest.mark.reads_pipeline
def test_evaluation_scores_every_system(ci_repo):
    repo, _ = ci_repo
    result = json.loads((repo / "reports/eval-metrics.json").read_text())
    assert set(result["systems"]) == set(SYSTEMS)
    for name, scores in result["systems"].items():
        for metric in TABLE_METRICS:
            assert np.isfinite(scores[metric]), (name, metric)
    real = result["systems"]["real_audio"]
    # the recordings against themselves: the scorer is consistent ...
    assert real["frechet_distance"] == pytest.approx(0, abs=1e-3) and real["class_agreement"] == 1.0
    # ... and the onset detector finds the true events in real audio
    assert real["onset_recall"] >= 0.9 and real["onset_median_error_ms"] < 60
    model = result["systems"]["model"]
    assert model["params_inference"] > 0 and model["seconds_per_clip"] > 0 and model["peak_memory_mb"] > 0
    table = (repo / "reports/eval/table.md").read_text()
    assert all(f"| {name} |" in table for name in SYSTEMS)
    # aisfx hears every system in the band of the dataset's 16 kHz recordings, and the table says so
    assert result["aisfx_band_rate"] == 16000 and "recordings' 16000 Hz" in table
    # which vocoder rendered every row (the ci profile: Griffin-Lim, nothing fine-tuned)
    assert result["vocoder"] == "griffin-lim" and "vocoder griffin-lim;" in table
    for name in ("metrics.png", "mels.png"):
        assert (repo / "reports/eval" / name).stat().st_size > 5000


@pytest.mark.reads_pipeline
def test_training_and_evaluation_are_in_one_mlflow_run(ci_repo, mlflow_server):
    repo, _ = ci_repo
    run_id = json.loads((repo / "reports/train-metrics.json").read_text())["mlflow_run_id"]
    logged = client(mlflow_server).get_run(run_id)
    assert logged.data.params["profile"] == "ci"
    assert "loss" in logged.data.metrics and "test_frechet_distance" in logged.data.metrics
    assert "ref_retrieval_onset_f1" in logged.data.metrics
    top = {f.path for f in client(mlflow_server).list_artifacts(run_id)}
    assert {"environment.json", "samples", "evaluation"} <= top


def test_first_registration_becomes_champion_and_loads(ci_repo, mlflow_server, pipeline_env, tmp_path):
    repo, _ = ci_repo
    registry = json.loads((repo / "reports/registry.json").read_text())
    decision = json.loads((repo / "reports/promotion.json").read_text())
    assert decision["promoted"] and decision["champion"] == registry["version"]
    # the version this pipeline registered (a later registration, e.g. the Kubeflow test's, may hold the
    # alias by now if the gate found it better)
    version = client(mlflow_server).get_model_version("mdsgen", registry["version"])
    evaluation = json.loads((repo / "reports/eval-metrics.json").read_text())
    assert float(version.tags["eval.frechet_distance"]) == pytest.approx(
        evaluation["systems"]["model"]["frechet_distance"], rel=1e-5)
    assert json.loads(version.tags["frame_encoder"])["name"] == "efficientnet-lite0"

    clip = next((repo / "data/dataset/clips").iterdir())
    out = tmp_path / "out"
    run([sys.executable, "-m", "mdsgen", "generate", str(clip), "-o", str(out), "--model", "models:/mdsgen@champion",
         "--steps", "2"], repo, pipeline_env)
    assert (out / f"{clip.stem}.wav").stat().st_size > 100_000
    # the same version through MLflow's own pyfunc loader (models from code: nothing unpickled)
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/mdsgen@champion")
    answer = model.predict(pd.DataFrame({"video": [str(clip)]}))
    rate = load_params(repo / "params.yaml").audio.sample_rate
    assert answer["sample_rate"][0] == rate and len(answer["wave"][0]) > 8 * rate


def test_the_gate_keeps_a_worse_challenger_and_force_overrides(ci_repo, mlflow_server, pipeline_env, tmp_path):
    repo, _ = ci_repo
    champion = client(mlflow_server).get_model_version_by_alias("mdsgen", "champion").version
    worse = json.loads((repo / "reports/eval-metrics.json").read_text())
    worse["systems"]["model"]["frechet_distance"] *= 2
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    mdsgen = [sys.executable, "-m", "mdsgen"]
    run(mdsgen + ["register", "models/mdsgen", "--evaluation", str(tmp_path / "worse.json"), "--out", ""],
        repo, pipeline_env)
    challenger = client(mlflow_server).get_model_version_by_alias("mdsgen", "challenger").version
    assert challenger != champion
    proc = run(mdsgen + ["promote", "--out", str(tmp_path / "kept.json")], repo, pipeline_env)
    assert "not promoted" in proc.stdout and "worse on frechet_distance" in proc.stdout
    assert client(mlflow_server).get_model_version_by_alias("mdsgen", "champion").version == champion
    tags = client(mlflow_server).get_model_version("mdsgen", challenger).tags
    assert tags["promotion.decision"] == "kept as challenger" and "frechet_distance" in tags["promotion.reason"]

    proc = run(mdsgen + ["promote", "--force", "--out", str(tmp_path / "forced.json")], repo, pipeline_env)
    assert "forced" in proc.stdout
    assert json.loads((tmp_path / "forced.json").read_text())["forced"] is True
    assert client(mlflow_server).get_model_version_by_alias("mdsgen", "champion").version == challenger
    # put the pipeline's champion back for the tests that follow
    client(mlflow_server).set_registered_model_alias("mdsgen", "champion", champion)


@pytest.mark.parametrize("flaw", ["fails_diagnostics", "nan_metric", "scored_full_band"])
def test_the_gate_refuses_a_better_looking_challenger_that_fails_diagnostics_or_scores_nan(
        ci_repo, mlflow_server, pipeline_env, tmp_path, flaw):
    """FD and onset F1 better than the champion's, yet the samples are off-distribution (or a gate metric is
    NaN, neither better nor worse, or scored in another band than the champion's): never promoted."""
    repo, _ = ci_repo
    champion = client(mlflow_server).get_model_version_by_alias("mdsgen", "champion").version
    better = json.loads((repo / "reports/eval-metrics.json").read_text())
    model = better["systems"]["model"]
    model["frechet_distance"] *= 0.5
    model["onset_f1"] += 0.1
    if flaw == "fails_diagnostics":
        model["diagnostics_pass"] = 0.0
        better["diagnostics_failures"] = "latent_std_ratio 3.500 outside [0.8, 1.25]"
    elif flaw == "nan_metric":
        model["frechet_distance"] = float("nan")
    else:
        better["aisfx_band_rate"] = None
    (tmp_path / "better.json").write_text(json.dumps(better))
    mdsgen = [sys.executable, "-m", "mdsgen"]
    run(mdsgen + ["register", "models/mdsgen", "--evaluation", str(tmp_path / "better.json"), "--out", ""],
        repo, pipeline_env)
    proc = run(mdsgen + ["promote", "--out", str(tmp_path / "kept.json")], repo, pipeline_env)
    decision = json.loads((tmp_path / "kept.json").read_text())
    assert not decision["promoted"], decision
    expected = {"fails_diagnostics": "latent_std_ratio 3.500", "nan_metric": "frechet_distance is not a number",
                "scored_full_band": "the metrics do not compare"}[flaw]
    assert expected in decision["reason"] and "not promoted" in proc.stdout
    assert client(mlflow_server).get_model_version_by_alias("mdsgen", "champion").version == champion


def test_a_promotion_never_overwrites_a_champion_that_moved_while_it_decided(mlflow_server, monkeypatch):
    from mdsgen.evaluation import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registry_client = client(mlflow_server)
    name = "mdsgen-race"
    registry_client.create_registered_model(name)
    versions = [registry_client.create_model_version(name, f"s3://bucket/{name}/{i}", tags={
        "eval.diagnostics_pass": "1", "eval.frechet_distance": str(fd), "eval.onset_f1": "0.3"}).version
        for i, fd in enumerate((100, 90, 80))]
    registry_client.set_registered_model_alias(name, "champion", versions[0])
    registry_client.set_registered_model_alias(name, "challenger", versions[1])
    gate = {"frechet_distance": "lower", "onset_f1": "higher"}
    decide = registry.gate_decision

    def another_promotion_lands_meanwhile(*args):
        registry_client.set_registered_model_alias(name, "champion", versions[2])
        return decide(*args)

    monkeypatch.setattr(registry, "gate_decision", another_promotion_lands_meanwhile)
    with pytest.raises(ValueError, match="aliases moved while the gate decided"):
        registry.promote(name, gate)
    assert registry_client.get_model_version_by_alias(name, "champion").version == versions[2]
    monkeypatch.setattr(registry, "gate_decision", decide)
    registry_client.set_registered_model_alias(name, "champion", versions[0])
    assert registry.promote(name, gate)["promoted"]  # undisturbed, the same challenger goes through
    assert registry_client.get_model_version_by_alias(name, "champion").version == versions[1]


def test_dvc_exp_run_sweeps_a_parameter(own_ci_repo, pipeline_env):
    repo, _ = own_ci_repo
    run(["dvc", "exp", "run", "-S", "train.steps=6", "--name", "longer"], repo, pipeline_env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, pipeline_env).stdout)
    text = json.dumps(shown)
    assert "longer" in text and "eval-metrics.json" in text
    metrics = json.loads((repo / "reports/train-metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 4  # continued the ci run's state
