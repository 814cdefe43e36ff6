"""The import graph: every module imports only its own layer and those below it, and the gRPC client and
its command do not need the model's stack (torch, diffusers)."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mdsgen"
# bottom to top (README "Layout"); a module may import its own layer and those below it
LAYERS = [
    ("base", {"errors", "storage", "samples"}),
    ("media", {"audio", "vocoder", "video", "files", "plots"}),
    ("model", {"model", "diffusion", "vae", "encoders", "checkpoint"}),
    ("data", {"dataset", "features"}),
    ("inference", {"generate"}),
    ("evaluation", {"metrics", "align", "evaluate", "tracking", "registry"}),
    ("training", {"train", "vae_train", "ablations"}),
    ("serving", {"serving", "client", "triton_model", "monitoring", "mlflow_model", "app"}),
    ("interface", {"config", "cli", "__main__", "__init__"}),
]
LEVEL = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}


def package_imports(path: Path) -> set[str]:
    """The mdsgen modules `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "mdsgen"):
            found |= {a.name for a in node.names} if node.module in (None, "mdsgen") else {node.module.split(".")[0]}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mdsgen."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mdsgen.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - set(LEVEL) == set(), "add new modules to LAYERS"
    assert set(LEVEL) - modules == set(), "LAYERS names modules that do not exist"


def test_modules_import_only_their_layer_and_below():
    upward = [f"{p.stem} ({LAYERS[LEVEL[p.stem]][0]}) imports {name} ({LAYERS[LEVEL[name]][0]})"
              for p in sorted(PACKAGE.glob("*.py")) for name in sorted(package_imports(p))
              if LEVEL[name] > LEVEL[p.stem]]
    assert upward == []


def test_the_import_rule_sees_an_upward_import(tmp_path):  # the test above could not fail if it did not
    module = tmp_path / "metrics.py"
    module.write_text("def f():\n    from .train import fit\n")
    assert LEVEL["train"] > LEVEL["metrics"] and package_imports(module) == {"train"}

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


# what each DVC stage runs (cli.py and config.py are the shell around it; params.yaml is tracked as params)
STAGE_ENTRIES = {"dataset": {"dataset"}, "features": {"features"}, "train_vae": {"vae_train", "vae"},
                 "encode": {"features", "vae"}, "train_align": {"align"}, "train": {"train"},
                 "evaluate": {"evaluate"}, "reference": {"monitoring"}, "register": {"registry"}}
SHELL = {"cli", "config", "__init__", "__main__"}


def closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(package_imports(PACKAGE / f"{module}.py") - SHELL)
    return seen


def test_every_dvc_stage_depends_on_all_the_code_it_runs():
    import yaml

    stages = yaml.safe_load((PACKAGE.parent / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRIES)
    for name, stage in stages.items():
        code = {Path(d).stem for d in stage["deps"] if d.startswith("mdsgen/")}
        assert code == closure(STAGE_ENTRIES[name]), (name, sorted(closure(STAGE_ENTRIES[name]) ^ code))


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
