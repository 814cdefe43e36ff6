"""Monitoring: request records (crash-safe, local and S3), the reference the pipeline registers with the
model, and Evidently drift reports on real traffic through Triton."""
import json
import sys
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from procs import run


def record(i: int, when: datetime) -> dict:
    return {"time": when.isoformat(), "model_version": "1", "latency_s": 0.1, "summary": {"x": float(i)}}


def test_record_log_survives_a_cut_last_line(tmp_path):
    from mdsgen.serving.monitoring import RecordLog, read_records

    now = datetime.now(timezone.utc)
    log = RecordLog(tmp_path / "records")
    for i in range(3):
        log.append(record(i, now + timedelta(seconds=i)))
    (file,) = (tmp_path / "records").glob("*.jsonl")
    with open(file, "a") as f:
        f.write('{"time": "2026-01-01T00:00:00+00:00", "summ')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="partial last line skipped"):
        records = read_records(tmp_path / "records")
    assert [r["summary"]["x"] for r in records] == [0.0, 1.0, 2.0]
    RecordLog(tmp_path / "records").append(record(3, now + timedelta(seconds=3)))  # the restarted server
    with pytest.warns(UserWarning, match="partial last line skipped"):
        records = read_records(tmp_path / "records", since=now + timedelta(seconds=1))
    assert [r["summary"]["x"] for r in records] == [1.0, 2.0, 3.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_records(tmp_path / "nothing-yet") == []


def test_record_log_on_s3(s3_server):
    from mdsgen.serving.monitoring import RecordLog, read_records

    now = datetime.now(timezone.utc)
    log = RecordLog(f"{s3_server}/records", flush_every=2)
    for i in range(5):
        log.append(record(i, now + timedelta(seconds=i)))
    log.close()  # the last, partial buffer is written too
    assert [r["summary"]["x"] for r in read_records(f"{s3_server}/records")] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_quiet_server_flushes_its_records_and_the_queue_is_bounded_by_bytes(s3_server):
    """One request and then silence: the record reaches S3 after flush_seconds, not at the 32nd request or
    at shutdown. A request whose wave would overfill the queue's byte budget is dropped, with a warning."""
    import time

    import numpy as np
    import torch
    from mdsgen.serving.monitoring import Recorder, RecordLog, read_records

    log = RecordLog(f"{s3_server}/quiet", flush_every=32, flush_seconds=0.5)
    recorder = Recorder(log, None, "mdsgen", "1", max_queue_bytes=4 << 20)
    wave = (0.1 * np.sin(np.arange(16000 * 2) / 5)).astype(np.float32)
    recorder.submit(torch.zeros(1, 32, 8), wave, 16000, latency=0.2)
    deadline = time.monotonic() + 60
    while not (records := read_records(f"{s3_server}/quiet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(records) == 1 and records[0]["latency_s"] == 0.2
    with pytest.warns(UserWarning, match="a record was dropped"):
        recorder.submit(torch.zeros(1, 32, 8), np.zeros(2 << 20, np.float32), 16000, latency=0.3)  # 8 MB
    recorder.close()
    assert recorder.queued_bytes == 0 and len(read_records(f"{s3_server}/quiet")) == 1


def test_onset_rate_ignores_a_frame_of_length_and_sees_more_onsets():
    """Reference clips are a latent window long, served videos a frame shorter: equal onset counts must not
    read as drift (before rounding every ci request drifted on this column), while more onsets still show."""
    import numpy as np
    from mdsgen.serving.monitoring import output_summary

    rate = 16000

    def clicks(count: int, samples: int) -> np.ndarray:
        wave = np.zeros(samples, np.float32)
        for start in np.linspace(rate // 2, samples - rate, count).astype(int):
            wave[start:start + 800] = np.sin(np.arange(800) / 3) * np.exp(-np.arange(800) / 200)
        return wave

    window, served = output_summary(clicks(3, 131072), rate), output_summary(clicks(3, 131000), rate)
    assert window["onset_rate_hz"] == served["onset_rate_hz"] > 0
    assert output_summary(clicks(6, 131072), rate)["onset_rate_hz"] > window["onset_rate_hz"]


def test_since_accepts_durations_and_times():
    from mdsgen.serving.monitoring import parse_since

    now = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-11-26T10:00:00", now) == datetime(2026, 11, 26, 10, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        parse_since("yesterday", now)


def mdsgen(args, cwd, env, check=True):
    return run([sys.executable, "-m", "mdsgen", *args], cwd, env, check=check)


@pytest.fixture(scope="module")
def traffic(ci_repo, pipeline_env, tmp_path_factory):
    """Fresh clips from the ci dataset's distribution (another seed) and dark copies of them."""
    from media import darken

    repo, _ = ci_repo
    root = tmp_path_factory.mktemp("traffic")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    mdsgen(["dataset", "build", "--out", str(root / "fresh"), "--params", str(root / "params.yaml")], repo,
           pipeline_env)
    dark = root / "dark"
    dark.mkdir()
    for clip in sorted((root / "fresh" / "clips").glob("*.mp4")):
        darken(clip, dark / clip.name)
    return root / "fresh" / "clips", dark


def send_and_monitor(repo, env, state, records, videos, work, since: str) -> tuple:
    """Send every video through the client to the running server, then `mdsgen monitor` the records since
    `since` (one server serves both kinds of traffic, one after the other)."""
    from mdsgen.serving.monitoring import parse_since, wait_for_records

    mdsgen(["client", str(videos), "-o", str(work / "out"), "--state-dir", str(state), "--no-mux",
            "--concurrency", "4"], repo, env)
    count = len(list(videos.glob("*.mp4")))
    assert len(wait_for_records(str(records), count, parse_since(since), timeout=30)) == count  # one per request
    proc = mdsgen(["monitor", "--log", str(records), "--out", str(work / "report"), "--since", since], repo, env,
                 check=False)
    return proc, json.loads((work / "report" / "summary.json").read_text())


def test_the_registered_model_carries_its_reference(ci_repo, pipeline_env):
    import mlflow

    from mdsgen.evaluation.registry import resolve_checkpoint
    from mdsgen.serving.monitoring import REFERENCE_FILE, SUMMARIZER_FILE

    repo, _ = ci_repo
    rows = (repo / "models" / "reference" / REFERENCE_FILE).read_text().splitlines()
    assert len(rows) == 16 and json.loads(rows[0])["summary"]["top_class"].startswith("class_")
    mlflow.set_tracking_uri(pipeline_env["MLFLOW_TRACKING_URI"])
    version = json.loads((repo / "reports" / "registry.json").read_text())["version"]  # (Kubeflow's may be champion)
    registered = Path(resolve_checkpoint(f"models:/mdsgen/{version}")) / "monitoring"
    assert (registered / SUMMARIZER_FILE).is_file()
    assert (registered / REFERENCE_FILE).read_text().splitlines() == rows


# The product's alert (half the columns) with a margin measured on both sides. Frames at 5% brightness move every
# input summary and most output ones: 10 and 9 of 12 columns on traffic seeds 1 and 2, against an alert at 6;
# fresh traffic drifted on 1 of 12 on both (feature_pc1: the 16 reference clips are the ones the summarizer was
# fitted on, so their spread along it is wider). At 15% brightness the frame encoder's features hardly moved:
# 1 of 12 columns, as for fresh traffic, and the test passed or failed on spurious columns.
def test_same_distribution_raises_no_drift_and_dark_videos_do(ci_repo, pipeline_env, traffic, tmp_path):
    from mlflow import MlflowClient

    repo, _ = ci_repo
    fresh, dark = traffic
    state, records = tmp_path / "serving", tmp_path / "records"
    mdsgen(["serve", "--ports", "0", "0", "0", "--state-dir", str(state), "--monitor-log", str(records)], repo,
           pipeline_env)
    try:
        same_proc, same = send_and_monitor(repo, pipeline_env, state, records, fresh, tmp_path / "same", "1h")
        assert same_proc.returncode == 0, same_proc.stdout + same_proc.stderr
        assert not same["alert"] and same["drifted_share"] < same["threshold"]
        assert same["current_requests"] == len(list(fresh.glob("*.mp4"))) and same["reference_rows"] == 16
        assert (tmp_path / "same" / "report" / "report.html").stat().st_size > 100_000  # Evidently's own page

        since = datetime.now(timezone.utc).isoformat()  # after every fresh record: the dark traffic alone
        dark_proc, shifted = send_and_monitor(repo, pipeline_env, state, records, dark, tmp_path / "dark", since)
    finally:
        mdsgen(["serve", "--stop", "--state-dir", str(state)], repo, pipeline_env, check=False)
    assert shifted["current_requests"] == len(list(dark.glob("*.mp4")))
    assert dark_proc.returncode == 3, dark_proc.stdout + dark_proc.stderr  # a scheduler can alert on it
    assert shifted["alert"] and shifted["drifted_share"] >= shifted["threshold"]
    # the input summaries see the darker frames (measured: the first principal component), and the sound
    # generated from them changes too
    inputs = [c for c in shifted["drifted_columns"] if c.startswith("feature_")]
    outputs = [c for c in shifted["drifted_columns"] if not c.startswith("feature_")]
    assert inputs and outputs, shifted["drifted_columns"]
    assert all(shifted["columns"][c]["score"] < 0.05 for c in inputs)  # K-S p-values
    assert f"drifted: {', '.join(shifted['drifted_columns'])}" in dark_proc.stdout

    run_id = shifted["mlflow_run_id"]
    logged = MlflowClient(pipeline_env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert logged.data.metrics["drifted_share"] == pytest.approx(shifted["drifted_share"])
    assert logged.data.tags["alert"] == "true"
    artifacts = {a.path for a in MlflowClient(pipeline_env["MLFLOW_TRACKING_URI"]).list_artifacts(run_id, "drift")}
    assert {"drift/report.html", "drift/summary.json"} <= artifacts


def test_monitor_without_traffic_or_reference_says_why(ci_repo, pipeline_env, tmp_path):
    repo, _ = ci_repo
    empty = mdsgen(["monitor", "--log", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--no-mlflow"], repo,
                   pipeline_env, check=False)
    assert empty.returncode == 2 and "no served requests" in empty.stderr
    missing = mdsgen(["monitor", "--reference", str(tmp_path), "--log", str(tmp_path), "--no-mlflow"], repo,
                     pipeline_env, check=False)
    assert missing.returncode == 2 and "no monitoring reference" in missing.stderr
