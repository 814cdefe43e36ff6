"""The inference layer's commands: soundtracks for videos in this process, and their mels beside the real ones."""
from __future__ import annotations

import argparse
from dataclasses import replace

from mdsgen.base import storage
from mdsgen.cli.common import add_generation_args, positive_seconds, read_params, report_results, resolve_model


def cmd_generate(args) -> int:
    from mdsgen.inference.generate import generate_files, with_overrides
    from mdsgen.model.checkpoint import load_checkpoint

    limits = read_params(args.params).generate
    if args.max_seconds is not None:
        limits = replace(limits, max_seconds=args.max_seconds)
    ckpt = load_checkpoint(resolve_model(args.checkpoint or args.model, args.params), args.device)
    sampling = with_overrides(ckpt.sampling, steps=args.steps, cfg_scale=args.cfg)
    with storage.staged_output(args.output) as outdir:
        results = generate_files(storage.local_input(args.input), outdir, ckpt, sampling, seed=args.seed,
                                 device=args.device, batch_size=args.batch_size, mux=not args.no_mux,
                                 split=args.split, limit=args.limit, still_seconds=args.duration,
                                 limits=limits)
    return report_results(results)


def cmd_compare_mels(args) -> int:
    from mdsgen.media.plots import generated_vs_real

    print(generated_vs_real(args.generated, args.originals, args.output, args.limit))
    return 0


def add_commands(sub, params: argparse.ArgumentParser) -> None:
    """Add this layer's commands to `sub`; `params` is the parent parser that gives --params."""
    p = sub.add_parser("generate", help="give videos a generated soundtrack (WAV + muxed video)", parents=[params])
    add_generation_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder or s3:// prefix")
    source.add_argument("--model", help="a registered model, e.g. models:/mdsgen@champion")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=8, help="windows sampled together")
    p.add_argument("--max-seconds", type=positive_seconds,
                   help="refuse a longer video before decoding its frames (default: params.yaml generate.max_seconds, "
                        "1800; its 4 fps grid of 224 x 224 frames is about 1 GB per 30 min)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare-mels", help="a PNG of real vs generated mels for generated WAVs and their videos")
    p.add_argument("generated", help="folder of generated <stem>.wav")
    p.add_argument("originals", help="folder of the videos <stem>.mp4 (with their real sound)")
    p.add_argument("-o", "--output", required=True, help="PNG path")
    p.add_argument("--limit", type=int, default=8)
    p.set_defaults(func=cmd_compare_mels)
