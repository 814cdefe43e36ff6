"""The data layer's commands: the dataset (build, copy, import), features, latents."""
from __future__ import annotations

import argparse

from mdsgen.base import storage
from mdsgen.cli.common import DATASET_DIR, FEATURES_DIR, add_data_dirs


def cmd_dataset_build(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.data.dataset import build_dataset

    with storage.staged_output(args.out) as out:
        rows = build_dataset(load_params(args.params).dataset, out)
    print(f"{len(rows)} clips in {args.out}")
    return 0


def cmd_dataset_copy(args) -> int:
    import shutil

    from mdsgen.data.dataset import read_metadata

    source = storage.local_input(args.source)
    rows = read_metadata(source)  # refuses a folder that is not a dataset
    with storage.staged_output(args.out) as out:
        shutil.copytree(source, out, dirs_exist_ok=True)
    print(f"{len(rows)} clips copied from {args.source} to {args.out}")
    return 0


def cmd_dataset_import(args) -> int:
    from mdsgen.data.dataset import import_vggsound

    with storage.staged_output(args.out) as out:
        rows, failures = import_vggsound(storage.local_input(args.csv), storage.local_input(args.videos), out)
    print(f"{len(rows)} clips imported into {args.out}; {len(failures)} skipped (see import_report.json)")
    return 0 if rows else 1


def cmd_features(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.data.features import extract_features

    p = load_params(args.params)
    with storage.staged_output(args.out) as out:
        result = extract_features(storage.local_input(args.dataset), out, p.frame_encoder, p.audio, p.video,
                                  workers=args.workers or p.features.workers)
    print(f"features: {result['computed']} computed, {result['reused']} reused, {result['removed']} removed, "
          f"{len(result['failed'])} failed")
    return 0


def cmd_encode(args) -> int:
    from mdsgen.data.features import encode_latents
    from mdsgen.model.vae import load_vae

    with storage.staged_output(args.out) as out:
        counts = encode_latents(storage.local_input(args.dataset), storage.local_input(args.features),
                                load_vae(args.vae).eval(), out)
    print("latents: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


def add_commands(sub, params: argparse.ArgumentParser) -> None:
    """Add this layer's commands to `sub`; `params` is the parent parser that gives --params."""
    dataset = sub.add_parser("dataset", help="build the embedded dataset or import VGGSound-style data")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser("build", help="render the embedded dataset from Tux Paint's pictures and recordings",
                        parents=[params])
    p.add_argument("--out", default=DATASET_DIR)
    p.set_defaults(func=cmd_dataset_build)
    p = dsub.add_parser("copy", help="copy a prepared dataset (local folder, PVC path or s3:// prefix)")
    p.add_argument("source")
    p.add_argument("--out", default=DATASET_DIR)
    p.set_defaults(func=cmd_dataset_copy)
    p = dsub.add_parser("import", help="import clips listed in a VGGSound CSV")
    p.add_argument("--csv", required=True, help="youtube_id, start_seconds, label, split")
    p.add_argument("--videos", required=True, help="folder with the video files")
    p.add_argument("--out", default=DATASET_DIR)
    p.set_defaults(func=cmd_dataset_import)

    p = sub.add_parser("features", help="frame features and mels per clip (incremental)", parents=[params])
    p.add_argument("dataset", nargs="?", default=DATASET_DIR)
    p.add_argument("out", nargs="?", default=FEATURES_DIR)
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("encode", help="mel -> VAE latents per split, for training")
    add_data_dirs(p)
    p.add_argument("--vae", default="models/vae")
    p.add_argument("--out", default="data/latents")
    p.set_defaults(func=cmd_encode)
