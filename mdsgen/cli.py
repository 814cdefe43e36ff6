"""The `mdsgen` command: a thin shell over the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import storage
from .errors import CheckpointError, MediaError


def cmd_generate(args) -> int:
    from .checkpoint import load_checkpoint
    from .generate import generate_files, with_overrides

    ckpt = load_checkpoint(args.checkpoint, args.device)
    sampling = with_overrides(ckpt.sampling, steps=args.steps, cfg_scale=args.cfg)
    with storage.staged_output(args.output) as outdir:
        results = generate_files(storage.local_input(args.input), outdir, ckpt, sampling, seed=args.seed,
                                 device=args.device, batch_size=args.batch_size, mux=not args.no_mux,
                                 split=args.split, limit=args.limit)
    done = [r for r in results if not r.error]
    for r in done:
        print(f"{r.input} -> {r.wav}" + (f", {r.video}" if r.video else "") + f" ({r.seconds:.1f} s)")
    print(f"{len(done)} of {len(results)} videos done", file=sys.stderr)
    return 0 if len(done) == len(results) else 1


def cmd_models(args) -> int:
    from .model import MDSGen, PAPER_PARAMS, SIZES, config_for

    rows = []
    for size, shape in SIZES.items():
        counts = MDSGen(config_for(size, feature_dim=args.feature_dim)).parameter_counts()
        rows.append({"size": size, **shape, "feature_dim": args.feature_dim,
                     "params_inference": counts["inference"], "params_training": counts["training"],
                     "paper_params": int(PAPER_PARAMS[size]),
                     "ratio_to_paper": round(counts["inference"] / PAPER_PARAMS[size], 4)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'size':4} {'depth':>5} {'width':>5} {'heads':>5} {'inference':>12} {'training':>12} {'paper':>8}")
        for r in rows:
            print(f"{r['size']:4} {r['depth']:>5} {r['hidden_size']:>5} {r['num_heads']:>5} "
                  f"{r['params_inference'] / 1e6:>11.2f}M {r['params_training'] / 1e6:>11.2f}M "
                  f"{r['paper_params'] / 1e6:>7.0f}M")
    return 0


def cmd_init_checkpoint(args) -> int:
    from .checkpoint import init_checkpoint, save_checkpoint
    from .config import load_params

    params = load_params(args.params)
    if args.size:
        params.model["size"] = args.size
    if args.vae:
        params.vae["path"] = args.vae
    save_checkpoint(init_checkpoint(params, seed=args.seed), args.output)
    print(f"untrained checkpoint ({params.model['size']}) written to {args.output}")
    return 0


def cmd_params_use(args) -> int:
    from .config import use_profile

    use_profile(args.profile, args.params)
    print(f"{args.params}: profile {args.profile} is active")
    return 0


def cmd_dataset_build(args) -> int:
    from .config import load_params
    from .dataset import build_dataset

    with storage.staged_output(args.out) as out:
        rows = build_dataset(load_params(args.params).dataset, out)
    print(f"{len(rows)} clips in {args.out}")
    return 0


def cmd_dataset_import(args) -> int:
    from .dataset import import_vggsound

    with storage.staged_output(args.out) as out:
        rows, failures = import_vggsound(storage.local_input(args.csv), storage.local_input(args.videos), out)
    print(f"{len(rows)} clips imported into {args.out}; {len(failures)} skipped (see import_report.json)")
    return 0 if rows else 1


def cmd_features(args) -> int:
    from .config import load_params
    from .features import extract_features

    p = load_params(args.params)
    with storage.staged_output(args.out) as out:
        result = extract_features(storage.local_input(args.dataset), out, p.frame_encoder, p.audio, p.video,
                                  workers=args.workers or p.features["workers"])
    print(f"features: {result['computed']} computed, {result['reused']} reused, {result['removed']} removed, "
          f"{len(result['failed'])} failed")
    return 0


def cmd_train_vae(args) -> int:
    from .config import load_params
    from .vae_train import train_vae

    p = load_params(args.params)
    metrics = train_vae(storage.local_input(args.dataset), storage.local_input(args.features), args.out,
                        args.report, p.vae_train, p.audio, p.vae)
    Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(args.metrics).write_text(json.dumps(metrics, indent=2))
    print(f"VAE saved to {args.out}: val mel L1 {metrics['val_mel_l1']:.4f} "
          f"(mean-mel baseline {metrics['val_mel_l1_of_mean_mel']:.4f}), scale {metrics['scaling_factor']:.4f}")
    return 0


def cmd_encode(args) -> int:
    from .features import encode_latents
    from .vae import load_vae

    with storage.staged_output(args.out) as out:
        counts = encode_latents(storage.local_input(args.dataset), storage.local_input(args.features),
                                load_vae(args.vae).eval(), out)
    print("latents: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


DATASET_DIR, FEATURES_DIR = "data/dataset", "data/features"


def add_data_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", default=DATASET_DIR)
    p.add_argument("features", nargs="?", default=FEATURES_DIR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdsgen", description="Video-to-audio generation with MDSGen")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="give videos a generated soundtrack (WAV + muxed video)")
    p.add_argument("input", help="a video file, a folder of videos, or a CSV listing them")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or s3:// prefix")
    p.add_argument("--steps", type=int, help="DPM-Solver++ steps (default: the checkpoint's, 25)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=8, help="windows sampled together")
    p.add_argument("--no-mux", action="store_true", help="write only the WAV")
    p.add_argument("--split", help="with a dataset's metadata.csv: only this split (train, val, test)")
    p.add_argument("--limit", type=int, help="only the first N inputs")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list the model sizes with their parameter counts")
    p.add_argument("--json", action="store_true")
    p.add_argument("--feature-dim", type=int, default=512, help="frame feature width (CAVP 512, as the paper)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("init-checkpoint", help="write an untrained checkpoint from params.yaml")
    p.add_argument("output", help="folder or s3:// prefix")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--size", choices=["T", "S", "B", "L"])
    p.add_argument("--vae", help="a saved VAE folder to include (e.g. models/vae from train-vae)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("params", help="switch params.yaml to a profile (ci, demo)")
    p.add_argument("action", choices=["use"])
    p.add_argument("profile")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_params_use)

    dataset = sub.add_parser("dataset", help="build the embedded dataset or import VGGSound-style data")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser("build", help="render the embedded dataset from Tux Paint's pictures and recordings")
    p.add_argument("--out", default=DATASET_DIR)
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_dataset_build)
    p = dsub.add_parser("import", help="import clips listed in a VGGSound CSV")
    p.add_argument("--csv", required=True, help="youtube_id, start_seconds, label, split")
    p.add_argument("--videos", required=True, help="folder with the video files")
    p.add_argument("--out", default=DATASET_DIR)
    p.set_defaults(func=cmd_dataset_import)

    p = sub.add_parser("features", help="frame features and mels per clip (incremental)")
    p.add_argument("dataset", nargs="?", default=DATASET_DIR)
    p.add_argument("out", nargs="?", default=FEATURES_DIR)
    p.add_argument("--workers", type=int)
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train-vae", help="train the small mel VAE (or adopt vae.path)")
    add_data_dirs(p)
    p.add_argument("--out", default="models/vae")
    p.add_argument("--report", default="reports/vae", help="mels PNG and WAVs to listen to")
    p.add_argument("--metrics", default="reports/vae-metrics.json")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("encode", help="mel -> VAE latents per split, for training")
    add_data_dirs(p)
    p.add_argument("--vae", default="models/vae")
    p.add_argument("--out", default="data/latents")
    p.set_defaults(func=cmd_encode)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, MediaError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
