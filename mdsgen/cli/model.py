"""The model layer's commands: the sizes and their parameter counts, an untrained checkpoint."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace



def cmd_models(args) -> int:
    from mdsgen.model.network import MDSGen, PAPER_PARAMS, SIZES, config_for

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
    from mdsgen.config import load_params
    from mdsgen.model.checkpoint import init_checkpoint, save_checkpoint

    params = load_params(args.params)
    if args.size:
        params = replace(params, model=params.model.with_values(size=args.size))
    if args.vae:
        params = replace(params, vae=replace(params.vae, path=args.vae))
    save_checkpoint(init_checkpoint(params, seed=args.seed), args.output)
    print(f"untrained checkpoint ({params.model.size}) written to {args.output}")
    return 0


def add_commands(sub, params: argparse.ArgumentParser) -> None:
    """Add this layer's commands to `sub`; `params` is the parent parser that gives --params."""
    p = sub.add_parser("models", help="list the model sizes with their parameter counts")
    p.add_argument("--json", action="store_true")
    p.add_argument("--feature-dim", type=int, default=512, help="frame feature width (CAVP 512, as the paper)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("init-checkpoint", help="write an untrained checkpoint from params.yaml", parents=[params])
    p.add_argument("output", help="folder or s3:// prefix")
    p.add_argument("--size", choices=["T", "S", "B", "L"])
    p.add_argument("--vae", help="a saved VAE folder to include (e.g. models/vae from train-vae)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_checkpoint)
