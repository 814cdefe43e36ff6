"""`mdsgen evaluate`: score a generator on the test split, beside references that give every number its
context. Every system's audio is scored by the same code against the same real test recordings:

    model                 the generator under test, from the clip's own video features
    ground_truth_vae      the real latent through VAE decode and Griffin-Lim: the ceiling of this codec
    retrieval             the audio of the training clip with the nearest video features (cosine over all
                          32 frames), through the same VAE and Griffin-Lim
    model_shuffled_video  the generator fed another clip's video (a different label where possible): sync
                          and class should fall to chance
    real_audio            the recordings themselves: what the onset detector and the alignment
                          classifier achieve on truth (its FD/KL are zero by construction)

Metrics (mdsgen.metrics): Frechet distance, paired KL, Inception-style score and top-1 class agreement
on aisfx; onset sync against the dataset's true event onsets; the share of (video, audio) pairs the
alignment classifier judges aligned; and, for the model, parameters, seconds per clip and peak memory.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from .align import AlignmentClassifier
from .audio import fit_length, griffin_lim, load_audio, wave_to_mel
from .checkpoint import Checkpoint
from .dataset import read_metadata
from .diffusion import sample
from .features import load_latents
from .metrics import SoundNet, audio_scores, onset_sync

SYSTEMS = ("model", "ground_truth_vae", "retrieval", "model_shuffled_video", "real_audio")
TABLE_METRICS = ("frechet_distance", "kl", "inception_score", "class_agreement", "onset_median_error_ms",
                 "onset_recall", "onset_precision", "onset_f1", "align_aligned_share")
LOWER_IS_BETTER = {"frechet_distance", "kl", "onset_median_error_ms"}


def shuffled_partners(labels: list[str], seed: int) -> list[int]:
    """For each clip, another clip to borrow the video from: one with a different label where possible."""
    rng = np.random.default_rng(seed)
    partners = []
    for i, label in enumerate(labels):
        others = [j for j, other in enumerate(labels) if other != label] or [j for j in range(len(labels)) if j != i]
        partners.append(int(rng.choice(others)) if others else i)
    return partners


def nearest_training_clips(test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
    def unit(x):
        flat = x.flatten(1).double()
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return (unit(test_features) @ unit(train_features).T).argmax(1)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Systems:
    """Latents -> waves through the checkpoint's VAE and Griffin-Lim, in batches."""

    def __init__(self, ckpt: Checkpoint, device: str, batch_size: int):
        self.ckpt, self.device, self.batch_size = ckpt, device, batch_size

    @torch.no_grad()
    def waves(self, latents: torch.Tensor) -> list[np.ndarray]:
        out = []
        for part in latents.split(self.batch_size):
            mels = self.ckpt.vae.decode(part.to(self.device)).float().cpu()
            out.extend(griffin_lim(mels, self.ckpt.audio).numpy())
        return out

    @torch.no_grad()
    def generate(self, features: torch.Tensor, noise: torch.Tensor, sampling) -> torch.Tensor:
        return torch.cat([sample(self.ckpt.model, f.to(self.device), sampling, noise=n).float().cpu()
                          for f, n in zip(features.split(self.batch_size), noise.split(self.batch_size))])


def evaluate(ckpt: Checkpoint, dataset_dir, latents_dir, align_dir, settings: dict, sampling=None,
             device: str = "cpu") -> dict:
    """All systems' metrics on the test split, plus the data the report draws from."""
    sampling = sampling or ckpt.sampling
    audio_cfg = ckpt.audio
    test, train = load_latents(latents_dir, "test"), load_latents(latents_dir, "train")
    n = min(settings.get("clips") or len(test["clip_ids"]), len(test["clip_ids"]))
    ids, labels, feats = test["clip_ids"][:n], test["labels"][:n], test["features"][:n]
    onsets_path = Path(dataset_dir) / "onsets.json"
    all_onsets = json.loads(onsets_path.read_text()) if onsets_path.is_file() else {}
    timed = [i for i, cid in enumerate(ids) if cid in all_onsets]
    real = [fit_length(load_audio(Path(dataset_dir) / "clips" / f"{cid}.mp4", audio_cfg.sample_rate),
                       audio_cfg.clip_samples) for cid in ids]
    systems = Systems(ckpt, device, settings["batch_size"])
    noise = torch.randn((n, *test["latents"].shape[1:]), generator=torch.Generator().manual_seed(settings["seed"]))

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model_latents = systems.generate(feats, noise, sampling)
    denoise_seconds = time.perf_counter() - start
    waves = {"model": systems.waves(model_latents)}
    total_seconds = time.perf_counter() - start
    efficiency = {"params_inference": ckpt.model.parameter_counts()["inference"],
                  "denoise_seconds_per_clip": denoise_seconds / n, "seconds_per_clip": total_seconds / n,
                  "peak_memory_mb": peak_memory_mb(device), "sampling_steps": sampling.steps,
                  "cfg_scale": sampling.cfg_scale, "device": device}

    partners = shuffled_partners(labels, settings["seed"])
    waves["model_shuffled_video"] = systems.waves(systems.generate(feats[partners], noise, sampling))
    waves["ground_truth_vae"] = systems.waves(test["latents"][:n])
    nearest = nearest_training_clips(feats, train["features"])
    waves["retrieval"] = systems.waves(train["latents"][nearest])
    waves["real_audio"] = real

    net = SoundNet(device)
    align = AlignmentClassifier.load(align_dir)
    results, real_sound = {}, net(real, audio_cfg.sample_rate)
    for name in SYSTEMS:
        sound = real_sound if name == "real_audio" else net(waves[name], audio_cfg.sample_rate)
        scores = audio_scores(real_sound, sound)
        if timed:
            scores.update(onset_sync([waves[name][i] for i in timed], audio_cfg.sample_rate,
                                     [all_onsets[ids[i]] for i in timed]))
        mels = wave_to_mel(np.stack(waves[name]), audio_cfg)
        scores["align_aligned_share"] = align.aligned_share(feats, mels)
        results[name] = scores
    results["model"].update(efficiency)
    retrieval_labels = [train["labels"][i] for i in nearest.tolist()]
    return {"systems": results, "clips": n, "clips_with_onsets": len(timed),
            "retrieval_label_match": float(np.mean([a == b for a, b in zip(retrieval_labels, labels)])),
            "sampling": {"steps": sampling.steps, "cfg_scale": sampling.cfg_scale, "cfg_power": sampling.cfg_power},
            "seed": settings["seed"], "clip_ids": ids, "waves": waves, "sample_rate": audio_cfg.sample_rate}


def markdown_table(result: dict) -> str:
    systems = result["systems"]
    metrics = [m for m in TABLE_METRICS if any(m in s for s in systems.values())]
    lines = [f"Test split: {result['clips']} clips ({result['clips_with_onsets']} with known onsets); "
             f"{result['sampling']['steps']} DPM-Solver++ steps, CFG {result['sampling']['cfg_scale']}, "
             f"seed {result['seed']}. Lower is better for " + ", ".join(sorted(LOWER_IS_BETTER)) + ".", "",
             "| system | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, scores in systems.items():
        cells = [f"{scores[m]:.3f}" if isinstance(scores.get(m), float) else "-" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    e = systems["model"]
    lines += ["", f"Model: {e['params_inference'] / 1e6:.2f}M parameters; {e['seconds_per_clip']:.2f} s per clip "
              f"({e['denoise_seconds_per_clip']:.2f} s denoising) on {e['device']}; peak memory "
              f"{e['peak_memory_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir, mel_clips: int = 4) -> dict:
    """metrics.json, table.md, metrics.png (bars per metric), mels.png (a few clips, every system) and
    WAVs of those clips; returns the summary (everything but the waves)."""
    from .generate import write_wav
    from .plots import mel_grid, metric_bars

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "waves"}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(result))
    metric_bars(result["systems"], [m for m in TABLE_METRICS if m in result["systems"]["model"]], out / "metrics.png")
    rows = []
    for i, cid in enumerate(result["clip_ids"][:mel_clips]):
        mels = [(wave_to_mel(result["waves"][name][i]), name)
                for name in ("real_audio", "ground_truth_vae", "model", "retrieval")]
        rows.append((cid, mels))
        for name in ("model", "real_audio"):
            write_wav(out / "audio" / f"{cid}_{name}.wav", result["waves"][name][i], result["sample_rate"])
    mel_grid(rows, out / "mels.png")
    return summary


def log_to_mlflow(summary: dict, out_dir, run_id: str | None) -> str:
    """Metrics of the model as `test_<metric>`, references as `ref_<system>_<metric>`, plus the report files;
    into the training run when its id is known, else a new evaluation run."""
    import mlflow

    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "evaluate") as run:
        for name, scores in summary["systems"].items():
            prefix = "test_" if name == "model" else f"ref_{name}_"
            mlflow.log_metrics({prefix + k: float(v) for k, v in scores.items()
                                if isinstance(v, (int, float)) and np.isfinite(v)})
        mlflow.log_artifacts(str(out_dir), "evaluation")
        return run.info.run_id
