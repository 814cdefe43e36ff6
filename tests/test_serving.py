"""Serving: a real tritonserver (the nvidia-pytriton wheel's) started and stopped by `mdsgen serve`, the gRPC
client, bad requests, dynamic batching, reload under load, the champion from the registry."""
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from media import two_frames
from procs import ROOT, run

STEPS = 3  # requests ask for few steps: the tests check plumbing, not quality
SERVER_PEAK_MB = 3000  # the stated bound on the server's peak memory (VmHWM) after the hostile requests


def mdsgen(*args, cwd=ROOT, env=None, check=True):
    return run([sys.executable, "-m", "mdsgen", *args], cwd, env, check=check)


@pytest.fixture(scope="module")
def server(tmp_path_factory, untrained_checkpoint):
    """`mdsgen serve` on free ports with the untrained T checkpoint as version 1."""
    from mdsgen.serving.server import load_state

    state = tmp_path_factory.mktemp("serving")
    out = mdsgen("serve", "--model", str(untrained_checkpoint), "--ports", "0", "0", "0", "--state-dir", str(state),
                 "--monitor-log", str(state / "records"))
    assert "gRPC" in out.stdout and "version 1" in out.stdout
    try:
        yield load_state(state), state
    finally:
        mdsgen("serve", "--stop", "--state-dir", str(state), check=False)


@pytest.fixture
def client(server):
    from mdsgen.serving.client import SoundtrackClient

    c = SoundtrackClient(server[0].grpc)
    yield c
    c.close()


def test_model_configs_agree_and_hold_no_host_paths():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    def parse(path):
        text = path.read_text()
        assert "/work" not in text and "/home" not in text and "/tmp" not in text
        return text_format.Parse(text, model_config_pb2.ModelConfig())

    model_dir = ROOT / "serving" / "mdsgen"
    base = parse(model_dir / "config.pbtxt")
    assert base.backend == "python" and base.max_batch_size > 1 and base.HasField("dynamic_batching")
    assert not base.instance_group  # KIND_GPU would fail on CPU hosts; overrides set it
    for override in sorted((model_dir / "configs").glob("*.pbtxt")):
        config = parse(override)
        assert config.name == base.name and config.instance_group, override.name
        assert list(config.input) == list(base.input) and list(config.output) == list(base.output), override.name


def test_request_size_limits_are_checked_before_the_work(untrained_checkpoint, bigbuckbunny):
    """The Triton model's per-request limits (its config parameters), checked by the function it runs."""
    from mdsgen.inference.generate import VideoToAudio
    from mdsgen.serving.triton_model import RequestError, parse_request

    generator = VideoToAudio(str(untrained_checkpoint))
    limits = {"max_windows": 2, "max_video_bytes": 1000, "max_steps": 200}
    data = bigbuckbunny.read_bytes()
    video = np.array([[data]], dtype=np.object_)
    with pytest.raises(RequestError, match=rf"VIDEO: {len(data):,} bytes; this server takes at most 1,000 "
                                           r"per request \(parameter max_video_bytes\)"):
        parse_request(generator, {"VIDEO": video}, limits)
    features = np.zeros((3, 32, 1280), np.float32)
    with pytest.raises(RequestError, match=r"FEATURES: 3 windows; between 1 and 2 are served"):
        parse_request(generator, {"FEATURES": features}, limits)
    parsed, duration, _, _ = parse_request(generator, {"FEATURES": features[:2]}, limits)  # at the limit: served
    assert parsed.shape == (2, 32, 1280) and duration > 8


def test_same_seed_as_generate(server, client, untrained_checkpoint, bigbuckbunny):
    from mdsgen.inference.generate import VideoToAudio
    from mdsgen.model.diffusion import SamplingConfig

    local = VideoToAudio(str(untrained_checkpoint))
    sampling = SamplingConfig(steps=STEPS)
    want = local.soundtrack(bigbuckbunny, sampling, seed=5)
    got = client.soundtrack(bigbuckbunny, steps=STEPS, seed=5)
    assert got.sample_rate == want.sample_rate and got.model_version == "1"
    assert got.wave.shape == want.wave.shape
    np.testing.assert_allclose(got.wave, want.wave, atol=1e-4 * np.abs(want.wave).max())
    other = client.soundtrack(bigbuckbunny, steps=STEPS, seed=6)
    assert np.abs(other.wave - got.wave).max() > 1e-2  # the seed is really used
    # frame features instead of the video: the same soundtrack
    features = local.features(local.read(bigbuckbunny)).numpy()
    from_features = client.soundtrack(features=features, duration=len(want.wave) / want.sample_rate,
                                      steps=STEPS, seed=5)
    np.testing.assert_allclose(from_features.wave, want.wave, atol=1e-4 * np.abs(want.wave).max())
    # each request left a record; without a reference the input summary has no principal components
    from mdsgen.serving.monitoring import wait_for_records

    records = wait_for_records(str(server[1] / "records"), 3)
    assert len(records) >= 3 and {r["model_version"] for r in records} == {"1"}
    assert {"feature_mean", "loudness_db", "top_class"} <= set(records[0]["summary"])
    assert "feature_pc1" not in records[0]["summary"]


def test_long_video_windows_on_the_server(server, client, untrained_checkpoint, video_20s):
    from mdsgen.inference.generate import VideoToAudio
    from mdsgen.model.diffusion import SamplingConfig

    want = VideoToAudio(str(untrained_checkpoint)).soundtrack(video_20s, SamplingConfig(steps=STEPS), seed=1)
    assert want.windows == 3
    got = client.soundtrack(video_20s, steps=STEPS, seed=1)
    assert len(got.wave) == len(want.wave) == round(20.0 * want.sample_rate)
    np.testing.assert_allclose(got.wave, want.wave, atol=1e-4 * np.abs(want.wave).max())


def test_bad_requests_are_named_and_the_server_keeps_serving(server, client, bigbuckbunny, tmp_path):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from mdsgen.serving.client import SoundtrackClient

    def error_of(**request) -> str:
        with pytest.raises(InferenceServerException) as err:
            client.soundtrack(**request)
        return err.value.message()

    assert "VIDEO: empty" in error_of(video=b"")
    assert "cannot be opened as a video" in error_of(video=b"\x00garbage" * 500)
    assert error_of(video=(ROOT / "README.md").read_bytes()).startswith("VIDEO (")  # text, not a video
    assert "STEPS 100000" in error_of(video=bigbuckbunny, steps=100000)
    assert "STEPS 0" in error_of(video=bigbuckbunny, steps=0)
    assert "CFG_SCALE" in error_of(video=bigbuckbunny, cfg_scale=1e6)
    assert "CFG_SCALE" in error_of(video=bigbuckbunny, cfg_scale=float("nan"))
    assert "FEATURES: expected shape" in error_of(features=np.zeros((1, 32, 7), np.float32))
    assert "NaN" in error_of(features=np.full((1, 32, 1280), np.nan, np.float32))
    assert "exactly one of VIDEO" in error_of()
    assert "SEED -1" in error_of(video=bigbuckbunny, seed=-1)
    # files that cost far more than they look: refused by the limits, before the work
    jump = two_frames(tmp_path / "jump.mkv", 64, 64, 10 * 3600).read_bytes()  # frames 10 hours apart
    assert "past the limit of 449 s" in error_of(video=jump)
    assert "aspect ratio limit" in error_of(video=two_frames(tmp_path / "wide.mkv", 4096, 2, 0.25).read_bytes())
    # a wrong dtype or shape is refused by Triton itself, naming the input
    steps = grpcclient.InferInput("STEPS", [1, 1], "FP32")
    steps.set_data_from_numpy(np.array([[3.0]], np.float32))
    with pytest.raises(InferenceServerException, match="STEPS"):
        client.client.infer("mdsgen", [steps])
    video = grpcclient.InferInput("VIDEO", [1, 2], "BYTES")
    video.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="VIDEO"):
        client.client.infer("mdsgen", [video])
    # a bad request in the same batch as good ones fails alone
    def one(video):
        return SoundtrackClient(server[0].grpc).soundtrack(video, steps=STEPS)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, v) for v in (bigbuckbunny, b"junk" * 100, bigbuckbunny)]
        outcomes = [f.exception() for f in futures]
    assert outcomes[0] is None and outcomes[2] is None and "cannot be opened" in outcomes[1].message()
    assert client.client.is_server_ready() and client.ready()
    assert len(client.soundtrack(bigbuckbunny, steps=STEPS).wave) > 0
    # measured 1.0-1.5 GB (tritonserver + stubs, this model) over 1000 such requests (BENCHMARKS.md 6)
    assert server[0].memory_mb() < SERVER_PEAK_MB, "the server's peak memory grew past its stated bound"


def _settled_batch_sizes(server, since: dict[int, int], items: int, timeout: float = 30.0) -> dict[int, int]:
    """Triton's batch statistics once they count `items` more requests than `since` (or more, which the caller's
    assertion then reports). Triton records a batch after the backend returns, so a client can hold its answer
    before the statistics show it: CI once read the second lone request in the concurrent round (25 for 24)."""
    deadline = time.monotonic() + timeout
    while True:
        sizes = server.batch_sizes()
        counted = sum(size * (n - since.get(size, 0)) for size, n in sizes.items())
        if counted >= items or time.monotonic() > deadline:
            return sizes
        time.sleep(0.05)


def test_concurrent_requests_are_batched_and_unchanged(server, client, untrained_checkpoint, bigbuckbunny):
    from mdsgen.inference.generate import VideoToAudio
    from mdsgen.serving.client import SoundtrackClient

    local = VideoToAudio(str(untrained_checkpoint))
    features = local.features(local.read(bigbuckbunny)).numpy()
    start = server[0].batch_sizes()
    alone = {seed: client.soundtrack(features=features, steps=STEPS, seed=seed).wave for seed in (0, 1)}
    before = _settled_batch_sizes(server[0], start, items=2)

    def request(seed):
        c = SoundtrackClient(server[0].grpc)
        try:
            return seed, c.soundtrack(features=features, steps=STEPS, seed=seed).wave
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(request, [i % 2 for i in range(24)]))
    # batching with other requests changes only float rounding, which Griffin-Lim's 32 momentum iterations
    # amplify: measured ~1e-3 typically, 2.5e-2 once (which requests share a batch is up to the scheduler);
    # two seeds differ by the whole signal, so 5e-2 still tells a request served with the wrong noise
    seeds_apart = np.linalg.norm(alone[0] - alone[1]) / np.linalg.norm(alone[1])
    assert seeds_apart > 0.5, seeds_apart
    for seed, wave in results:
        error = np.linalg.norm(wave - alone[seed]) / np.linalg.norm(alone[seed])
        assert error < 5e-2, f"seed {seed}: relative error {error:.2e} against the request served alone"
    after = _settled_batch_sizes(server[0], before, items=24)
    grown = {size: after[size] - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in grown.items()) == 24, grown
    assert max(size for size, n in grown.items() if n) > 1, f"no batch larger than one: {grown}"


def test_client_folder_mode(server, tmp_path, badger):
    from media import make_video

    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "a.mp4", seconds=2.0)
    make_video(videos / "b.mp4", seconds=3.0, audio=False)
    shutil.copy(badger[0], videos / "c.png")  # a picture: its sound lasts --duration; the videos' their own length
    (videos / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    proc = mdsgen("client", str(videos), "-o", str(out), "--url", server[0].grpc, "--steps", str(STEPS),
                  "--concurrency", "3", "--duration", "4.5", check=False)
    assert proc.returncode == 1, proc.stderr  # one input failed, and says so
    assert "broken.mp4" in proc.stderr and "3 of 4 videos done" in proc.stderr
    for name, seconds in (("a", 2.0), ("b", 3.0), ("c", 4.5)):
        wave, rate = sf.read(out / f"{name}.wav")
        assert abs(len(wave) / rate - seconds) < 0.05
        import av

        with av.open(str(out / f"{name}.mp4")) as container:
            assert container.streams.video and container.streams.audio
    assert not (out / "broken.wav").exists()
    # without --url the client finds the server `mdsgen serve` recorded
    proc = mdsgen("client", str(videos / "a.mp4"), "-o", str(tmp_path / "out2"), "--state-dir",
                  str(server[1]), "--steps", str(STEPS), "--no-mux")
    assert (tmp_path / "out2" / "a.wav").is_file() and not (tmp_path / "out2" / "a.mp4").exists()


def test_the_app_finds_the_server_and_sends_it_the_variations(server, tmp_path, badger, client):
    """`mdsgen app` without a model uses the server `mdsgen serve` recorded; variations are concurrent requests
    (batched by the server); a picture's duration travels as DURATION, which a video refuses."""
    from media import make_video
    from test_app import download, start_app, stop_group, upload, wait_job
    from tritonclient.utils import InferenceServerException

    app = start_app([], tmp_path, serving={"state_dir": str(server[1])}, app={"concurrency": 2})
    try:
        code, job = upload(app, make_video(tmp_path / "clip.mp4", seconds=3.0), steps=STEPS, variations=2, seed=4)
        job = wait_job(app, job["id"])
        assert job["state"] == "done" and job["model"].endswith(f"{server[0].grpc}, model version 1"), job
        assert [r["seed"] for r in job["results"]] == [4, 5]
        picture = tmp_path / "badger.png"
        picture.write_bytes(badger[0].read_bytes())
        code, job = upload(app, picture, steps=STEPS, duration=2.5)
        job = wait_job(app, job["id"])
        wave, rate = sf.read(download(app, job, job["results"][0]["wav"], tmp_path))
        assert abs(len(wave) / rate - 2.5) < 1e-3
    finally:
        stop_group(app.process)
    with pytest.raises(InferenceServerException, match="DURATION: sets how long a picture's sound lasts"):
        client.soundtrack(tmp_path / "clip.mp4", duration=2.0, steps=STEPS)


def test_reload_keeps_in_flight_requests(server, client, bigbuckbunny, tmp_path):
    from mdsgen.config import Params
    from mdsgen.model.checkpoint import init_checkpoint, save_checkpoint
    from mdsgen.serving.client import SoundtrackClient
    from mdsgen.serving.server import load_state

    other = tmp_path / "other"
    save_checkpoint(init_checkpoint(Params(), seed=1), str(other))
    before = client.soundtrack(bigbuckbunny, steps=STEPS, seed=2)
    in_flight = {}

    def slow_request(i):
        c = SoundtrackClient(server[0].grpc)
        in_flight[i] = c.soundtrack(bigbuckbunny, steps=60, seed=2)  # long enough to span the reload
        c.close()

    threads = [threading.Thread(target=slow_request, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    proc = mdsgen("serve", "--reload", "--model", str(other), "--state-dir", str(server[1]))
    for t in threads:
        t.join()
    assert "now serving mdsgen version 2" in proc.stdout
    assert [in_flight[i].model_version for i in range(2)] == ["1", "1"]  # finished on the old version
    after = client.soundtrack(bigbuckbunny, steps=STEPS, seed=2)
    assert after.model_version == "2" and load_state(server[1]).version == 2
    assert np.abs(after.wave - before.wave).max() > 1e-2  # other weights, other sound
    assert sorted(p.name for p in (server[1] / "repository" / "mdsgen").iterdir() if p.name.isdigit()) == ["1", "2"]


@pytest.mark.slow  # starts tritonserver
def test_serve_refuses_a_second_server_and_stops_cleanly(tmp_path, untrained_checkpoint, bigbuckbunny):
    """Also: with an admin key (as serving/kserve.yaml runs it) the model-repository API answers only
    requests that carry the key; inference stays open and `mdsgen serve --reload` sends the key."""
    import os
    import re
    import urllib.error
    import urllib.request

    from mdsgen.serving.client import SoundtrackClient
    from mdsgen.serving.server import ADMIN_HEADER, RESTRICTED_APIS, load_state, versions

    kserve = (ROOT / "serving" / "kserve.yaml").read_text()
    assert re.findall(r"--(?:http-restricted-api|grpc-restricted-protocol)=([^:]+):" + ADMIN_HEADER, kserve) == \
        [RESTRICTED_APIS] * 2  # the manifest restricts what `mdsgen serve` does
    env = {**os.environ, "MDSGEN_ADMIN_KEY": "k3y-for-this-test"}
    state = tmp_path / "serving"
    mdsgen("serve", "--model", str(untrained_checkpoint), "--ports", "0", "0", "0", "--state-dir", str(state),
           "--monitor-log", "", env=env)
    server = load_state(state)
    try:
        again = mdsgen("serve", "--model", str(untrained_checkpoint), "--state-dir", str(state), check=False)
        assert again.returncode == 2 and "already running" in again.stderr
        unload = urllib.request.Request(f"{server.http}/v2/repository/models/mdsgen/unload", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(unload, timeout=30)
        assert refused.value.code in (401, 403), refused.value.code
        assert SoundtrackClient(server.grpc).soundtrack(bigbuckbunny, steps=STEPS).sample_rate == 16000
        reload = mdsgen("serve", "--reload", "--model", str(untrained_checkpoint), "--state-dir", str(state), env=env)
        assert "now serving mdsgen version 2" in reload.stdout, reload.stdout
        unkeyed = mdsgen("serve", "--reload", "--model", str(untrained_checkpoint), "--state-dir", str(state),
                         check=False)
        assert unkeyed.returncode == 2 and "refused to load version 3" in unkeyed.stderr, unkeyed.stderr
        assert versions(state / "repository") == [1, 2]  # the refused version is not left for the next start
    finally:
        stopped = mdsgen("serve", "--stop", "--state-dir", str(state))
    assert f"pid {server.pid}" in stopped.stdout and not (state / "server.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert "no server was running" in mdsgen("serve", "--stop", "--state-dir", str(state)).stdout
    reload = mdsgen("serve", "--reload", "--state-dir", str(state), check=False)
    assert reload.returncode == 2 and "no server is running" in reload.stderr


def test_export_repository_to_s3(s3_server, untrained_checkpoint):
    import boto3

    mdsgen("serve", "--export", f"{s3_server}/triton", "--model", str(untrained_checkpoint))
    bucket = s3_server.removeprefix("s3://")
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="triton/")["Contents"]}
    for key in ("triton/mdsgen/config.pbtxt", "triton/mdsgen/configs/gpu.pbtxt", "triton/mdsgen/1/model.py",
                "triton/mdsgen/1/checkpoint/config.json", "triton/mdsgen/1/checkpoint/model.safetensors"):
        assert key in keys, key


def test_served_limits_come_from_params(tmp_path, untrained_checkpoint):
    """params.yaml `serving.limits` is written into every config the repository ships (the Triton model reads
    its limits there); a limit the configs do not have, or one that is not a positive whole number, is refused
    by name and nothing is written."""
    import yaml
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serving"]["limits"] = {"max_windows": 3, "max_video_bytes": 1000}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = tmp_path / "repository"
    mdsgen("serve", "--params", str(path), "--export", str(out), "--model", str(untrained_checkpoint))
    configs = [out / "mdsgen" / "config.pbtxt", *sorted((out / "mdsgen" / "configs").glob("*.pbtxt"))]
    assert len(configs) == 3
    for config in configs:
        values = {k: v.string_value for k, v in
                  text_format.Parse(config.read_text(), model_config_pb2.ModelConfig()).parameters.items()}
        assert values["max_windows"] == "3" and values["max_video_bytes"] == "1000", config
        assert values["max_steps"] == "200", config  # not named in params.yaml: the shipped value
    for limits, message in (({"max_window": 3}, "serving.limits.max_window in params.yaml: config.pbtxt has no such"),
                            ({"max_windows": 0}, "serving.limits.max_windows in params.yaml: 0 is not a positive")):
        params["serving"]["limits"] = limits
        path.write_text(yaml.safe_dump(params))
        refused = mdsgen("serve", "--params", str(path), "--export", str(tmp_path / "refused"),
                         "--model", str(untrained_checkpoint), check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert not (tmp_path / "refused").exists()


def test_serve_the_champion(ci_repo, pipeline_env, bigbuckbunny, tmp_path):
    """The default model is the registry's champion; its registry version becomes the Triton version."""
    from mlflow import MlflowClient

    from mdsgen.serving.client import SoundtrackClient
    from mdsgen.serving.server import load_state

    repo, _ = ci_repo
    state = tmp_path / "serving"
    mdsgen("serve", "--ports", "0", "0", "0", "--state-dir", str(state), "--monitor-log", "", cwd=repo,
           env=pipeline_env)
    try:
        server = load_state(state)
        champion = MlflowClient(pipeline_env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("mdsgen", "champion")
        assert server.version == int(champion.version)
        track = SoundtrackClient(server.grpc).soundtrack(bigbuckbunny, seed=0)
        assert track.model_version == champion.version and np.isfinite(track.wave).all()
        assert "already serving" in mdsgen("serve", "--reload", "--state-dir", str(state), cwd=repo,
                                           env=pipeline_env).stdout
    finally:
        mdsgen("serve", "--stop", "--state-dir", str(state), cwd=repo, env=pipeline_env, check=False)
