"""The codec table: real test audio through each mel format, vocoder and VAE, scored by aisfx against the
real recordings (class agreement, Frechet distance). Whatever the generator learns, it cannot sound better
than its codec, so this decides the mel format, the VAE shape and the vocoder.

    python benchmarks/codec.py data/dataset --vae models/vae [--vae other/vae ...] [--vocoder models/vocoder]
                               [--clips 24] [--out FILE]

Rows: the configured mel through its vocoder alone, and through each VAE then the vocoder; with
`--vocoder` (the train_vocoder stage's folder), the mel through the fine-tuned HiFi-GAN as well; with
`--paper`, Griffin-Lim on the paper's mel as well. Each VAE must have been trained on the configured mel
format (its latent shape follows the mel).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mdsgen.config import load_params  # noqa: E402
from mdsgen.data.dataset import read_metadata  # noqa: E402
from mdsgen.evaluation.evaluate import sound_net  # noqa: E402
from mdsgen.evaluation.metrics import audio_scores  # noqa: E402
from mdsgen.media.audio import AudioConfig, fit_length, load_audio, vocode, wave_to_mel  # noqa: E402
from mdsgen.media.vocoder import load_vocoder_dir  # noqa: E402
from mdsgen.model.vae import load_vae  # noqa: E402


def real_clips(dataset_dir: Path, cfg: AudioConfig, clips: int) -> list[np.ndarray]:
    rows = [r for r in read_metadata(dataset_dir) if r["split"] == "test"][:clips]
    return [fit_length(load_audio(dataset_dir / "clips" / f"{r['clip_id']}.mp4", cfg.sample_rate), cfg.clip_samples)
            for r in rows]


@torch.inference_mode()
def through(waves: list[np.ndarray], cfg: AudioConfig, vae=None, batch: int = 8, generator=None) -> list[np.ndarray]:
    out = []
    for i in range(0, len(waves), batch):
        mel = wave_to_mel(np.stack(waves[i:i + batch]), cfg)
        if vae is not None:
            mel = vae.decode(vae.encode(mel))
        out.extend(vocode(mel, cfg, generator).numpy())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--vae", action="append", default=[], help="a trained VAE folder (repeatable)")
    parser.add_argument("--vocoder", help="a train_vocoder folder: add its fine-tuned HiFi-GAN's row")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--paper", action="store_true", help="add Griffin-Lim on the paper's mel")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = params.audio
    first = next(r for r in read_metadata(args.dataset) if r["split"] == "test")
    net = sound_net(params.evaluate.aisfx_band, args.dataset / "clips" / f"{first['clip_id']}.mp4")  # as evaluate hears
    real = real_clips(args.dataset, cfg, args.clips)
    real_sound = net(real, cfg.sample_rate)
    rows = {}

    def score(name, waves, rate, seconds):
        rows[name] = {**audio_scores(real_sound, net(waves, rate)), "seconds_per_clip": seconds / len(waves)}
        print(f"{name}: class agreement {rows[name]['class_agreement']:.3f}, FD {rows[name]['frechet_distance']:.1f}",
              flush=True)

    start = time.perf_counter()
    score(f"{cfg.mel_scale} mel, {cfg.vocoder}", through(real, cfg), cfg.sample_rate, time.perf_counter() - start)
    for folder in args.vae:
        vae = load_vae(folder)
        shape = tuple(vae.encode(wave_to_mel(real[0], cfg)[None]).shape[1:])
        start = time.perf_counter()
        score(f"{cfg.mel_scale} mel, VAE {folder} (latent {shape}), {cfg.vocoder}", through(real, cfg, vae),
              cfg.sample_rate, time.perf_counter() - start)
    if args.vocoder:
        generator = load_vocoder_dir(args.vocoder)
        if generator is None:
            parser.error(f"--vocoder {args.vocoder}: no fine-tuned generator there (vocoder_train.steps was 0)")
        start = time.perf_counter()
        score(f"{cfg.mel_scale} mel, {cfg.vocoder} fine-tuned ({args.vocoder})", through(real, cfg, generator=generator),
              cfg.sample_rate, time.perf_counter() - start)
    if args.paper:
        paper = replace(AudioConfig(), griffin_lim_iters=cfg.griffin_lim_iters)
        waves = real_clips(args.dataset, paper, args.clips)
        start = time.perf_counter()
        score("paper mel, griffin-lim", through(waves, paper), paper.sample_rate, time.perf_counter() - start)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| codec | class agreement | FD | s per clip |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['class_agreement']:.3f} | {r['frechet_distance']:.1f} | {r['seconds_per_clip']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
