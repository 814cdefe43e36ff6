"""Hostile inputs against `mdsgen generate` and the Triton server, and a load test with bad requests mixed in.

    python benchmarks/hostile.py [--requests 1000] [--clients 8] [--rounds 5] [--skip-corpus]
                                 [--out benchmarks/results/hostile.md]

1. A corpus of files that are broken or cost far more than they look (tests/media.py writes them): each
   through `mdsgen generate` in its own process (wall time, peak memory, the message) and through the
   server (round trip, the message, whether it still answers a good request afterwards).
2. `--requests` requests from `--clients` concurrent clients, every fifth one bad (garbage bytes, empty
   video, features of the wrong shape or with NaN, absurd STEPS): every bad one must get its error, every
   good one its soundtrack; the server's memory (tritonserver and its python-backend stubs: resident now,
   VmRSS, and the high-water mark, VmHWM) after the corpus and after each of `--rounds` equal rounds of the
   load shows whether memory keeps growing with requests or levels off.
The server runs the `ci` profile's architecture with fresh weights (cost does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from media import make_audio_only, make_video, two_frames  # noqa: E402
from mdsgen.serving import server as triton  # noqa: E402  (the tritonserver process and its model repository)
from mdsgen.serving.client import SoundtrackClient  # noqa: E402


def ci_checkpoint(folder: Path) -> str:
    """benchmarks/serving.py's server model (loaded by path: ROOT/serving/ is the Triton template)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_benchmark", ROOT / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ci_checkpoint(folder)

STEPS = 2


def corpus(folder: Path) -> dict[str, Path]:
    clip = make_video(folder / "good.mp4", seconds=3.0)
    files = {"good 3 s clip": clip}
    (folder / "empty.mp4").write_bytes(b"")
    files["empty file"] = folder / "empty.mp4"
    (folder / "text.mp4").write_text("not a video\n" * 100)
    files["text named .mp4"] = folder / "text.mp4"
    (folder / "truncated.mp4").write_bytes(clip.read_bytes()[:1500])
    files["truncated MP4 (1.5 KB)"] = folder / "truncated.mp4"
    files["audio only"] = make_audio_only(folder / "audio.m4a")
    files["two frames 10 h apart (<1 KB)"] = two_frames(folder / "ten-hours.mkv", 64, 64, 36000)
    files["two frames 29 min apart"] = two_frames(folder / "29-min.mkv", 64, 64, 29 * 60)
    files["4096 x 2 frames"] = two_frames(folder / "wide.mkv", 4096, 2, 1)
    files["8192 x 2 frames"] = two_frames(folder / "wider.mkv", 8192, 2, 1)
    files["8640 x 4320 frame (over 8K)"] = two_frames(folder / "huge.mkv", 8640, 4320, 1)
    return files


def through_generate(path: Path, checkpoint: str, out: Path) -> dict:
    script = ("import resource, sys; from mdsgen.cli import main; code = main(sys.argv[1:]); "
              "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr); "
              "sys.exit(code)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, "generate", str(path), "-o", str(out), "--checkpoint",
                           checkpoint, "--steps", str(STEPS)], capture_output=True, text=True, timeout=1800)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    peak = next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK"))
    return {"seconds": time.perf_counter() - start, "peak_mb": int(peak), "exit": proc.returncode,
            "message": errors[0][len("error: "):].replace(str(path), path.name) if errors else "ok"}


def through_server(path: Path, client: SoundtrackClient, good: Path) -> dict:
    start = time.perf_counter()
    try:
        client.soundtrack(path.read_bytes(), steps=STEPS)
        message = "ok"
    except Exception as err:  # the server's reason, reported
        message = err.message() if hasattr(err, "message") else str(err)
    seconds = time.perf_counter() - start
    client.soundtrack(good, steps=STEPS)  # raises if the server stopped serving
    return {"seconds": seconds, "message": message}


def load(server, clients: int, requests: range, features: np.ndarray, video: bytes) -> dict:
    bad = [("garbage bytes", {"video": b"\x00garbage" * 100}), ("empty video", {"video": b""}),
           ("features of the wrong shape", {"features": features[:, :5]}),
           ("NaN features", {"features": np.full_like(features, np.nan)}),
           ("STEPS 10^6", {"video": video, "steps": 10 ** 6})]
    outcomes = {"good ok": 0, "good failed": [], "bad refused": 0, "bad accepted": []}

    def one(i: int):
        client = SoundtrackClient(server.grpc)
        try:
            if i % 5 == 4:
                name, request = bad[(i // 5) % len(bad)]
                try:
                    client.soundtrack(**{"steps": STEPS, **request})
                    outcomes["bad accepted"].append(name)
                except Exception:  # refused, as it must be
                    outcomes["bad refused"] += 1
            else:
                try:
                    track = client.soundtrack(features=features, steps=STEPS, seed=i)
                    assert np.isfinite(track.wave).all()
                    outcomes["good ok"] += 1
                except Exception as err:
                    outcomes["good failed"].append(str(err)[:200])
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    outcomes["seconds"] = time.perf_counter() - start
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="memory is read after each round of the load")
    parser.add_argument("--skip-corpus", action="store_true", help="only the load (the corpus takes ~10 min)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hostile.md"))
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(prefix="mdsgen-hostile-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        files = corpus(tmp / "corpus")
        checkpoint = ci_checkpoint(tmp / "ci")
        triton.write_version(tmp / "repository", checkpoint, 1)
        server = triton.start(tmp / "repository", tmp / "state", ports=(0, 0, 0))
        try:
            client = SoundtrackClient(server.grpc)
            client.soundtrack(files["good 3 s clip"], steps=STEPS)  # warm-up
            start_mb = server.memory_mb()
            if not args.skip_corpus:
                lines += ["| input | size | generate: message | generate: s | generate: peak MB | server: message "
                          "| server: s |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for name, path in ({} if args.skip_corpus else files).items():
                local = through_generate(path, checkpoint, tmp / "out")
                remote = through_server(path, client, files["good 3 s clip"])
                lines.append(f"| {name} | {path.stat().st_size:,} B | {local['message']} | {local['seconds']:.1f} | "
                             f"{local['peak_mb']} | {remote['message']} | {remote['seconds']:.2f} |")
                print(lines[-1], flush=True)
            corpus_mb = server.memory_mb()
            from mdsgen.inference.generate import VideoToAudio

            generator = VideoToAudio(checkpoint)
            features = generator.features(generator.read(files["good 3 s clip"])).numpy()
            rounds, outcomes = [], {"good ok": 0, "good failed": [], "bad refused": 0, "bad accepted": [],
                                    "seconds": 0.0}
            per_round = -(-args.requests // args.rounds)
            for first in range(0, args.requests, per_round):
                done = load(server, args.clients, range(first, min(first + per_round, args.requests)), features,
                            files["good 3 s clip"].read_bytes())
                for key, value in done.items():
                    outcomes[key] += value
                rounds.append({"requests": min(first + per_round, args.requests),
                               "resident_mb": round(server.memory_mb("VmRSS")),
                               "peak_mb": round(server.memory_mb()), "seconds": round(done["seconds"], 1)})
                print(json.dumps(rounds[-1]), flush=True)
            ready = client.ready()
        finally:
            triton.stop(tmp / "state")
    summary = {"requests": args.requests, "clients": args.clients, "good_ok": outcomes["good ok"],
               "good_failed": len(outcomes["good failed"]), "bad_refused": outcomes["bad refused"],
               "bad_accepted": outcomes["bad accepted"], "seconds": round(outcomes["seconds"], 1),
               "server_peak_mb": {"after warm-up": round(start_mb), "after the corpus": round(corpus_mb)},
               "server_memory_by_round": rounds, "ready_after": ready,
               "first_good_failures": outcomes["good failed"][:3]}
    text = "\n".join(["# Hostile inputs (benchmarks/hostile.py)", "", *lines, "", "```json",
                      json.dumps(summary, indent=2), "```", ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
