"""Running commands and real servers from tests."""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, cwd, env=None, check=True, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def _end_group(pid: int, alive) -> None:
    """SIGTERM to the process group led by `pid`; SIGKILL if `alive()` still holds 20 s later."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not alive():
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_group(process: subprocess.Popen) -> None:
    """Stop a server this process started with start_new_session=True, workers included."""
    _end_group(process.pid, lambda: process.poll() is None)
    process.wait()


def stop_group_of_pid(pid: int) -> None:
    """Stop a server another process started with start_new_session=True (its pid read from a file): it is
    gone when its process group is."""
    def alive() -> bool:
        try:
            os.waitpid(pid, os.WNOHANG)  # reaps it where it is this process's child
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        return True

    _end_group(pid, alive)


def digests(folder: Path) -> dict:
    """Each file under `folder` (relative path) -> its md5."""
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
