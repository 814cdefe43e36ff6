"""`mdsgen ablate`: arms x seeds trained and scored on the ci pipeline's data, each an MLflow run, and the
REPORT.md tables written from the results."""
import shutil
import sys

import mlflow
import pytest

from mdsgen.training.ablations import BEGIN, END, format_tables, ordering_verdict, read_results, summarize
from procs import run

ARMS = ["paper", "cross_attention", "channel_R", "cfg_1"]


def result(arm, seed, **scores):
    return {"arm": arm, "seed": seed, "mlflow_run_id": f"run-{arm}-{seed}", "clips": 4,
            "train": {"steps": 10, "batch_size": 8}, "scores": scores}


def test_orderings_are_judged_on_means_and_spread():
    results = [result("paper", 0, onset_auc=0.70), result("paper", 1, onset_auc=0.72),
               result("sam", 0, onset_auc=0.60), result("sam", 1, onset_auc=0.62),
               result("no_mask", 0, onset_auc=0.50), result("no_mask", 1, onset_auc=0.69)]
    summary = summarize(results)
    assert summary["paper"]["onset_auc"][:2] == pytest.approx((0.71, 0.0141421), rel=1e-4)
    assert ordering_verdict(summary, ("paper", "sam"), "onset_auc", higher=True) == "holds"
    assert ordering_verdict(summary, ("sam", "paper"), "onset_auc", higher=True) == "fails"
    assert ordering_verdict(summary, ("paper", "sam"), "onset_auc", higher=False) == "fails"
    # no_mask's mean is lower than sam's, but its seeds spread wider than the gap
    assert ordering_verdict(summary, ("paper", "sam", "no_mask"), "onset_auc", True) == "holds (within spread)"
    table = format_tables(results)
    assert "| TAM | 2 |" in table and "0.710 ± 0.014" in table and "`run-sam-1`" in table
    assert "Ordering TAM > SAM > none: onset_auc: holds (within spread)." in table


@pytest.mark.reads_pipeline  # on its own copy: it rewrites REPORT.md and reports/ablations
def test_ablation_sweep_tracks_every_arm_and_seed(own_ci_repo, pipeline_env, mlflow_server):
    repo, _ = own_ci_repo
    shutil.rmtree(repo / "reports/ablations", ignore_errors=True)  # the project's own sweep, copied with the repo
    (repo / "REPORT.md").write_text(f"# Report\n\nprose before\n\n{BEGIN}\nstale tables\n{END}\n\nprose after\n")
    cmd = [sys.executable, "-m", "mdsgen", "ablate", "--arms", *ARMS, "--seeds", "0", "1", "--steps", "2",
           "--clips", "4"]
    run(cmd, repo, pipeline_env)
    results = read_results(repo / "reports/ablations")
    assert sorted((r["arm"], r["seed"]) for r in results) == sorted((a, s) for a in ARMS for s in (0, 1))
    by = {(r["arm"], r["seed"]): r for r in results}

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    for r in results:
        logged = client.get_run(r["mlflow_run_id"])
        assert logged.data.tags["ablation.arm"] == r["arm"] and logged.data.tags["ablation.seed"] == str(r["seed"])
        assert logged.data.metrics["test_onset_auc"] == pytest.approx(r["scores"]["onset_auc"])
    for seed in (0, 1):
        paper = by[("paper", seed)]
        # sampled arms reuse the paper arm's model of the same seed and change only how it samples/decodes
        for arm in ("channel_R", "cfg_1"):
            assert by[(arm, seed)]["model_run_id"] == paper["mlflow_run_id"]
        assert by[("channel_R", seed)]["decode_channel"] == 0 and paper["decode_channel"] == 1
        assert by[("cfg_1", seed)]["sampling"]["cfg_scale"] == 1.0
        assert by[("channel_R", seed)]["scores"]["frechet_distance"] != paper["scores"]["frechet_distance"]
        cross = by[("cross_attention", seed)]
        assert cross["model"]["conditioning"] == "cross_attention" and paper["model"]["conditioning"] == "reducer"
        assert cross["scores"]["params_inference"] > paper["scores"]["params_inference"]
    assert by[("paper", 0)]["scores"]["frechet_distance"] != by[("paper", 1)]["scores"]["frechet_distance"]

    report = (repo / "REPORT.md").read_text()
    assert report.startswith("# Report\n\nprose before") and report.rstrip().endswith("prose after")
    assert "stale tables" not in report
    assert "| Reducer (paper) | 2 |" in report and "| cross-attention to all frames | 2 |" in report
    assert "| ground_truth_vae |" in report and by[("paper", 1)]["mlflow_run_id"] in report

    # a second sweep finds every result and trains nothing
    experiment = client.get_experiment_by_name("mdsgen-ablations").experiment_id
    before = len(client.search_runs([experiment]))
    again = run(cmd, repo, pipeline_env)
    assert "training" not in again.stdout and len(client.search_runs([experiment])) == before

    other = run([*cmd[:-4], "--steps", "3", "--clips", "4"], repo, pipeline_env, check=False)
    assert other.returncode == 2 and "ablations.steps = 2, not 3" in other.stderr  # nothing reused across schedules
    bad = run([*cmd[:5], "tam_0.9"], repo, pipeline_env, check=False)
    assert bad.returncode == 2 and "unknown ablation arms ['tam_0.9']" in bad.stderr
