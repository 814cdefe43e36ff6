"""Serving with Triton Inference Server: write the model repository, run tritonserver, swap models.

The repository is `serving/` (config.pbtxt, configs/, the model.py stub) plus one version folder per
served registry version: `<repository>/mdsgen/<N>/{model.py, checkpoint/}`. Locally the tritonserver that
the nvidia-pytriton wheel bundles runs it (same server as the NGC 24.10 container); production runs the
same repository in that container (README: "Serve on Triton").
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mdsgen.base import storage
from mdsgen.base.errors import ServingError
from mdsgen.evaluation.registry import MONITORING_DIR

MODEL_NAME = "mdsgen"
CHECKPOINT_DIR = "checkpoint"  # inside the version folder
MONITOR_LOG_ENV = "MDSGEN_MONITOR_LOG"  # where the model appends request records (a folder or s3:// prefix)
TEMPLATE = Path(__file__).resolve().parents[2] / "serving"
KEEP_VERSIONS = 2  # the served one and the one before (still draining its requests during a reload)
# With $MDSGEN_ADMIN_KEY set, the APIs that load, unload or reconfigure models (a config override can run a
# caller's Python in the server) answer only requests with that key in this header, as serving/kserve.yaml
# sets them up; inference, health, metadata and statistics stay open.
ADMIN_KEY_ENV = "MDSGEN_ADMIN_KEY"
ADMIN_HEADER = "mdsgen-admin-key"
RESTRICTED_APIS = "model-repository,model-config,shared-memory,trace,logging"


@dataclass(frozen=True)
class ServingConfig:
    """params.yaml `serving`: what `mdsgen serve` starts and where, and the per-request limits it writes into
    the served model's config.pbtxt (none given: the shipped configs' values)."""
    host: str = "127.0.0.1"        # bind address; 0.0.0.0 only behind a network policy
    ports: tuple[int, int, int] = (8000, 8001, 8002)  # HTTP, gRPC, metrics; 0 = any free port
    config: str | None = None      # a serving/mdsgen/configs/<name>.pbtxt override (cpu, gpu)
    model: str = "models:/mdsgen@champion"
    state_dir: str = "runs/serving"
    limits: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "ports", tuple(self.ports))
        if len(self.ports) != 3:
            raise ValueError(f"serving.ports {list(self.ports)}: want three (HTTP, gRPC, metrics)")


@dataclass
class Server:
    """A running tritonserver, as `mdsgen serve` records it in <state_dir>/server.json."""
    pid: int
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str
    log: str
    version: int

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def memory_mb(self, field: str = "VmHWM") -> float:
        """`field` of /proc/PID/status summed over tritonserver and its python-backend stubs, in MB (VmHWM:
        each process's peak; VmRSS: resident now). Linux only."""
        def children(parent: int) -> list[int]:
            found = []
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:  # the process ended while we looked
                    continue
                if int(fields[1]) == parent:
                    found.append(int(stat.parent.name))
            return found

        total, todo = 0, [self.pid]
        while todo:
            current = todo.pop()
            todo.extend(children(current))
            try:
                lines = Path(f"/proc/{current}/status").read_text().splitlines()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in lines if line.startswith(field + ":"))
        return total / 1024

    def batch_sizes(self) -> dict[int, int]:
        """Triton's statistics: how many batches of each size the model has run ({size: count})."""
        with urllib.request.urlopen(f"{self.http}/v2/models/{MODEL_NAME}/stats") as response:
            stats = json.load(response)["model_stats"]
        return {b["batch_size"]: b["compute_infer"]["count"] for s in stats for b in s.get("batch_stats", [])}

    def endpoints(self) -> str:
        return (f"gRPC    {self.grpc}   (mdsgen client VIDEO --url {self.grpc})\n"
                f"HTTP    {self.http}\nmetrics http://{self.host}:{self.metrics_port}/metrics\n"
                f"model   {MODEL_NAME} version {self.version}  (repository {self.repository})\nlog     {self.log}")


# --- the model repository ---------------------------------------------------------------------------

def with_parameters(text: str, values: dict, name: str) -> str:
    """A Triton model config's text with `values` written over its same-named string parameters, each a
    positive whole number that must already be there (`name` is the file, for the error)."""
    known = re.findall(r'key:\s*"([^"]+)"', text)
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"serving.limits.{key} in params.yaml: {value!r} is not a positive whole number")
        pattern = re.compile(r'(\{\s*key:\s*"%s",\s*value:\s*\{\s*string_value:\s*")[^"]*(")' % re.escape(key))
        text, count = pattern.subn(lambda m: f"{m.group(1)}{value}{m.group(2)}", text)
        if count != 1:
            raise ValueError(f"serving.limits.{key} in params.yaml: {name} has no such parameter; "
                             f"known: {', '.join(known)}")
    return text


def write_version(repository, checkpoint: str, version: int, template: Path = TEMPLATE,
                  reference: str | None = None, limits: dict | None = None) -> Path:
    """Add version `version` (a checkpoint folder, local or s3://, and optionally its monitoring reference)
    to a local repository, with the template's configs and `limits` (params.yaml `serving.limits`) written
    into their parameters. The folder appears complete or not at all: Triton may scan at any time."""
    source = template / MODEL_NAME
    if not (source / "config.pbtxt").is_file():
        raise FileNotFoundError(f"{template}: no Triton model template ({MODEL_NAME}/config.pbtxt); it ships in "
                                "the repository's serving/ folder: install from a checkout (pip install -e .)")
    configs = {name: with_parameters((source / name).read_text(), limits or {}, name)  # all checked, then written
               for name in ["config.pbtxt", *sorted(f"configs/{p.name}" for p in (source / "configs").glob("*.pbtxt"))]}
    model_dir = Path(repository) / MODEL_NAME
    (model_dir / "configs").mkdir(parents=True, exist_ok=True)
    for name, text in configs.items():
        (model_dir / name).write_text(text)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".version-"))  # not a number: Triton ignores it
    shutil.copyfile(source / "model.py", staging / "model.py")
    shutil.copytree(storage.local_dir(checkpoint), staging / CHECKPOINT_DIR)
    if reference:
        shutil.copytree(storage.local_dir(reference), staging / CHECKPOINT_DIR / MONITORING_DIR, dirs_exist_ok=True)
    target = model_dir / str(version)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def versions(repository) -> list[int]:
    model_dir = Path(repository) / MODEL_NAME
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) if model_dir.is_dir() else []


def prune_versions(repository, keep: int = KEEP_VERSIONS) -> None:
    for old in versions(repository)[:-keep]:
        shutil.rmtree(Path(repository) / MODEL_NAME / str(old))


def export_repository(checkpoint: str, destination: str, version: int, template: Path = TEMPLATE,
                      reference: str | None = None, limits: dict | None = None) -> None:
    """A complete repository for a checkpoint at a local folder or an s3:// prefix (for the container)."""
    with tempfile.TemporaryDirectory(prefix="mdsgen-repository-") as tmp:
        write_version(tmp, checkpoint, version, template, reference, limits)
        storage.upload_dir(tmp, destination)


def resolve_served_model(uri: str, repository=None) -> tuple[str, int]:
    """(checkpoint folder, version number) for a registry URI (the registry's version number) or a
    checkpoint folder (one more than the newest version in `repository`, 1 without one)."""
    from mdsgen.evaluation.registry import resolve_checkpoint

    if uri.startswith("models:/"):
        from mlflow import MlflowClient

        name, _, ref = uri[len("models:/"):].partition("@")
        if ref:
            version = int(MlflowClient().get_model_version_by_alias(name, ref).version)
        else:
            name, _, number = uri[len("models:/"):].partition("/")
            version = int(number)
        return resolve_checkpoint(uri), version
    return uri, ((versions(repository) if repository else []) or [0])[-1] + 1


# --- the server process -----------------------------------------------------------------------------

def _wheel_server() -> tuple[Path, Path]:
    """tritonserver and its python backend from the nvidia-pytriton wheel (README, Serving)."""
    try:
        import pytriton
    except ImportError as err:
        raise ServingError("tritonserver not found: pip install nvidia-pytriton==0.7.0 (it bundles tritonserver)") from err
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root / "bin" / "tritonserver", root / "backends" / "python"


def _backend_dir(state_dir: Path, python_backend: Path) -> Path:
    """A backend folder whose python backend runs this interpreter's version of the stub."""
    stub = python_backend.parents[1] / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    target = state_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(stub / "triton_python_backend_stub", target / "triton_python_backend_stub")
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(python_backend / name)
    return target.parent


def _server_env(monitor_log: str | None) -> dict:
    """The stub must load this Python's libpython (LIBDIR) and find this environment's packages (PATH);
    the model appends request records to `monitor_log` (none when empty)."""
    import pytriton

    libs = Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env.pop(MONITOR_LOG_ENV, None)
    if monitor_log:
        env[MONITOR_LOG_ENV] = monitor_log if storage.is_s3(monitor_log) else str(Path(monitor_log).resolve())
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(repository, state_dir, host: str = "127.0.0.1", ports: tuple[int, int, int] = (8000, 8001, 8002),
          config_name: str | None = None, monitor_log: str | None = None, timeout: float = 300.0) -> Server:
    """Start tritonserver on `repository` (explicit model control, the newest version of `mdsgen` loaded),
    wait until the model is ready, record it in <state_dir>/server.json."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    current = load_state(state_dir)
    if current is not None:
        raise ServingError(f"a server is already running (pid {current.pid}, {current.grpc}): "
                           f"`mdsgen serve --reload` swaps its model, `mdsgen serve --stop` stops it")
    if not versions(repository):
        raise FileNotFoundError(f"{repository}: no version of {MODEL_NAME} to serve")
    ports = tuple(p or free_port(host) for p in ports)
    busy = [str(p) for p in ports if not _port_free(host, p)]
    if busy:
        raise ServingError(f"port {', '.join(busy)} on {host} is taken: choose others with --ports")
    binary, python_backend = _wheel_server()
    command = [str(binary), f"--model-repository={Path(repository).resolve()}",
               f"--backend-directory={_backend_dir(state_dir, python_backend)}",
               "--model-control-mode=explicit", f"--load-model={MODEL_NAME}", "--strict-readiness=true",
               f"--http-address={host}", f"--http-port={ports[0]}", f"--grpc-address={host}",
               f"--grpc-port={ports[1]}", f"--metrics-address={host}", f"--metrics-port={ports[2]}",
               "--allow-cpu-metrics=true", "--exit-timeout-secs=120"]
    if config_name:
        command.append(f"--model-config-name={config_name}")
    if os.environ.get(ADMIN_KEY_ENV):  # tritonserver takes the key only as an argument: other local users can read it
        restriction = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={os.environ[ADMIN_KEY_ENV]}"
        command += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
    log_path = state_dir / "tritonserver.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=_server_env(monitor_log), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(process.pid, host, *ports, str(Path(repository).resolve()), str(log_path),
                    versions(repository)[-1])
    deadline = time.monotonic() + timeout
    while _get(f"{server.http}/v2/models/{MODEL_NAME}/ready") != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            _terminate(process.pid)
            tail = "".join(Path(log_path).read_text(errors="replace").splitlines(True)[-15:])
            raise ServingError(f"tritonserver did not become ready (see {log_path}):\n{tail}")
        time.sleep(0.5)
    (state_dir / "server.json").write_text(json.dumps(asdict(server), indent=2))
    return server


def load_state(state_dir) -> Server | None:
    """The server recorded in <state_dir>, if its process is still alive (a stale record is removed)."""
    path = Path(state_dir) / "server.json"
    if not path.is_file():
        return None
    server = Server(**json.loads(path.read_text()))
    try:
        os.kill(server.pid, 0)
    except ProcessLookupError:
        path.unlink()
        return None
    return server


def reload(server: Server, state_dir, checkpoint: str, version: int, reference: str | None = None,
           timeout: float = 300.0, limits: dict | None = None) -> Server:
    """Serve `checkpoint` as `version`. Triton loads the new version beside the old one, routes new
    requests to it once ready, and unloads the old one after its in-flight requests finish."""
    written = write_version(server.repository, checkpoint, version, reference=reference, limits=limits)
    headers = {"Content-Type": "application/json"}
    if os.environ.get(ADMIN_KEY_ENV):
        headers[ADMIN_HEADER] = os.environ[ADMIN_KEY_ENV]
    request = urllib.request.Request(f"{server.http}/v2/repository/models/{MODEL_NAME}/load", data=b"{}",
                                     method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as err:
        shutil.rmtree(written)  # not left to be served by the next start
        raise ServingError(f"tritonserver refused to load version {version}: {err.read().decode(errors='replace')}")
    if _get(f"{server.http}/v2/models/{MODEL_NAME}/versions/{version}/ready") != 200:
        raise ServingError(f"version {version} is not ready after the load (see {server.log})")
    prune_versions(server.repository)
    server.version = version
    (Path(state_dir) / "server.json").write_text(json.dumps(asdict(server), indent=2))
    return server


def serve(model_uri: str, state_dir, host: str = "127.0.0.1", ports: tuple[int, int, int] = (8000, 8001, 8002),
          config_name: str | None = None, monitor_log: str | None = None, reference: str | None = None,
          limits: dict | None = None) -> Server:
    """Put the model that `model_uri` names in the repository under <state_dir> (older versions pruned) and
    start tritonserver on it; refused while a server recorded there is running."""
    running = load_state(state_dir)
    if running is not None:
        raise ValueError(f"a server is already running (pid {running.pid}, gRPC {running.grpc}): "
                         f"--reload swaps its model, --stop stops it")
    repository = Path(state_dir) / "repository"
    checkpoint, version = resolve_served_model(model_uri, repository)
    write_version(repository, checkpoint, version, reference=reference, limits=limits)
    prune_versions(repository)
    return start(repository, state_dir, host, ports, config_name, monitor_log)


def serve_again(model_uri: str, state_dir, reference: str | None = None, named: bool = False,
                limits: dict | None = None) -> Server | None:
    """Swap the running server's model for the one `model_uri` names; None when it already serves that
    version and the model was not `named` explicitly (a named model is always loaded again)."""
    running = load_state(state_dir)
    if running is None:
        raise ValueError(f"no server is running from {state_dir}: start one with `mdsgen serve`")
    checkpoint, version = resolve_served_model(model_uri, Path(state_dir) / "repository")
    if version == running.version and not named:
        return None
    return reload(running, state_dir, checkpoint, version, reference, limits=limits)


def _terminate(pid: int, timeout: float = 150.0) -> None:
    """SIGTERM: Triton stops taking requests, finishes the in-flight ones, then exits."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
        except ChildProcessError:
            pass
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def stop(state_dir) -> Server | None:
    server = load_state(state_dir)
    if server is not None:
        _terminate(server.pid)
        (Path(state_dir) / "server.json").unlink(missing_ok=True)
    return server
