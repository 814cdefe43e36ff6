"""The import graph: the gRPC client and its command must not need the model's stack (torch, diffusers)."""
import subprocess
import sys

BLOCK_HEAVY = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'mlflow', 'torchaudio'}:
            raise ImportError(f'{name} is blocked: the client must not import it')
sys.meta_path.insert(0, Blocked())
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_HEAVY + code], capture_output=True, text=True, timeout=120)


def test_the_client_imports_without_torch():
    proc = run_blocked("from mdsgen.client import SoundtrackClient, client_files\nprint('ok')")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_the_client_command_runs_without_torch():
    proc = run_blocked("import sys; sys.argv = ['mdsgen', 'client', '--help']\nfrom mdsgen.cli import main\nmain()")
    assert proc.returncode == 0, proc.stderr
    assert "--url" in proc.stdout


def test_the_blocker_blocks():  # the two tests above could not fail if it did not
    proc = run_blocked("import mdsgen.generate")
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
