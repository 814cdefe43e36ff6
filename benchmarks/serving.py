"""Serving load test and Triton overhead, measured side by side in one run.

    python benchmarks/serving.py [--checkpoint DIR] [--requests 200] [--concurrency 1 4 8] [--json out.json]

Without --checkpoint it serves the `ci` profile's model (T, 4 sampling steps) with fresh weights: the
cost of a request does not depend on what the weights learned. Inputs: the held-out clips of
data/dataset (8.2 s each) when present, else bigbuckbunny.mp4.
1. Per clip, one request at a time: in-process `VideoToAudio.soundtrack` vs the Triton gRPC round trip.
2. Load: `--requests` requests from each number of concurrent clients in `--concurrency`, one level
   after the other; failures, throughput against one at a time, and the batch sizes Triton formed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdsgen.serving import server as triton  # noqa: E402  (the tritonserver process and its model repository)
from mdsgen.base.samples import bigbuckbunny  # noqa: E402
from mdsgen.config import parse_params, resolve_params  # noqa: E402
from mdsgen.inference.generate import VideoToAudio  # noqa: E402
from mdsgen.media.files import list_inputs  # noqa: E402
from mdsgen.model.checkpoint import init_checkpoint, save_checkpoint  # noqa: E402
from mdsgen.serving.client import SoundtrackClient  # noqa: E402


def ci_checkpoint(folder: Path) -> str:
    params = parse_params(yaml.safe_load(resolve_params((ROOT / "params.yaml").read_text(), "ci")))
    save_checkpoint(init_checkpoint(params), str(folder))
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--sequential", type=int, default=16, help="one-at-a-time requests for the baseline")
    parser.add_argument("--json")
    args = parser.parse_args()
    metadata = ROOT / "data" / "dataset" / "metadata.csv"
    clips = list_inputs(metadata, "test") if metadata.is_file() else [Path(bigbuckbunny())]
    videos = [c.read_bytes() for c in clips]

    with tempfile.TemporaryDirectory(prefix="mdsgen-bench-") as tmp:
        checkpoint = args.checkpoint or ci_checkpoint(Path(tmp) / "ci")
        repository = Path(tmp) / "repository"
        triton.write_version(repository, checkpoint, 1)
        server = triton.start(repository, Path(tmp) / "state", ports=(0, 0, 0))
        try:
            results = run(args, server, checkpoint, clips, videos)
        finally:
            triton.stop(Path(tmp) / "state")
    results["checkpoint"] = args.checkpoint or "ci profile architecture, fresh weights"
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def run(args, server, checkpoint: str, clips: list[Path], videos: list[bytes]) -> dict:
    local = VideoToAudio(checkpoint)
    client = SoundtrackClient(server.grpc)
    client.soundtrack(videos[0])  # warm-up, both sides
    local.soundtrack(clips[0])
    n = min(len(clips), args.sequential)
    in_process, triton = [], []
    for clip, video in zip(clips[:n], videos[:n]):  # interleaved: both see the same machine load
        start = time.perf_counter()
        local.soundtrack(clip)
        in_process.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.soundtrack(video)
        triton.append(time.perf_counter() - start)
    per_clip = {"in_process_s": statistics.median(in_process), "triton_s": statistics.median(triton)}
    per_clip["overhead_pct"] = 100 * (per_clip["triton_s"] / per_clip["in_process_s"] - 1)
    print(f"per clip, one at a time ({n} clips, median): in-process {per_clip['in_process_s']:.3f} s, "
          f"Triton {per_clip['triton_s']:.3f} s, overhead {per_clip['overhead_pct']:+.1f}%")
    sequential_rate = 1 / statistics.mean(triton)

    load = {clients: load_test(server, videos, args.requests, clients, sequential_rate)
            for clients in args.concurrency}
    return {"per_clip": per_clip, "load": load, "inputs": [c.name for c in clips]}


def load_test(server, videos: list[bytes], requests: int, clients: int, sequential_rate: float) -> dict:
    before = server.batch_sizes()
    failures = []

    def request(i: int):
        c = SoundtrackClient(server.grpc)
        try:
            c.soundtrack(videos[i % len(videos)], seed=i)
        except Exception as err:  # counted, not raised: the load test reports failures
            failures.append(f"{i}: {err}")
        finally:
            c.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(request, range(requests)))
    elapsed = time.perf_counter() - start
    after = server.batch_sizes()
    batches = {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0)}
    load = {"requests": requests, "concurrency": clients, "failures": len(failures),
            "seconds": elapsed, "requests_per_s": requests / elapsed,
            "one_at_a_time_requests_per_s": sequential_rate,
            "speedup_over_one_at_a_time": requests / elapsed / sequential_rate, "batch_sizes": batches,
            "first_failures": failures[:5]}
    print(f"load: {requests} requests, {clients} clients: {len(failures)} failures, "
          f"{load['requests_per_s']:.3f} req/s vs {sequential_rate:.3f} req/s one at a time "
          f"({load['speedup_over_one_at_a_time']:.2f}x); batch sizes {dict(sorted(batches.items()))}")
    return load


if __name__ == "__main__":
    main()
