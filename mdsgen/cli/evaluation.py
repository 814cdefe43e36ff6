"""The evaluation layer's commands: the alignment classifier, the evaluation, the registry and its gate."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mdsgen.base import storage
from mdsgen.cli.common import (
    DATASET_DIR, add_data_dirs, resolve_model, stage_progress, step_progress, training_run_id, use_mlflow,
    write_json
)


def cmd_train_align(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.evaluation.align import train_align

    p = load_params(args.params)
    metrics = train_align(storage.local_input(args.dataset), storage.local_input(args.features), args.out, p.align,
                          p.audio.hop_length / p.audio.sample_rate,
                          on_step=step_progress(p.align.steps, "train-align"))
    write_json(args.metrics, metrics)
    print(f"alignment classifier saved to {args.out}: val accuracy {metrics['val_accuracy']:.3f} "
          f"(real pairs judged aligned {metrics['val_real_judged_aligned']:.3f}, "
          f"negatives rejected {metrics['val_negatives_rejected']:.3f})")
    return 0


def cmd_evaluate(args) -> int:
    from mdsgen.evaluation.evaluate import evaluate, log_to_mlflow, markdown_table, write_report
    from mdsgen.model.checkpoint import load_checkpoint

    p = use_mlflow(args.params)
    ckpt = load_checkpoint(resolve_model(args.checkpoint or args.model, args.params), args.device)
    result = evaluate(ckpt, storage.local_input(args.dataset), storage.local_input(args.latents),
                      storage.local_input(args.align), p.evaluate, p.sampling, args.device,
                      progress=stage_progress("evaluate"))
    summary = write_report(result, args.out)
    write_json(args.metrics, summary)
    logged = log_to_mlflow(summary, args.out, training_run_id(args))
    print(markdown_table(result))
    print(f"report in {args.out}; logged to MLflow run {logged}")
    return 0


def cmd_register(args) -> int:
    from mdsgen.evaluation.registry import register

    p = use_mlflow(args.params)
    evaluation = json.loads(Path(args.evaluation).read_text())
    info = register(args.checkpoint, evaluation, p.mlflow.registered_model, training_run_id(args),
                    tags={"profile": p.profile}, reference=args.reference)
    if args.out:
        write_json(args.out, info)
    print(f"registered {info['name']} version {info['version']} as {info['alias']} ({info['model_uri']})")
    return 0


def cmd_promote(args) -> int:
    from mdsgen.evaluation.registry import promote

    p = use_mlflow(args.params)
    decision = promote(p.mlflow.registered_model, p.mlflow.gate, force=args.force)
    if args.out:
        write_json(args.out, decision)
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    print(f"{decision['name']} version {decision['challenger']}: {verdict} ({decision['reason']}); "
          f"champion is version {decision['champion']}")
    return 0


def add_commands(sub, params: argparse.ArgumentParser) -> None:
    """Add this layer's commands to `sub`; `params` is the parent parser that gives --params."""
    p = sub.add_parser("train-align", help="train the audio-visual alignment classifier used by evaluate",
                       parents=[params])
    add_data_dirs(p)
    p.add_argument("--out", default="models/align")
    p.add_argument("--metrics", default="reports/align-metrics.json")
    p.set_defaults(func=cmd_train_align)

    p = sub.add_parser("evaluate", help="score a generator and the references on the test split", parents=[params])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="models/mdsgen")
    source.add_argument("--model", help="a registered model, e.g. models:/mdsgen@champion")
    p.add_argument("--dataset", default=DATASET_DIR)
    p.add_argument("--latents", default="data/latents")
    p.add_argument("--align", default="models/align")
    p.add_argument("--out", default="reports/eval", help="report folder: table, plots, WAVs")
    p.add_argument("--metrics", default="reports/eval-metrics.json")
    p.add_argument("--train-metrics", default="reports/train-metrics.json", help="holds the MLflow run to log into")
    p.add_argument("--run-id", help="the MLflow run to log into (instead of the one in --train-metrics)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register a checkpoint in the MLflow registry as the challenger",
                       parents=[params])
    p.add_argument("checkpoint", nargs="?", default="models/mdsgen")
    p.add_argument("--evaluation", default="reports/eval-metrics.json")
    p.add_argument("--train-metrics", default="reports/train-metrics.json", help="holds the training's MLflow run")
    p.add_argument("--run-id", help="the training's MLflow run (instead of the one in --train-metrics)")
    p.add_argument("--reference", help="monitoring reference folder (mdsgen reference) to ship with the model")
    p.add_argument("--out", default="reports/registry.json")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="make the challenger the champion if it passes the gate", parents=[params])
    p.add_argument("--force", action="store_true", help="promote without the gate (logged as forced)")
    p.add_argument("--out", default="reports/promotion.json")
    p.set_defaults(func=cmd_promote)
