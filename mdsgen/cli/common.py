"""What the commands share: the --params parent parser, model URIs, MLflow, JSON outputs, progress."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def params_parser() -> argparse.ArgumentParser:
    """The parent parser of every command that reads params.yaml."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--params", default="params.yaml", help="the settings file (default: params.yaml)")
    return parent


DATASET_DIR, FEATURES_DIR = "data/dataset", "data/features"


def write_json(path, values: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(values, indent=2) + "\n")


def resolve_model(uri: str, params_path: str = "params.yaml") -> str:
    """A checkpoint folder for a checkpoint URI or a `models:/name@alias` registry URI."""
    if not uri.startswith(("models:/", "runs:/")):
        return uri
    from mdsgen.evaluation.registry import resolve_checkpoint

    use_mlflow(params_path)
    return resolve_checkpoint(uri)


def read_params(params_path: str):
    """params.yaml if it is there, else the defaults (commands that run outside a project)."""
    from mdsgen.config import Params, load_params

    return load_params(params_path) if Path(params_path).is_file() else Params()


def use_mlflow(params_path: str):
    from mdsgen.evaluation.tracking import use_tracking

    p = read_params(params_path)
    use_tracking(p.mlflow.tracking_uri, p.mlflow.experiment)
    return p


def training_run_id(args) -> str | None:
    """The MLflow run to log evaluation and model into: `--run-id`, else the one `mdsgen train` recorded in
    its metrics file (`--train-metrics`)."""
    if args.run_id:
        return args.run_id
    if not args.train_metrics or not Path(args.train_metrics).is_file():
        return None
    return json.loads(Path(args.train_metrics).read_text())["mlflow_run_id"]


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def log_numbers(values: dict, metrics) -> dict:
    """The numbers of a stage's metrics JSON into a Kubeflow Metrics artifact (anything with `log_metric`)."""
    for key, value in values.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    return values


def report_results(results, where: str = "") -> int:
    """One line per finished input, a count on stderr; exit 1 when any input failed (each said why)."""
    done = [r for r in results if not r.error]
    for r in done:
        print(f"{r.input} -> {r.wav}" + (f", {r.video}" if r.video else "") + f" ({r.seconds:.1f} s)")
    print(f"{len(done)} of {len(results)} videos done{where}", file=sys.stderr)
    return 0 if len(done) == len(results) else 1


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """What `generate` and `client` share: the inputs, the output folder, the sampling overrides."""
    p.add_argument("input", help="a video or picture file, a folder of them, or a CSV listing them")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's sampling settings)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, help="seconds of sound for a still image (default: one window)")
    p.add_argument("--no-mux", action="store_true", help="write only the WAV")
    p.add_argument("--split", help="with a dataset's metadata.csv: only this split (train, val, test)")
    p.add_argument("--limit", type=int, help="only the first N inputs")


def step_progress(total: int, desc: str):
    """An `on_step(step, values)` callback drawing a tqdm bar with the latest losses and steps/s (on a
    terminal; elsewhere, e.g. in a log file, an update at most every 30 s)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", mininterval=0.5 if sys.stderr.isatty() else 30)

    def on_step(step: int, values: dict) -> None:
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k.startswith("loss") or k == "l1"}, refresh=False)
        if step >= total:
            bar.close()
    return on_step


def solver_progress(desc: str):
    """An `on_step(done, total)` callback drawing a tqdm bar over sampling solver steps (on a terminal; in
    a log file, an update at most every 30 s)."""
    from tqdm import tqdm

    bar = None

    def on_step(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", mininterval=0.5 if sys.stderr.isatty() else 30)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return on_step


def stage_progress(desc: str):
    """A `progress(stage)` callback printing each stage with the seconds since the first (to stderr)."""
    start = time.perf_counter()

    def progress(stage: str) -> None:
        print(f"{desc} [{time.perf_counter() - start:6.1f} s] {stage}", file=sys.stderr, flush=True)
    return progress


def add_data_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", default=DATASET_DIR)
    p.add_argument("features", nargs="?", default=FEATURES_DIR)
