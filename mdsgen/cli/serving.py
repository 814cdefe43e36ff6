"""The serving layer's commands: Triton, its gRPC client, the web page, monitoring."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from mdsgen.base import storage
from mdsgen.cli.common import (
    add_generation_args, read_params, report_results, resolve_model, solver_progress, use_mlflow,
    write_json
)


def cmd_serve(args) -> int:
    from mdsgen.evaluation.tracking import use_tracking
    from mdsgen.serving import server as triton  # the tritonserver process and its model repository

    p = read_params(args.params)
    settings = p.serving
    state_dir = Path(args.state_dir or settings.state_dir)
    if args.stop:
        server = triton.stop(state_dir)
        print(f"stopped tritonserver (pid {server.pid})" if server else "no server was running")
        return 0
    use_tracking(p.mlflow.tracking_uri, p.mlflow.experiment)  # the model may be a registry URI
    model, limits = args.model or settings.model, settings.limits
    if args.export:
        checkpoint, version = triton.resolve_served_model(model)
        triton.export_repository(checkpoint, args.export, version, reference=args.reference, limits=limits)
        print(f"wrote a Triton model repository with {triton.MODEL_NAME} version {version} to {args.export}")
        return 0
    if args.reload:
        server = triton.serve_again(model, state_dir, args.reference, named=bool(args.model), limits=limits)
        print(f"now serving {triton.MODEL_NAME} version {server.version}" if server else
              f"already serving {triton.MODEL_NAME} version {triton.load_state(state_dir).version}")
        return 0
    server = triton.serve(model, state_dir, args.host or settings.host, tuple(args.ports or settings.ports),
                          args.config or settings.config,
                          args.monitor_log if args.monitor_log is not None else p.monitoring.log, args.reference,
                          limits)
    print(server.endpoints())
    print(f"stop with: mdsgen serve --stop{' --state-dir ' + str(state_dir) if args.state_dir else ''}")
    return 0


def cmd_client(args) -> int:
    from mdsgen.serving.client import client_files
    from mdsgen.serving.server import load_state

    url = args.url
    if url is None:
        server = load_state(Path(args.state_dir))
        if server is None:
            raise ValueError(f"no --url and no server recorded in {args.state_dir}: start one with `mdsgen serve`")
        url = server.grpc
    with storage.staged_output(args.output) as outdir:
        results = client_files(storage.local_input(args.input), outdir, url, args.concurrency, not args.no_mux,
                               args.steps, args.cfg, args.seed, args.split, args.limit, args.duration)
    return report_results(results, f" via {url}")


def cmd_app(args) -> int:
    from mdsgen.serving.app import InProcess, ThroughServer, run_app

    p = use_mlflow(args.params)
    cfg = replace(p.app, **{k: v for k, v in (("host", args.host), ("port", args.port),
                                               ("concurrency", args.concurrency)) if v is not None})
    url = args.url
    if url is None and not (args.checkpoint or args.model):
        from mdsgen.serving.server import load_state

        server = load_state(Path(p.serving.state_dir))  # a running `mdsgen serve`, else in-process
        url = server.grpc if server is not None else None
    if url is not None:
        backend = ThroughServer(url)
    else:
        from mdsgen.inference.generate import VideoToAudio
        from mdsgen.serving.server import resolve_served_model

        uri = args.checkpoint or args.model or p.serving.model
        checkpoint, version = resolve_served_model(uri)
        label = f"{uri} (version {version})" if uri.startswith("models:/") else uri
        backend = InProcess(VideoToAudio(checkpoint, device=args.device, limits=p.generate),
                            f"{label}, in this process")
    run_app(backend, cfg)
    return 0


def cmd_reference(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.serving.monitoring import build_reference

    m = load_params(args.params).monitoring
    meta = build_reference(args.checkpoint, args.latents, args.out, m.reference_clips, m.components, m.seed,
                           on_step=solver_progress("reference"))
    print(f"monitoring reference: {meta['clips']} training clips summarised into {args.out}")
    return 0


DRIFT_ALERT = 3  # mdsgen monitor: not 1 (a crash) nor 2 (a named error), so a scheduler can tell them apart


def cmd_monitor(args) -> int:
    from mdsgen.serving import monitoring

    p = use_mlflow(args.params)
    reference = args.reference or str(Path(resolve_model(args.model, args.params)) / "monitoring")
    if not Path(reference, monitoring.REFERENCE_FILE).is_file():
        raise FileNotFoundError(f"{reference}: no monitoring reference ({monitoring.REFERENCE_FILE}); "
                                f"register the model with `--reference` or pass --reference")
    since = monitoring.parse_since(args.since) if args.since else None
    records = monitoring.read_records(args.log or p.monitoring.log, since)
    threshold = args.threshold if args.threshold is not None else p.monitoring.drift_share
    summary = monitoring.drift_report(records, reference, args.out, threshold)
    if not args.no_mlflow:
        summary["mlflow_run_id"] = monitoring.log_report(summary, args.out, p.mlflow.experiment)
        write_json(Path(args.out) / "summary.json", summary)  # where the report went, for schedulers
    print(f"{summary['current_requests']} requests against {summary['reference_rows']} reference clips: "
          f"drifted share {summary['drifted_share']:.2f} (alert at {threshold}); "
          f"drifted: {', '.join(summary['drifted_columns']) or 'none'}")
    print(f"report: {Path(args.out) / 'report.html'}, summary: {Path(args.out) / 'summary.json'}")
    return DRIFT_ALERT if summary["alert"] else 0


def add_commands(sub, params: argparse.ArgumentParser) -> None:
    """Add this layer's commands to `sub`; `params` is the parent parser that gives --params."""
    p = sub.add_parser("serve", help="serve the champion on Triton Inference Server (--reload, --stop)",
                       parents=[params])
    action = p.add_mutually_exclusive_group()
    action.add_argument("--reload", action="store_true", help="swap in the current champion without dropping requests")
    action.add_argument("--stop", action="store_true", help="stop the server (in-flight requests finish first)")
    action.add_argument("--export", metavar="DEST", help="only write a model repository to a folder or s3:// prefix")
    p.add_argument("--model", help="registry URI or checkpoint folder (default: serving.model, the champion)")
    p.add_argument("--host", help="bind address (default: serving.host, 127.0.0.1)")
    p.add_argument("--ports", type=int, nargs=3, metavar=("HTTP", "GRPC", "METRICS"), help="0 picks a free port")
    p.add_argument("--config", help="model config override from serving/mdsgen/configs/ (cpu, gpu)")
    p.add_argument("--state-dir", help="repository, server record and log (default: serving.state_dir)")
    p.add_argument("--reference",
                   help="a monitoring reference folder to serve with --model (registered models carry theirs)")
    p.add_argument("--monitor-log",
                   help="request records folder or s3:// prefix (default: monitoring.log; '' for none)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="generate through a running server (Triton gRPC)")
    add_generation_args(p)
    p.add_argument("--url", help="gRPC host:port (default: the server `mdsgen serve` started)")
    p.add_argument("--state-dir", default="runs/serving")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (the server batches them)")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("app", help="a web page to try it: upload a video or picture, watch it with its new sound",
                       parents=[params])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--url", help="a Triton server's gRPC host:port (default: the one `mdsgen serve` started, "
                                      "else the champion in this process)")
    source.add_argument("--checkpoint", help="checkpoint folder or s3:// prefix, run in this process")
    source.add_argument("--model", help="a registered model run in this process, e.g. models:/mdsgen@champion")
    p.add_argument("--host", help="bind address (default: app.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="default: app.port, 7860")
    p.add_argument("--concurrency", type=int, help="jobs generated at once; the rest queue (default: app.concurrency)")
    p.add_argument("--device", default="cpu", help="in-process device: cpu, cuda ...")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("reference", help="the monitoring reference: summaries of training clips and their outputs",
                       parents=[params])
    p.add_argument("checkpoint", nargs="?", default="models/mdsgen")
    p.add_argument("--latents", default="data/latents")
    p.add_argument("--out", default="models/reference")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("monitor",
                       help="Evidently drift report of served requests against the reference (exit 3: drift alert)",
                       parents=[params])
    p.add_argument("--since", help="30m, 12h, 7d or an ISO time (default: every record)")
    p.add_argument("--log", help="the request records: folder or s3:// prefix (default: monitoring.log)")
    p.add_argument("--model", default="models:/mdsgen@champion", help="the model whose reference to compare with")
    p.add_argument("--reference", help="a reference folder instead of the model's")
    p.add_argument("--threshold", type=float, help="drifted share that alerts (default: monitoring.drift_share)")
    p.add_argument("--out", default="reports/monitor")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    p.set_defaults(func=cmd_monitor)
