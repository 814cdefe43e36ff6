"""The import graph: every module imports only its own layer and those below it, and the gRPC client and
its command do not need the model's stack (torch, diffusers)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mdsgen"
# bottom to top: each layer is a folder of mdsgen/ (README "Layout"); the `mdsgen` command (cli/, one module
# per layer's commands) and config.py are the interface above them all. A module may import its own layer
# and those below it.
LAYERS = ["base", "media", "model", "data", "inference", "evaluation", "training", "serving", "interface"]
INTERFACE = {"cli", "config", "__init__", "__main__"}  # what sits at the top of mdsgen/


def layer_of(module: str) -> str:
    """'media/audio' -> 'media'; 'config' and 'cli/serving' -> 'interface'."""
    top = module.split("/")[0]
    return "interface" if top in INTERFACE else top


def modules() -> set[str]:
    """Every module as its path under mdsgen/ without .py ('media/audio', 'cli/main', 'config')."""
    return {str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py")}


def package_imports(path: Path) -> set[str]:
    """The mdsgen modules `path` imports, at the top or inside a function ('media/audio', 'config'); a name
    imported from a package that is not a module of it counts as the package's __init__."""
    known, found = modules(), set()

    def add(parts: list[str]) -> None:
        name = "/".join(parts)
        found.add(name if name in known or len(parts) < 2 else "/".join([*parts[:-1], "__init__"]))

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package imports absolutely: from mdsgen.LAYER.MODULE)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mdsgen":
            parts = node.module.split(".")[1:]
            if "/".join(parts) in known:  # from mdsgen.LAYER.MODULE import NAME
                found.add("/".join(parts))
            else:  # from mdsgen.LAYER import MODULE (or a name its __init__ defines)
                for a in node.names:
                    add([*parts, a.name])
        elif isinstance(node, ast.Import):
            found |= {"/".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("mdsgen.")}
    return found


def test_every_module_has_a_layer():
    assert {layer_of(m) for m in modules()} <= set(LAYERS)
    assert {m for m in modules() if "/" not in m} == INTERFACE - {"cli"}, "new modules go into a layer's folder"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {"interface"} | {"cli"}, "LAYERS names the folders of mdsgen/, bottom to top"


def test_modules_import_only_their_layer_and_below():
    known = modules()
    upward, unknown = [], []
    for module in sorted(known):
        for name in sorted(package_imports(PACKAGE / f"{module}.py")):
            if name not in known:
                unknown.append(f"{module} imports {name}")
            elif LAYERS.index(layer_of(name)) > LAYERS.index(layer_of(module)):
                upward.append(f"{module} imports {name}")
    assert unknown == [] and upward == []


def test_the_import_rule_sees_an_upward_import(tmp_path):  # the test above could not fail if it did not
    module = tmp_path / "metrics.py"
    module.write_text("def f():\n    from mdsgen.training.train import fit\n    from mdsgen.media import audio\n")
    assert package_imports(module) == {"training/train", "media/audio"}
    assert LAYERS.index(layer_of("training/train")) > LAYERS.index(layer_of("evaluation/metrics"))
    module.write_text("from .train import fit\n")
    with pytest.raises(AssertionError, match="relative import"):
        package_imports(module)

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


# what each DVC stage runs (cli/ and config.py are the shell around it; params.yaml is tracked as params)
STAGE_ENTRIES = {"dataset": {"data/dataset"}, "features": {"data/features"},
                 "train_vae": {"training/vae_train", "model/vae"}, "encode": {"data/features", "model/vae"},
                 "train_align": {"evaluation/align"}, "train_vocoder": {"training/vocoder_train"},
                 "train": {"training/train"},
                 "evaluate": {"evaluation/evaluate"}, "reference": {"serving/monitoring"},
                 "register": {"evaluation/registry"}}


def closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(m for m in package_imports(PACKAGE / f"{module}.py") if layer_of(m) != "interface")
    return seen


def test_every_dvc_stage_depends_on_all_the_code_it_runs():
    import yaml

    stages = yaml.safe_load((PACKAGE.parent / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRIES)
    for name, stage in stages.items():
        code = {d.removeprefix("mdsgen/").removesuffix(".py") for d in stage["deps"] if d.startswith("mdsgen/")}
        assert code == closure(STAGE_ENTRIES[name]), (name, sorted(closure(STAGE_ENTRIES[name]) ^ code))


def test_the_client_imports_without_torch():
    proc = run_blocked("from mdsgen.serving.client import SoundtrackClient, client_files\nprint('ok')")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_the_client_command_runs_without_torch():
    proc = run_blocked("import sys; sys.argv = ['mdsgen', 'client', '--help']\nfrom mdsgen.cli import main\nmain()")
    assert proc.returncode == 0, proc.stderr
    assert "--url" in proc.stdout


def test_the_blocker_blocks():  # the two tests above could not fail if it did not
    proc = run_blocked("import mdsgen.inference.generate")
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
