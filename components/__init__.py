"""Kubeflow Pipelines (kfp v2) components: one per pipeline stage, each a thin call into `mdsgen`.

Every component receives the resolved params.yaml text (see `resolve_params`), runs the same `mdsgen`
command a DVC stage runs (`mdsgen.cli.run_stage`), and passes data as typed artifacts: folders for
Dataset and Model artifacts, Metrics for numbers, Markdown for the evaluation table and the promotion
decision. Imports live inside the functions because kfp ships each function's source to its task.

The functions are plain Python here; `build(base_image)` turns them into components that run on the
project image (Dockerfile) without installing kfp at run time.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def resolve_params(params_yaml: str, profile: str, model_size: str, train_steps: int) -> str:
    """params.yaml with the profile applied and the pipeline's overrides set (0 / "" keep the profile's)."""
    from mdsgen.config import resolve_params as resolve

    overrides = {}
    if model_size:
        overrides["model.size"] = model_size
    if train_steps:
        overrides["train.steps"] = train_steps
    return resolve(params_yaml, profile, overrides)


def dataset(params: str, data_uri: str, dataset: Output[Dataset]):
    """Render the embedded dataset, or copy a prepared one (local/PVC path or s3:// prefix)."""
    from mdsgen.cli import run_stage

    if data_uri:
        run_stage(["dataset", "copy", data_uri, "--out", dataset.path])
    else:
        run_stage(["dataset", "build", "--out", dataset.path], params)


def features(params: str, dataset: Input[Dataset], features: Output[Dataset]):
    from mdsgen.cli import run_stage

    run_stage(["features", dataset.path, features.path], params)


def train_vae(params: str, dataset: Input[Dataset], features: Input[Dataset], vae: Output[Model],
              metrics: Output[Metrics]):
    import json
    import os
    import tempfile

    from mdsgen.cli import run_stage
    from mdsgen.cli.common import log_numbers

    out = os.path.join(tempfile.mkdtemp(), "vae-metrics.json")
    run_stage(["train-vae", dataset.path, features.path, "--out", vae.path, "--report",
               os.path.join(tempfile.mkdtemp(), "report"), "--metrics", out], params)
    log_numbers(json.load(open(out)), metrics)


def encode(dataset: Input[Dataset], features: Input[Dataset], vae: Input[Model], latents: Output[Dataset]):
    from mdsgen.cli import run_stage

    run_stage(["encode", dataset.path, features.path, "--vae", vae.path, "--out", latents.path])


def train_align(params: str, dataset: Input[Dataset], features: Input[Dataset], align: Output[Model],
                metrics: Output[Metrics]):
    import json
    import os
    import tempfile

    from mdsgen.cli import run_stage
    from mdsgen.cli.common import log_numbers

    out = os.path.join(tempfile.mkdtemp(), "align-metrics.json")
    run_stage(["train-align", dataset.path, features.path, "--out", align.path, "--metrics", out], params)
    log_numbers(json.load(open(out)), metrics)


def train_vocoder(params: str, dataset: Input[Dataset], vocoder: Output[Model], metrics: Output[Metrics]):
    import json
    import os
    import tempfile

    from mdsgen.cli import run_stage
    from mdsgen.cli.common import log_numbers

    out = os.path.join(tempfile.mkdtemp(), "vocoder-metrics.json")
    run_stage(["train-vocoder", dataset.path, "--out", vocoder.path, "--metrics", out], params)
    log_numbers(json.load(open(out)), metrics)


def train(params: str, latents: Input[Dataset], vae: Input[Model], vocoder: Input[Model], num_gpus: int,
          mlflow_tracking_uri: str, train_state: str, model: Output[Model], metrics: Output[Metrics]) -> str:
    """The denoiser; with num_gpus > 1 (and that many visible) torchrun runs one DDP process per GPU in this
    pod. Returns the MLflow run id, so evaluation and registration log into the same run.

    `train_state`: a folder on a mounted volume (the pipeline's PVC) for the resumable training state, so a
    pod that is restarted resumes where the last one saved; empty: a temporary folder (a restart starts over)."""
    import json
    import os
    import tempfile

    import torch

    from mdsgen.cli import run_stage
    from mdsgen.cli.common import log_numbers

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    if train_state.startswith("s3://"):
        raise ValueError(f"train_state {train_state}: give a folder on a mounted volume (the pipeline's PVC); "
                         "the state is written every checkpoint_every steps and must survive the pod")
    work = tempfile.mkdtemp()
    if not train_state:
        print("train_state is empty: the training state lives in this pod only; a restarted pod starts over")
    processes = num_gpus if num_gpus > 1 and torch.cuda.device_count() >= num_gpus else 1
    run_stage(["train", latents.path, "--vae", vae.path, "--vocoder", vocoder.path, "--out", model.path, "--state",
               train_state or os.path.join(work, "state"), "--metrics", os.path.join(work, "train-metrics.json")],
              params, processes=processes)
    return log_numbers(json.load(open(os.path.join(work, "train-metrics.json"))), metrics)["mlflow_run_id"]


def evaluate(params: str, model: Input[Model], align: Input[Model], dataset: Input[Dataset],
             latents: Input[Dataset], mlflow_run_id: str, mlflow_tracking_uri: str, evaluation: Output[Dataset],
             metrics: Output[Metrics], table: Output[Markdown]):
    """Evaluation report folder (metrics.json inside), the model's metrics, and the table as Markdown."""
    import json
    import os

    from mdsgen.cli import run_stage
    from mdsgen.cli.common import log_numbers

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    summary = os.path.join(evaluation.path, "metrics.json")
    run_stage(["evaluate", "--checkpoint", model.path, "--align", align.path, "--dataset", dataset.path,
               "--latents", latents.path, "--out", evaluation.path, "--metrics", summary,
               "--run-id", mlflow_run_id], params)
    log_numbers(json.load(open(summary))["systems"]["model"], metrics)
    with open(table.path, "w") as f:
        f.write(open(os.path.join(evaluation.path, "table.md")).read())


def reference(params: str, model: Input[Model], latents: Input[Dataset], reference: Output[Dataset]):
    """The monitoring reference: summaries of training clips and of the model's outputs for them."""
    from mdsgen.cli import run_stage

    run_stage(["reference", model.path, "--latents", latents.path, "--out", reference.path], params)


def register(params: str, model: Input[Model], evaluation: Input[Dataset], reference: Input[Dataset],
             mlflow_run_id: str, mlflow_tracking_uri: str, decision: Output[Markdown]) -> str:
    """Register as challenger, then the promotion gate; returns the champion's version."""
    import json
    import os
    import tempfile

    from mdsgen.cli import run_stage

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    work = tempfile.mkdtemp()
    run_stage(["register", model.path, "--evaluation", os.path.join(evaluation.path, "metrics.json"),
               "--run-id", mlflow_run_id, "--reference", reference.path, "--out",
               os.path.join(work, "registry.json")], params)
    run_stage(["promote", "--out", os.path.join(work, "promotion.json")], params)
    result = json.load(open(os.path.join(work, "promotion.json")))
    with open(decision.path, "w") as f:
        f.write(f"# Promotion\n\nChallenger version {result['challenger']}: "
                f"{'promoted' if result['promoted'] else 'not promoted'} ({result['reason']}). "
                f"Champion: version {result['champion']}.\n")
    return str(result["champion"])


STAGES = (resolve_params, dataset, features, train_vae, encode, train_align, train_vocoder, train, evaluate, reference,
          register)


def build(base_image: str) -> dict:
    """The components, by name, running on `base_image` (which has mdsgen and kfp installed)."""
    return {fn.__name__: dsl.component(fn, base_image=base_image, install_kfp_package=False) for fn in STAGES}
