"""The `mdsgen` command: a thin shell over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from mdsgen.base import storage
from mdsgen.base.errors import CheckpointError, MediaError, ServingError


def write_json(path, values: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(values, indent=2) + "\n")


def resolve_model(uri: str, params_path: str = "params.yaml") -> str:
    """A checkpoint folder for a checkpoint URI or a `models:/name@alias` registry URI."""
    if not uri.startswith(("models:/", "runs:/")):
        return uri
    from mdsgen.evaluation.registry import resolve_checkpoint

    use_mlflow(params_path)
    return resolve_checkpoint(uri)


def use_mlflow(params_path: str):
    from mdsgen.config import Params, load_params
    from mdsgen.evaluation.tracking import use_tracking

    p = load_params(params_path) if Path(params_path).is_file() else Params()
    use_tracking(p.mlflow["tracking_uri"], p.mlflow["experiment"])
    return p


def training_run_id(args) -> str | None:
    """The MLflow run to log evaluation and model into: `--run-id`, else the one `mdsgen train` recorded in
    its metrics file (`--train-metrics`)."""
    if args.run_id:
        return args.run_id
    if not args.train_metrics or not Path(args.train_metrics).is_file():
        return None
    return json.loads(Path(args.train_metrics).read_text())["mlflow_run_id"]


def log_numbers(values: dict, metrics) -> dict:
    """The numbers of a stage's metrics JSON into a Kubeflow Metrics artifact (anything with `log_metric`)."""
    for key, value in values.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    return values


def report_results(results, where: str = "") -> int:
    """One line per finished input, a count on stderr; exit 1 when any input failed (each said why)."""
    done = [r for r in results if not r.error]
    for r in done:
        print(f"{r.input} -> {r.wav}" + (f", {r.video}" if r.video else "") + f" ({r.seconds:.1f} s)")
    print(f"{len(done)} of {len(results)} videos done{where}", file=sys.stderr)
    return 0 if len(done) == len(results) else 1


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """What `generate` and `client` share: the inputs, the output folder, the sampling overrides."""
    p.add_argument("input", help="a video or picture file, a folder of them, or a CSV listing them")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's sampling settings)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mux", action="store_true", help="write only the WAV")
    p.add_argument("--split", help="with a dataset's metadata.csv: only this split (train, val, test)")
    p.add_argument("--limit", type=int, help="only the first N inputs")


def cmd_generate(args) -> int:
    from mdsgen.inference.generate import generate_files, with_overrides
    from mdsgen.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(resolve_model(args.checkpoint or args.model, args.params), args.device)
    sampling = with_overrides(ckpt.sampling, steps=args.steps, cfg_scale=args.cfg)
    with storage.staged_output(args.output) as outdir:
        results = generate_files(storage.local_input(args.input), outdir, ckpt, sampling, seed=args.seed,
                                 device=args.device, batch_size=args.batch_size, mux=not args.no_mux,
                                 split=args.split, limit=args.limit, still_seconds=args.duration)
    return report_results(results)


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
        params.model["size"] = args.size
    if args.vae:
        params.vae["path"] = args.vae
    save_checkpoint(init_checkpoint(params, seed=args.seed), args.output)
    print(f"untrained checkpoint ({params.model['size']}) written to {args.output}")
    return 0


def cmd_params_use(args) -> int:
    from mdsgen.config import use_profile

    use_profile(args.profile, args.params)
    print(f"{args.params}: profile {args.profile} is active")
    return 0


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
                                  workers=args.workers or p.features["workers"])
    print(f"features: {result['computed']} computed, {result['reused']} reused, {result['removed']} removed, "
          f"{len(result['failed'])} failed")
    return 0


def cmd_train_vae(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.model.vae import NO_VAE
    from mdsgen.training.vae_train import train_vae

    p = load_params(args.params)
    trains = not p.vae.get("path") and p.vae.get("config") != NO_VAE
    metrics = train_vae(storage.local_input(args.dataset), storage.local_input(args.features), args.out,
                        args.report, p.vae_train, p.audio, p.vae,
                        on_step=step_progress(p.vae_train.steps, "train-vae") if trains else None)
    write_json(args.metrics, metrics)
    print(f"VAE saved to {args.out}: val mel L1 {metrics['val_mel_l1']:.4f} "
          f"(mean-mel baseline {metrics['val_mel_l1_of_mean_mel']:.4f}), scale {metrics['scaling_factor']:.4f}")
    return 0


def cmd_encode(args) -> int:
    from mdsgen.data.features import encode_latents
    from mdsgen.model.vae import load_vae

    with storage.staged_output(args.out) as out:
        counts = encode_latents(storage.local_input(args.dataset), storage.local_input(args.features),
                                load_vae(args.vae).eval(), out)
    print("latents: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


def step_progress(total: int, desc: str):
    """An `on_step(step, values)` callback drawing a tqdm bar with the latest losses and steps/s (on a
    terminal; elsewhere, e.g. in a log file, an update at most every 30 s)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", mininterval=0.5 if sys.stderr.isatty() else 30)

    def on_step(step: int, values: dict) -> None:
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k.startswith("loss") or k == "l1"}, refresh=False)
        if step >= total:
            bar.close()
    return on_step


def solver_progress(desc: str):
    """An `on_step(done, total)` callback drawing a tqdm bar over sampling solver steps (on a terminal; in
    a log file, an update at most every 30 s)."""
    from tqdm import tqdm

    bar = None

    def on_step(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", mininterval=0.5 if sys.stderr.isatty() else 30)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return on_step


def stage_progress(desc: str):
    """A `progress(stage)` callback printing each stage with the seconds since the first (to stderr)."""
    start = time.perf_counter()

    def progress(stage: str) -> None:
        print(f"{desc} [{time.perf_counter() - start:6.1f} s] {stage}", file=sys.stderr, flush=True)
    return progress


def cmd_train(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.training.train import train

    p = load_params(args.params)
    if args.steps:
        p.train = replace(p.train, steps=args.steps)
    metrics = train(p, storage.local_input(args.latents), storage.local_input(args.vae), args.out, args.state,
                    device=args.device,
                    on_step=step_progress(p.train.steps, "train") if os.environ.get("RANK", "0") == "0" else None)
    if metrics:  # rank 0 of a torchrun job, or a single process
        write_json(args.metrics, metrics)
        print(f"trained {metrics['steps']} steps (loss {metrics['first_loss']} -> {metrics['final_loss']}); "
              f"checkpoint in {args.out}; MLflow run {metrics['mlflow_run_id']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun process: skip the gloo teardown (mdsgen/training/train.py)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_train_align(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.evaluation.align import train_align

    p = load_params(args.params)
    metrics = train_align(storage.local_input(args.dataset), storage.local_input(args.features), args.out, p.align,
                          p.audio.hop_length / p.audio.sample_rate,
                          on_step=step_progress(p.align["steps"], "train-align"))
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


def cmd_ablate(args) -> int:
    from mdsgen.training.ablations import ARMS, run_sweep, write_report

    p = use_mlflow(args.params)
    settings = dict(p.ablations, **{k: v for k, v in (("steps", args.steps), ("seeds", args.seeds),
                                                      ("clips", args.clips)) if v is not None})
    if not args.report:
        run_sweep(p, settings, args.arms or list(ARMS), settings["seeds"], storage.local_input(args.latents),
                  storage.local_input(args.vae), storage.local_input(args.dataset), storage.local_input(args.align),
                  args.device)
    write_report(settings["out"], args.out)
    print(f"tables written to {args.out} from {settings['out']}/runs/")
    return 0


def cmd_register(args) -> int:
    from mdsgen.evaluation.registry import register

    p = use_mlflow(args.params)
    evaluation = json.loads(Path(args.evaluation).read_text())
    info = register(args.checkpoint, evaluation, p.mlflow["registered_model"], training_run_id(args),
                    tags={"profile": p.profile}, reference=args.reference)
    if args.out:
        write_json(args.out, info)
    print(f"registered {info['name']} version {info['version']} as {info['alias']} ({info['model_uri']})")
    return 0


def cmd_promote(args) -> int:
    from mdsgen.evaluation.registry import promote

    p = use_mlflow(args.params)
    decision = promote(p.mlflow["registered_model"], p.mlflow["gate"], force=args.force)
    if args.out:
        write_json(args.out, decision)
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    print(f"{decision['name']} version {decision['challenger']}: {verdict} ({decision['reason']}); "
          f"champion is version {decision['champion']}")
    return 0


def cmd_serve(args) -> int:
    from mdsgen.serving import server as triton  # the tritonserver process and its model repository

    p = use_mlflow(args.params)
    settings = p.serving
    state_dir = Path(args.state_dir or settings["state_dir"])
    repository = state_dir / "repository"
    if args.stop:
        server = triton.stop(state_dir)
        print(f"stopped tritonserver (pid {server.pid})" if server else "no server was running")
        return 0
    if args.export:
        checkpoint, version = triton.resolve_served_model(args.model or settings["model"])
        triton.export_repository(checkpoint, args.export, version, reference=args.reference)
        print(f"wrote a Triton model repository with {triton.MODEL_NAME} version {version} to {args.export}")
        return 0
    running = triton.load_state(state_dir)
    if args.reload:
        if running is None:
            raise ValueError(f"no server is running from {state_dir}: start one with `mdsgen serve`")
        checkpoint, version = triton.resolve_served_model(args.model or settings["model"], repository)
        if version == running.version and not args.model:
            print(f"already serving {triton.MODEL_NAME} version {version}")
            return 0
        server = triton.reload(running, state_dir, checkpoint, version, args.reference)
        print(f"now serving {triton.MODEL_NAME} version {server.version}")
        return 0
    if running is not None:
        raise ValueError(f"a server is already running (pid {running.pid}, gRPC {running.grpc}): "
                         f"--reload swaps its model, --stop stops it")
    checkpoint, version = triton.resolve_served_model(args.model or settings["model"], repository)
    triton.write_version(repository, checkpoint, version, reference=args.reference)
    triton.prune_versions(repository)
    ports = tuple(args.ports or settings["ports"])
    monitor_log = args.monitor_log if args.monitor_log is not None else p.monitoring["log"]
    server = triton.start(repository, state_dir, args.host or settings["host"], ports,
                           args.config or settings["config"], monitor_log)
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
                               args.steps, args.cfg, args.seed, args.split, args.limit)
    return report_results(results, f" via {url}")


def cmd_app(args) -> int:
    from mdsgen.serving.app import InProcess, ThroughServer, run_app

    p = use_mlflow(args.params)
    cfg = replace(p.app, **{k: v for k, v in (("host", args.host), ("port", args.port),
                                               ("concurrency", args.concurrency)) if v is not None})
    url = args.url
    if url is None and not (args.checkpoint or args.model):
        from mdsgen.serving.server import load_state

        server = load_state(Path(p.serving["state_dir"]))  # a running `mdsgen serve`, else in-process
        url = server.grpc if server is not None else None
    if url is not None:
        backend = ThroughServer(url)
    else:
        from mdsgen.inference.generate import VideoToAudio
        from mdsgen.serving.server import resolve_served_model

        uri = args.checkpoint or args.model or p.serving["model"]
        checkpoint, version = resolve_served_model(uri)
        label = f"{uri} (version {version})" if uri.startswith("models:/") else uri
        backend = InProcess(VideoToAudio(checkpoint, device=args.device), f"{label}, in this process")
    run_app(backend, cfg)
    return 0


def cmd_reference(args) -> int:
    from mdsgen.config import load_params
    from mdsgen.serving.monitoring import build_reference

    m = load_params(args.params).monitoring
    meta = build_reference(args.checkpoint, args.latents, args.out, m["reference_clips"], m["components"], m["seed"],
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
    records = monitoring.read_records(args.log or p.monitoring["log"], since)
    threshold = args.threshold if args.threshold is not None else p.monitoring["drift_share"]
    summary = monitoring.drift_report(records, reference, args.out, threshold)
    if not args.no_mlflow:
        summary["mlflow_run_id"] = monitoring.log_report(summary, args.out, p.mlflow["experiment"])
        write_json(Path(args.out) / "summary.json", summary)  # where the report went, for schedulers
    print(f"{summary['current_requests']} requests against {summary['reference_rows']} reference clips: "
          f"drifted share {summary['drifted_share']:.2f} (alert at {threshold}); "
          f"drifted: {', '.join(summary['drifted_columns']) or 'none'}")
    print(f"report: {Path(args.out) / 'report.html'}, summary: {Path(args.out) / 'summary.json'}")
    return DRIFT_ALERT if summary["alert"] else 0


def cmd_compare_mels(args) -> int:
    from mdsgen.media.plots import generated_vs_real

    print(generated_vs_real(args.generated, args.originals, args.output, args.limit))
    return 0


DATASET_DIR, FEATURES_DIR = "data/dataset", "data/features"


def add_data_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", default=DATASET_DIR)
    p.add_argument("features", nargs="?", default=FEATURES_DIR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdsgen", description="Video-to-audio generation with MDSGen")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="give videos a generated soundtrack (WAV + muxed video)")
    add_generation_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder or s3:// prefix")
    source.add_argument("--model", help="a registered model, e.g. models:/mdsgen@champion")
    p.add_argument("--params", default="params.yaml", help="for the MLflow store of --model")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--duration", type=float, help="seconds of sound for a still image (default: one window)")
    p.add_argument("--batch-size", type=int, default=8, help="windows sampled together")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the champion on Triton Inference Server (--reload, --stop)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--reload", action="store_true", help="swap in the current champion without dropping requests")
    action.add_argument("--stop", action="store_true", help="stop the server (in-flight requests finish first)")
    action.add_argument("--export", metavar="DEST", help="only write a model repository to a folder or s3:// prefix")
    p.add_argument("--model", help="registry URI or checkpoint folder (default: serving.model, the champion)")
    p.add_argument("--host", help="bind address (default: serving.host, 127.0.0.1)")
    p.add_argument("--ports", type=int, nargs=3, metavar=("HTTP", "GRPC", "METRICS"), help="0 picks a free port")
    p.add_argument("--config", help="model config override from serving/mdsgen/configs/ (cpu, gpu)")
    p.add_argument("--state-dir", help="repository, server record and log (default: serving.state_dir)")
    p.add_argument("--reference", help="a monitoring reference folder to serve with --model (registered models carry theirs)")
    p.add_argument("--monitor-log", help="request records folder or s3:// prefix (default: monitoring.log; '' for none)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="generate through a running server (Triton gRPC)")
    add_generation_args(p)
    p.add_argument("--url", help="gRPC host:port (default: the server `mdsgen serve` started)")
    p.add_argument("--state-dir", default="runs/serving")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (the server batches them)")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("app", help="a web page to try it: upload a video or picture, watch it with its new sound")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--url", help="a Triton server's gRPC host:port (default: the one `mdsgen serve` started, "
                                      "else the champion in this process)")
    source.add_argument("--checkpoint", help="checkpoint folder or s3:// prefix, run in this process")
    source.add_argument("--model", help="a registered model run in this process, e.g. models:/mdsgen@champion")
    p.add_argument("--host", help="bind address (default: app.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="default: app.port, 7860")
    p.add_argument("--concurrency", type=int, help="jobs generated at once; the rest queue (default: app.concurrency)")
    p.add_argument("--device", default="cpu", help="in-process device: cpu, cuda ...")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("reference", help="the monitoring reference: summaries of training clips and their outputs")
    p.add_argument("checkpoint", nargs="?", default="models/mdsgen")
    p.add_argument("--latents", default="data/latents")
    p.add_argument("--out", default="models/reference")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("monitor", help="Evidently drift report of served requests against the reference (exit 3: drift alert)")
    p.add_argument("--since", help="30m, 12h, 7d or an ISO time (default: every record)")
    p.add_argument("--log", help="the request records: folder or s3:// prefix (default: monitoring.log)")
    p.add_argument("--model", default="models:/mdsgen@champion", help="the model whose reference to compare with")
    p.add_argument("--reference", help="a reference folder instead of the model's")
    p.add_argument("--threshold", type=float, help="drifted share that alerts (default: monitoring.drift_share)")
    p.add_argument("--out", default="reports/monitor")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("compare-mels", help="a PNG of real vs generated mels for generated WAVs and their videos")
    p.add_argument("generated", help="folder of generated <stem>.wav")
    p.add_argument("originals", help="folder of the videos <stem>.mp4 (with their real sound)")
    p.add_argument("-o", "--output", required=True, help="PNG path")
    p.add_argument("--limit", type=int, default=8)
    p.set_defaults(func=cmd_compare_mels)

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
    p = dsub.add_parser("copy", help="copy a prepared dataset (local folder, PVC path or s3:// prefix)")
    p.add_argument("source")
    p.add_argument("--out", default=DATASET_DIR)
    p.set_defaults(func=cmd_dataset_copy)
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

    p = sub.add_parser("train", help="train the denoiser on the latent cache (resumes; torchrun for DDP)")
    p.add_argument("latents", nargs="?", default="data/latents")
    p.add_argument("--vae", default="models/vae")
    p.add_argument("--out", default="models/mdsgen", help="the final checkpoint (EMA weights)")
    p.add_argument("--state", default="runs/train-state", help="resumable training state")
    p.add_argument("--metrics", default="reports/train-metrics.json")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-align", help="train the audio-visual alignment classifier used by evaluate")
    add_data_dirs(p)
    p.add_argument("--out", default="models/align")
    p.add_argument("--metrics", default="reports/align-metrics.json")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_train_align)

    p = sub.add_parser("evaluate", help="score a generator and the references on the test split")
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
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ablate", help="the paper's ablations and ours: train, score and track every arm "
                                      "and seed, then write REPORT.md's tables")
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
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("register", help="register a checkpoint in the MLflow registry as the challenger")
    p.add_argument("checkpoint", nargs="?", default="models/mdsgen")
    p.add_argument("--evaluation", default="reports/eval-metrics.json")
    p.add_argument("--train-metrics", default="reports/train-metrics.json", help="holds the training's MLflow run")
    p.add_argument("--run-id", help="the training's MLflow run (instead of the one in --train-metrics)")
    p.add_argument("--reference", help="monitoring reference folder (mdsgen reference) to ship with the model")
    p.add_argument("--out", default="reports/registry.json")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="make the challenger the champion if it passes the gate")
    p.add_argument("--force", action="store_true", help="promote without the gate (logged as forced)")
    p.add_argument("--out", default="reports/promotion.json")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_promote)
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
