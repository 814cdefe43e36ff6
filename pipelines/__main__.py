"""python -m pipelines compile | run-local | submit

    compile     write the pipeline YAML (IR) for a cluster
    run-local   run the whole pipeline on this machine with kfp's SubprocessRunner (tasks in this venv)
    submit      send the compiled pipeline to a Kubeflow Pipelines API and print the run id
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipelines.training import DEFAULT_IMAGE, ClusterOptions, build_pipeline, one_line_yaml


def pipeline_arguments(args) -> dict:
    values = {"profile": args.profile, "model_size": args.model_size, "train_steps": args.steps,
              "num_gpus": args.gpus, "mlflow_tracking_uri": args.mlflow_tracking_uri or "", "data_uri": args.data_uri,
              "train_state": args.train_state}
    if args.params:
        values["params_yaml"] = one_line_yaml(Path(args.params).read_text())
    return values


def options_from(args) -> ClusterOptions:
    selector = dict(item.split("=", 1) for item in args.node_selector or [])
    return ClusterOptions(base_image=args.image, gpu_node_selector=selector, pvc=args.pvc or "",
                          train_cpu=args.train_cpu, train_memory=args.train_memory)


def compile_pipeline(args) -> Path:
    from kfp import compiler

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options_from(args)), str(out))
    return out


def cmd_compile(args) -> int:
    print(f"pipeline written to {compile_pipeline(args)}")
    return 0


def cmd_run_local(args) -> int:
    from kfp import local

    root = Path(args.pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    start = time.perf_counter()
    run = build_pipeline(options_from(args))(**pipeline_arguments(args))
    print(json.dumps({"pipeline_root": str(root), "seconds": round(time.perf_counter() - start, 1),
                      "champion_version": run.output if hasattr(run, "output") else None}))
    return 0


def cmd_submit(args) -> int:
    import kfp

    package = compile_pipeline(args)
    client = kfp.Client(host=args.host, namespace=args.namespace)
    result = client.create_run_from_pipeline_package(
        str(package), arguments=pipeline_arguments(args), run_name=args.run_name,
        experiment_name=args.experiment, enable_caching=True)
    print(result.run_id)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("compile", cmd_compile), ("run-local", cmd_run_local), ("submit", cmd_submit)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--profile", default="demo", help="params.yaml profile (ci, demo)")
        p.add_argument("--model-size", default="T", choices=["T", "S", "B", "L"])
        p.add_argument("--steps", type=int, default=0, help="training steps (0: the profile's)")
        p.add_argument("--gpus", type=int, default=1, help="GPUs for the training task (torchrun when > 1)")
        p.add_argument("--mlflow-tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
        p.add_argument("--data-uri", default="", help="a prepared dataset (s3:// prefix or PVC path); "
                                                      "empty: render the embedded one")
        p.add_argument("--train-state", default="", help="a folder on the mounted PVC for the resumable training "
                                                         "state (e.g. /data/train-state); empty: a restarted pod starts over")
        p.add_argument("--params", help="a params.yaml to send (default: the one compiled in)")
        p.add_argument("--image", default=DEFAULT_IMAGE, help="the project image the tasks run on")
        p.add_argument("--node-selector", action="append", help="KEY=VALUE for the GPU training task")
        p.add_argument("--pvc", help="PersistentVolumeClaim to mount at /data")
        p.add_argument("--train-cpu", default="8")
        p.add_argument("--train-memory", default="64G")
        p.add_argument("--output", default="pipelines/mdsgen-training.yaml", help="compiled YAML")
    sub.choices["run-local"].add_argument("--pipeline-root", default="runs/kfp")
    sub.choices["submit"].add_argument("--host", required=True, help="Kubeflow Pipelines API URL")
    sub.choices["submit"].add_argument("--namespace")
    sub.choices["submit"].add_argument("--experiment", default="mdsgen")
    sub.choices["submit"].add_argument("--run-name", default="mdsgen-training")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
