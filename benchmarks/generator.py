"""Generator speed on this machine, measured side by side in one run (the machines are noisy).

    python benchmarks/generator.py [--sizes T S] [--repeats 3] [--json out.json]

Reports: seconds per clip for the denoiser (25 DPM-Solver++ steps, batched CFG, batch 1) per size;
Griffin-Lim in torch (one clip, and per clip in a batch of 8) against librosa; and the stages of
`mdsgen generate` for one 8.2 s clip with the T model. Medians of `--repeats` runs after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from mdsgen.audio import griffin_lim, griffin_lim_librosa
from mdsgen.checkpoint import init_checkpoint
from mdsgen.config import Params
from mdsgen.diffusion import SamplingConfig, sample
from mdsgen.generate import VideoToAudio
from mdsgen.model import MDSGen, config_for
from mdsgen.samples import bigbuckbunny


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["T", "S"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}

    features = torch.randn(1, 32, 1280)
    for size in args.sizes:
        model = MDSGen(config_for(size)).eval()
        seconds = median_seconds(lambda: sample(model, features, SamplingConfig()), args.repeats)
        results[f"denoise_{size}_s_per_clip"] = seconds
        print(f"denoiser {size}: {seconds:.3f} s per clip (25 steps, CFG, batch 1)")

    mel = torch.rand(8, 128, 512) * 0.6
    torch_one = median_seconds(lambda: griffin_lim(mel[0]), args.repeats)
    torch_batch = median_seconds(lambda: griffin_lim(mel), args.repeats) / 8
    librosa_one = median_seconds(lambda: griffin_lim_librosa(mel[0].numpy()), args.repeats)
    results.update(griffin_lim_torch_s=torch_one, griffin_lim_torch_batch8_s_per_clip=torch_batch,
                   griffin_lim_librosa_s=librosa_one)
    print(f"Griffin-Lim 32 iters: torch {torch_one:.3f} s, torch batched {torch_batch:.3f} s/clip, "
          f"librosa {librosa_one:.3f} s (librosa / torch: {librosa_one / torch_one:.2f}x, "
          f"/ torch batched: {librosa_one / torch_batch:.2f}x)")

    generator = VideoToAudio(init_checkpoint(Params()))
    generator.soundtrack(bigbuckbunny())  # warm-up
    stages = [generator.soundtrack(bigbuckbunny()).timings for _ in range(args.repeats)]
    stages = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    total = sum(stages.values())
    results["end_to_end_T_stages_s"] = stages
    print("end to end, one 5.3 s clip (one window), T:")
    for name, seconds in stages.items():
        print(f"  {name:16} {seconds:.3f} s  ({100 * seconds / total:.0f}%)")
    print(f"  total / denoise: {total / stages['denoise']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
