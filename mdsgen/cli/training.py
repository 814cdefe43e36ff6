"""The training layer's commands: the VAE (or the mel standardiser), the denoiser, the ablation sweeps."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from mdsgen.base import storage
from mdsgen.cli.common import DATASET_DIR, add_data_dirs, step_progress, use_mlflow, write_json


def cmd_train_vae(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.model.vae import NO_VAE
    from mdsgen.training.vae_train import train_vae

    p = load_params(args.params)
    trains = not p.vae.path and p.vae.config != NO_VAE
    metrics = train_vae(storage.local_input(args.dataset), storage.local_input(args.features), args.out,
                        args.report, p.vae_train, p.audio, p.vae,
                        on_step=step_progress(p.vae_train.steps, "train-vae") if trains else None)
    write_json(args.metrics, metrics)
    print(f"VAE saved to {args.out}: val mel L1 {metrics['val_mel_l1']:.4f} "
          f"(mean-mel baseline {metrics['val_mel_l1_of_mean_mel']:.4f}), scale {metrics['scaling_factor']:.4f}")
    return 0


def cmd_train_vocoder(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.training.vocoder_train import train_vocoder

    p = load_params(args.params)
    metrics = train_vocoder(storage.local_input(args.dataset), args.out, p.vocoder_train, p.audio,
                            on_step=step_progress(p.vocoder_train.steps, "train-vocoder"))
    write_json(args.metrics, metrics)
    if metrics["fine_tuned"]:
        print(f"fine-tuned HiFi-GAN saved to {args.out}: held-out mel L1 {metrics['val_mel_l1']:.4f} "
              f"(stock {metrics['val_mel_l1_stock']:.4f})")
    else:
        print(f"vocoder_train.steps is 0: checkpoints keep the stock vocoder ({args.out} holds no weights)")
    return 0


def cmd_train(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.training.train import train

    p = load_params(args.params)
    if args.steps:
        p = replace(p, train=replace(p.train, steps=args.steps))
    metrics = train(p, storage.local_input(args.latents), storage.local_input(args.vae), args.out, args.state,
                    device=args.device,
                    on_step=step_progress(p.train.steps, "train") if os.environ.get("RANK", "0") == "0" else None,
                    vocoder_dir=storage.local_input(args.vocoder) if args.vocoder else None)
    if metrics:  # rank 0 of a torchrun job, or a single process
        write_json(args.metrics, metrics)
        print(f"trained {metrics['steps']} steps (loss {metrics['first_loss']} -> {metrics['final_loss']}); "
              f"checkpoint in {args.out}; MLflow run {metrics['mlflow_run_id']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun process skips the gloo teardown (training/train.py)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_ablate(args) -> int:
    from mdsgen.training.ablations import ARMS, run_sweep, write_report

    p = use_mlflow(args.params)
    settings = replace(p.ablations, **{k: v for k, v in (("steps", args.steps), ("seeds", args.seeds),
                                                         ("clips", args.clips)) if v is not None})
    if not args.report:
        run_sweep(p, settings, args.arms or list(ARMS), settings.seeds, storage.local_input(args.latents),
                  storage.local_input(args.vae), storage.local_input(args.dataset), storage.local_input(args.align),
                  args.device)
    write_report(settings.out, args.out)
    print(f"tables written to {args.out} from {settings.out}/runs/")
    return 0


def add_commands(sub, params: argparse.ArgumentParser) -> None:
    """Add this layer's commands to `sub`; `params` is the parent parser that gives --params."""
    p = sub.add_parser("train-vae", help="train the small mel VAE (or adopt vae.path)", parents=[params])
    add_data_dirs(p)
    p.add_argument("--out", default="models/vae")
    p.add_argument("--report", default="reports/vae", help="mels PNG and WAVs to listen to")
    p.add_argument("--metrics", default="reports/vae-metrics.json")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("train-vocoder", help="fine-tune HiFi-GAN on the training audio (vocoder_train.steps: 0 "
                                              "keeps the stock weights)", parents=[params])
    p.add_argument("dataset", nargs="?", default=DATASET_DIR)
    p.add_argument("--out", default="models/vocoder")
    p.add_argument("--metrics", default="reports/vocoder-metrics.json")
    p.set_defaults(func=cmd_train_vocoder)

    p = sub.add_parser("train", help="train the denoiser on the latent cache (resumes; torchrun for DDP)",
                       parents=[params])
    p.add_argument("latents", nargs="?", default="data/latents")
    p.add_argument("--vae", default="models/vae")
    p.add_argument("--vocoder", help="the train-vocoder folder: its fine-tuned HiFi-GAN goes into the checkpoint")
    p.add_argument("--out", default="models/mdsgen", help="the final checkpoint (EMA weights)")
    p.add_argument("--state", default="runs/train-state", help="resumable training state")
    p.add_argument("--metrics", default="reports/train-metrics.json")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ablate", help="the paper's ablations and ours: train, score and track every arm "
                                      "and seed, then write REPORT.md's tables", parents=[params])
    p.add_argument("--arms", nargs="+", help="arms to run (default: all; see mdsgen/training/ablations.py)")
    p.add_argument("--seeds", nargs="+", type=int, help="override ablations.seeds")
    p.add_argument("--steps", type=int, help="override ablations.steps (training steps of every trained arm)")
    p.add_argument("--clips", type=int, help="override ablations.clips (test clips scored)")
    p.add_argument("--report", action="store_true", help="only rewrite the tables from the saved results")
    p.add_argument("--out", default="REPORT.md")
    p.add_argument("--dataset", default=DATASET_DIR)
    p.add_argument("--latents", default="data/latents")
    p.add_argument("--vae", default="models/vae")
    p.add_argument("--align", default="models/align")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_ablate)
