"""The training pipeline: data -> features -> VAE -> latents -> (alignment classifier, GPU training) ->
evaluation -> registration in MLflow with the promotion gate last. Tasks are components/ (thin calls
into mdsgen); this file only wires them and says what each task needs from the cluster."""

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kfp import dsl, kubernetes

import components

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "ghcr.io/mdsgen/mdsgen:0.1.0-cuda"


def one_line_yaml(text: str) -> str:
    """params.yaml in YAML flow style on one line: kfp copies parameter defaults into the compiled file's
    header comment, and a multi-line default would break out of it. (Not JSON: PyYAML reads JSON's
    `1e-06` as a string.)"""
    return yaml.safe_dump(yaml.safe_load(text), default_flow_style=True, width=2 ** 31, sort_keys=False).strip()


@dataclass
class ClusterOptions:
    """Compile-time settings of the cluster (they shape the Kubernetes spec, not the run)."""
    base_image: str = DEFAULT_IMAGE
    gpu_node_selector: dict = field(default_factory=dict)        # e.g. {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    gpu_tolerations: list = field(default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                              "effect": "NoSchedule"}])
    train_cpu: str = "8"
    train_memory: str = "64G"
    secret: str = "mdsgen-credentials"   # Kubernetes secret with the keys below, mapped to env variables
    secret_env: dict = field(default_factory=lambda: {k: k for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_TOKEN")})
    pvc: str = ""                        # a PersistentVolumeClaim to mount at pvc_mount (data on a PVC)
    pvc_mount: str = "/data"


def build_pipeline(options: ClusterOptions = ClusterOptions()):
    c = components.build(options.base_image)
    default_params = one_line_yaml((ROOT / "params.yaml").read_text())

    def with_secrets(task):
        # optional: a local run or a cluster without the secret still starts the task
        kubernetes.use_secret_as_env(task, secret_name=options.secret, secret_key_to_env=options.secret_env,
                                     optional=True)
        if options.pvc:
            kubernetes.mount_pvc(task, pvc_name=options.pvc, mount_path=options.pvc_mount)
        return task

    @dsl.pipeline(name="mdsgen-training", description="MDSGen: data, features, VAE, GPU training, "
                  "evaluation and registration with the promotion gate")
    def training_pipeline(profile: str = "demo", model_size: str = "T", train_steps: int = 0, num_gpus: int = 1,
                          mlflow_tracking_uri: str = "", data_uri: str = "", train_state: str = "",
                          params_yaml: str = default_params) -> str:
        params = c["resolve_params"](params_yaml=params_yaml, profile=profile, model_size=model_size,
                                     train_steps=train_steps).set_display_name("resolve params")
        data = with_secrets(c["dataset"](params=params.output, data_uri=data_uri))
        feats = c["features"](params=params.output, dataset=data.outputs["dataset"])
        vae = c["train_vae"](params=params.output, dataset=data.outputs["dataset"],
                             features=feats.outputs["features"])
        latents = c["encode"](dataset=data.outputs["dataset"], features=feats.outputs["features"],
                              vae=vae.outputs["vae"])
        align = c["train_align"](params=params.output, dataset=data.outputs["dataset"],
                                 features=feats.outputs["features"])
        vocoder = c["train_vocoder"](params=params.output, dataset=data.outputs["dataset"])
        for task in (params, data, feats, vae, latents, align, vocoder):
            task.set_caching_options(True)      # extraction: same inputs, same outputs

        train = with_secrets(c["train"](params=params.output, latents=latents.outputs["latents"],
                                        vae=vae.outputs["vae"], vocoder=vocoder.outputs["vocoder"],
                                        num_gpus=num_gpus,
                                        mlflow_tracking_uri=mlflow_tracking_uri, train_state=train_state))
        train.set_caching_options(False).set_display_name("train (GPU)")
        train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(num_gpus)
        train.set_cpu_limit(options.train_cpu).set_memory_limit(options.train_memory)
        for key, value in options.gpu_node_selector.items():
            kubernetes.add_node_selector(train, label_key=key, label_value=value)
        for toleration in options.gpu_tolerations:
            kubernetes.add_toleration(train, **toleration)

        evaluation = with_secrets(c["evaluate"](
            params=params.output, model=train.outputs["model"], align=align.outputs["align"],
            dataset=data.outputs["dataset"], latents=latents.outputs["latents"],
            mlflow_run_id=train.outputs["Output"], mlflow_tracking_uri=mlflow_tracking_uri))
        evaluation.set_caching_options(False)
        reference = c["reference"](params=params.output, model=train.outputs["model"],
                                   latents=latents.outputs["latents"])
        reference.set_caching_options(False)
        gate = with_secrets(c["register"](params=params.output, model=train.outputs["model"],
                                          evaluation=evaluation.outputs["evaluation"],
                                          reference=reference.outputs["reference"],
                                          mlflow_run_id=train.outputs["Output"],
                                          mlflow_tracking_uri=mlflow_tracking_uri))
        gate.set_caching_options(False).set_display_name("register + promotion gate")
        return gate.outputs["Output"]  # the champion's version after the gate

    return training_pipeline
