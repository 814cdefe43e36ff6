"""The `mdsgen` command, one module per layer's commands; `main` and `run_stage` (what the Kubeflow
components call) are its entry points."""
from mdsgen.cli.main import main, run_stage

__all__ = ["main", "run_stage"]
