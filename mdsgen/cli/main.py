"""The `mdsgen` command: one parser made of each layer's commands (mdsgen/cli/LAYER.py), a thin shell
over the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mdsgen.base.errors import CheckpointError, MediaError, ServingError
from mdsgen.cli import data, evaluation, inference, model, serving, training
from mdsgen.cli.common import params_parser


def cmd_params_use(args) -> int:
    from mdsgen.config import use_profile

    use_profile(args.profile, args.params)
    print(f"{args.params}: profile {args.profile} is active")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdsgen", description="Video-to-audio generation with MDSGen")
    sub = parser.add_subparsers(dest="command", required=True)
    params = params_parser()
    for layer in (inference, serving, model, data, training, evaluation):
        layer.add_commands(sub, params)
    p = sub.add_parser("params", help="switch params.yaml to a profile (ci, demo)", parents=[params])
    p.add_argument("action", choices=["use"])
    p.add_argument("profile")
    p.set_defaults(func=cmd_params_use)
    return parser


def run_stage(argv: list[str], params_text: str | None = None, processes: int = 1) -> None:
    """Run one `mdsgen` command with the given params.yaml text (Kubeflow components are this call and
    nothing more): in this process, or under torchrun with `processes` workers; raise when it fails."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if params_text is not None:
            Path(tmp, "params.yaml").write_text(params_text)
            argv = [*argv, "--params", str(Path(tmp, "params.yaml"))]
        if processes > 1:
            code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={processes}", "-m", "mdsgen", *argv]).returncode
        else:
            code = main(argv)
    if code != 0:
        raise RuntimeError(f"mdsgen {' '.join(argv)} failed with exit code {code}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, MediaError, FileNotFoundError, ValueError, ServingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
