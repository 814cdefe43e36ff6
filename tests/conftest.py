import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from procs import BIN, ROOT, free_port, run, stop_group, stop_group_of_pid, wait_http  # noqa: E402
# xdist workers split the cores, and so do the servers and stages they start (OMP_NUM_THREADS): two workers at 2
# threads on 2 cores took test_learning 3x as long, and a worker at 1 thread against a server at 2 broke
# test_serving's same-seed equalities (1e-4), which hold at one thread count
THREADS = max(1, min(4, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)

# The fast tier (`make test-fast`) leaves out what starts the ci pipeline, MLflow or Triton, or trains to a bar
SLOW_FIXTURES = {"ci_repo", "pipeline_env", "mlflow_server", "server", "generated", "traffic", "app"}
# The ci pipeline's run (minutes) and the MLflow server it logged to are built once per run and shared by every
# xdist worker; nothing writes into it once built (a test that changes it takes `own_ci_repo`, a copy). Its tests
# that register models or read the champion run one after another (group "pipeline"); those marked
# `reads_pipeline` leave the registry alone and run beside them (group "pipeline-readers").
PIPELINE_FIXTURES = {"ci_repo"}


def pytest_configure(config):
    # xdist hands out the groups with the most tests first unless told not to; the pipeline's must go first
    # (its build and what follows are the run's longest chain), in the order pytest_collection_modifyitems sets
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(item.fixturenames)
        if SLOW_FIXTURES & used or item.module.__name__ == "test_learning":
            item.add_marker(pytest.mark.slow)
        # `--dist loadgroup`: the pipeline's tests together; every other test with its module, whose
        # module-scoped fixtures (a Triton server, an app) then start once
        if PIPELINE_FIXTURES & used:
            group = "pipeline-readers" if item.get_closest_marker("reads_pipeline") else "pipeline"
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
    # xdist hands out groups in the order they first appear: the pipeline's builder and writers first, on one
    # worker, its readers last, to the worker that frees up first (the repo is built by then)
    rank = {"pipeline": 0, "pipeline-readers": 2}
    items.sort(key=lambda item: rank.get(item.get_closest_marker("xdist_group").args[0], 1))


def run_folder(tmp_path_factory) -> Path:
    """The folder every process of this test run shares: xdist puts each worker's basetemp one level down."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextlib.contextmanager
def once_per_run(folder: Path):
    """Held by one process at a time; yields whether `folder` still has to be built (no `done` file in it).
    A build that failed is not retried in its half-built folder: the other workers fail with its error."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait here while one builds
        try:
            if (folder / "failed").exists():
                pytest.fail(f"building {folder} failed in another worker: {(folder / 'failed').read_text()}")
            try:
                yield not (folder / "done").exists()
            except BaseException as error:
                (folder / "failed").write_text(f"{type(error).__name__}: {error}"[:2000])
                raise
            (folder / "done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_sessionfinish(session):
    """The process that ran the session (xdist's controller, or pytest itself without workers) stops the shared
    MLflow server once every worker is done with it."""
    factory = session.config._tmp_path_factory
    if hasattr(session.config, "workerinput") or factory._basetemp is None:  # a worker, or no temp folder made
        return
    pid_file = factory.getbasetemp() / "mlflow" / "pid"
    if pid_file.exists():
        stop_group_of_pid(int(pid_file.read_text()))


def pytest_collection_finish(session):
    """xdist groups by a suffix it writes into each node id; a pytest whose node ids ignore it (9.2 with
    xdist 3.8) would spread the groups silently and build the ci pipeline on every worker."""
    if session.config.getoption("loadgroup", False) and not all("@" in item.nodeid for item in session.items):
        raise pytest.UsageError("pytest-xdist did not group the tests (--dist loadgroup): use the pytest "
                                "version pyproject.toml's test extra pins, or TEST_WORKERS=0")


@pytest.fixture(scope="session")
def bigbuckbunny():
    from mdsgen.base.samples import bigbuckbunny

    return bigbuckbunny()


@pytest.fixture(scope="session")
def badger():
    from mdsgen.base.samples import tuxpaint_stamp

    return tuxpaint_stamp("animals/mammals/badger")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def video_20s(media_dir):
    from media import make_video

    return make_video(media_dir / "twenty.mp4", seconds=20.0, fps=10)


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory):
    """A T-size generator with untrained denoiser and VAE, saved as the library saves checkpoints."""
    from mdsgen.config import Params
    from mdsgen.model.checkpoint import init_checkpoint, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "untrained"
    save_checkpoint(init_checkpoint(Params(), seed=0), str(path))
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with a bucket, and the environment boto3 needs to reach it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    patch = pytest.MonkeyPatch()
    for k, v in env.items():
        patch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="mdsgen-test")
    yield "s3://mdsgen-test"
    patch.undo()
    server.stop()


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """S3 downloads land in a temporary cache, not the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MDSGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on 127.0.0.1, one for the whole run:
    the first worker to ask starts it (one gunicorn worker, job execution off, its own process group), the
    others read its address; `pytest_sessionfinish` stops it."""
    root = run_folder(tmp_path_factory) / "mlflow"
    with once_per_run(root) as first:
        if first:
            port = free_port()
            env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
            with open(root / "server.log", "w") as log:
                process = subprocess.Popen(
                    [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                     "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port",
                     str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            (root / "pid").write_text(str(process.pid))
            try:
                wait_http(f"http://127.0.0.1:{port}/health", process)
            except BaseException:
                stop_group(process)
                raise
            (root / "url").write_text(f"http://127.0.0.1:{port}")
    return (root / "url").read_text()


@pytest.fixture(scope="session")
def pipeline_env(mlflow_server):
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com", MLFLOW_TRACKING_URI=mlflow_server)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the stages call `mdsgen`
    return env


@pytest.fixture(scope="session")
def ci_repo(tmp_path_factory, pipeline_env):
    """A copy of the project (its tracked files) as a fresh git repo, `dvc repro` of the whole pipeline run
    on the ci profile against the MLflow server: built by the first worker to ask, shared by all."""
    root = run_folder(tmp_path_factory) / "pipeline"
    repo = root / "repo"
    with once_per_run(root) as first:
        if first:
            files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
            for name in files:
                if (ROOT / name).is_file():
                    (repo / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, repo / name)
            run(["git", "init", "-q"], repo)
            run([sys.executable, "-m", "mdsgen", "params", "use", "ci"], repo, pipeline_env)
            (root / "repro.log").write_text(run(["dvc", "repro"], repo, pipeline_env).stdout)
            run(["git", "add", "-A"], repo)
            run(["git", "commit", "-qm", "ci pipeline"], repo, pipeline_env)
    return repo, (root / "repro.log").read_text()


@pytest.fixture
def own_ci_repo(ci_repo, tmp_path):
    """A copy of the built ci repo (git, DVC cache and training state included) for a test that changes it:
    nothing writes into the shared repo once it is built, so the copy never races a write."""
    repo, output = ci_repo
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    return copy, output
