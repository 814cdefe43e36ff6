"""`mdsgen evaluate`: score a generator on the test split, beside references that give every number its
context. Every system's audio is scored by the same code against the same real test recordings:

    model                 the generator under test, from the clip's own video features
    ground_truth_vae      the real latent through VAE decode and the vocoder: the ceiling of this codec
    vocoder_only          the real mel straight into the vocoder: the VAE's loss is the gap to the row above
    retrieval             the audio of the training clip with the nearest video features (cosine over all
                          32 frames), through the same VAE and vocoder
    model_shuffled_video  the generator fed another clip's video (a different label where possible): sync
                          and class should fall to chance
    real_audio            the recordings themselves: what the onset detector and the alignment
                          classifier achieve on truth (its FD/KL are zero by construction)

Metrics (mdsgen.evaluation.metrics): Frechet distance, paired KL, Inception-style score and top-1 class agreement
on aisfx; object match (a spectrum classifier fit on the training split's recordings: does the clip
sound like its own label's object); onset sync against the dataset's true event onsets; the share of
(video, audio) pairs the alignment classifier judges aligned; and, for the model, parameters, seconds per clip and peak memory.

Diagnostics that an audio metric cannot be fooled past (`diagnose`, `Checks`): the sampled latents' spread
against the real ones, the conditioning gain (the unconditional prediction's error over the conditional one at
a few t), how much closer each sample is to its own clip's latent than to another clip's, and how far the
model's audio stays above the same model fed shuffled videos. `checks` in params.yaml's `evaluate` section
sets their bounds; a model that fails one is never promoted.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mdsgen.base.errors import refuse_unknown_keys
from mdsgen.data.features import load_latents
from mdsgen.evaluation.align import AlignmentClassifier
from mdsgen.evaluation.metrics import ObjectProbe, SoundNet, audio_scores, onset_sync
from mdsgen.inference.generate import FeaturesToAudio
from mdsgen.media.audio import AudioConfig, fit_length, load_audio, recorded_rate, vocode, wave_to_mel
from mdsgen.model.checkpoint import Checkpoint
from mdsgen.model.diffusion import conditioning_gain
from mdsgen.model.vae import MelStandardizer

AISFX_BANDS = ("data", "full")
SYSTEMS = ("model", "ground_truth_vae", "vocoder_only", "retrieval", "model_shuffled_video", "real_audio")
TABLE_METRICS = ("frechet_distance", "kl", "inception_score", "class_agreement", "object_match",
                 "onset_median_error_ms", "onset_recall", "onset_precision", "onset_f1", "onset_auc", "align_aligned_share")
LOWER_IS_BETTER = {"frechet_distance", "kl", "onset_median_error_ms"}
HIGHER_IS_BETTER = set(TABLE_METRICS) - LOWER_IS_BETTER


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


@dataclass(frozen=True)
class Checks:
    """The bounds a model must meet to be promoted (params.yaml `evaluate.checks`; null: none enforced)."""
    latent_std_ratio: tuple[float, float] = (0.8, 1.25)  # sampled latents' std over the real test latents'
    # the largest gain over the measured t: the video must measurably help the denoiser at some noise level
    # (at low noise the noisy latent already fixes the answer, so a mean over t dilutes a real gain)
    min_conditioning_gain: float = 1.02
    max_own_vs_other: float = 0.95  # a sample's distance to its own clip's latent over that to another clip's
    # per metric (higher is better), how far the model must score above the same model fed shuffled videos;
    # a metric set to null is dropped (e.g. onset_auc on a dataset without known onsets)
    min_over_shuffled: dict = field(default_factory=lambda: {"class_agreement": 0.05, "onset_auc": 0.05})

    def __post_init__(self):
        bounds = tuple(self.latent_std_ratio or ())
        if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1]:
            raise ValueError(f"evaluate.checks.latent_std_ratio {self.latent_std_ratio}: want [low, high], low < high")
        object.__setattr__(self, "latent_std_ratio", bounds)
        margins = {k: v for k, v in (self.min_over_shuffled or {}).items() if v is not None}
        wrong = sorted(set(margins) - HIGHER_IS_BETTER)
        if wrong:
            raise ValueError(f"evaluate.checks.min_over_shuffled: {wrong} cannot be compared that way; "
                             f"use metrics where higher is better: {sorted(HIGHER_IS_BETTER)}")
        object.__setattr__(self, "min_over_shuffled", margins)

    @classmethod
    def from_params(cls, values: dict | None) -> "Checks | None":
        if values is None:
            return None
        refuse_unknown_keys(values, {f.name for f in fields(cls)}, "evaluate.checks")
        return cls(**values)

    def diagnostic_failures(self, diagnostics: dict) -> list[str]:
        lo, hi = self.latent_std_ratio
        failures = [f"{k} is not finite" for k, v in diagnostics.items() if not np.isfinite(v)]
        if not lo <= diagnostics["latent_std_ratio"] <= hi:
            failures.append(f"latent_std_ratio {diagnostics['latent_std_ratio']:.3f} outside [{lo}, {hi}]")
        if diagnostics["conditioning_gain_peak"] < self.min_conditioning_gain:
            failures.append(f"conditioning_gain_peak {diagnostics['conditioning_gain_peak']:.3f} < "
                            f"{self.min_conditioning_gain}")
        if diagnostics["own_vs_other_distance"] > self.max_own_vs_other:
            failures.append(f"own_vs_other_distance {diagnostics['own_vs_other_distance']:.3f} > {self.max_own_vs_other}")
        return failures

    def failures(self, diagnostics: dict, model: dict, shuffled: dict) -> list[str]:
        """Every check: the latent diagnostics, then the model's scores against its shuffled-video control's."""
        return self.diagnostic_failures(diagnostics) + self.control_failures(model, shuffled)

    def control_failures(self, model: dict, shuffled: dict) -> list[str]:
        """The model against its shuffled-video control: a metric either lacks is a failure (it was asked for)."""
        failures = []
        for metric, margin in self.min_over_shuffled.items():
            if metric not in model or metric not in shuffled:
                failures.append(f"{metric} not measured, so not checked against the shuffled-video control")
            elif not model[metric] >= shuffled[metric] + margin:  # NaN fails too
                failures.append(f"{metric} {model[metric]:.3f} is not {margin} above the shuffled-video "
                                f"control's {shuffled[metric]:.3f}")
        return failures


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml `evaluate`: which test clips, the sampling seed, the batch, and the promotion checks
    (`checks: null` enforces none)."""
    seed: int = 0
    clips: int | None = None       # the first N test clips; None: all
    batch_size: int = 8
    checks: Checks | None = field(default_factory=Checks)
    aisfx_band: str = "data"       # data: aisfx hears every system in the real recordings' band (SoundNet); full: as rendered

    def __post_init__(self):
        if self.aisfx_band not in AISFX_BANDS:
            raise ValueError(f"evaluate.aisfx_band {self.aisfx_band!r}: use one of {', '.join(AISFX_BANDS)}")

    @classmethod
    def from_params(cls, values: dict | None) -> "EvaluateConfig":
        values = dict(values or {})
        refuse_unknown_keys(values, {f.name for f in fields(cls)}, "evaluate")
        if "checks" in values:
            values["checks"] = Checks.from_params(values["checks"])
        return cls(**values)


def token_boundary_ratio(latents: torch.Tensor, token: int, time_dim: int) -> float:
    """How much the latents' loudness envelope [clips, time] jumps where one token ends and the next begins,
    over how much it changes inside tokens, in the louder half of each clip: 1.0 where the token grid
    leaves no mark (real audio), far above it where the network fills each token as one block (the
    stripes inside events, REPORT.md 5m). Invariant to the latents' scale and shift."""
    envelope = latents.float().movedim(time_dim, -1).flatten(1, -2).mean(1)
    jumps = (envelope[:, 1:] - envelope[:, :-1]).abs()
    crossing = torch.zeros(jumps.shape[1], dtype=torch.bool)
    crossing[token - 1::token] = True  # the jump from a token's last frame to the next token's first
    loud = envelope[:, :-1] > envelope.median(1, keepdim=True).values
    return (jumps[:, crossing][loud[:, crossing]].mean() / jumps[:, ~crossing][loud[:, ~crossing]].mean()).item()


def diagnose(model, samples: torch.Tensor, real: torch.Tensor, features: torch.Tensor, partners: list[int],
             device: str = "cpu") -> dict:
    """Sample statistics against the real latents, token-boundary marks, conditioning gain and own-vs-other
    distance."""
    own = (samples - real).pow(2).flatten(1).mean(1)
    other = (samples - real[partners]).pow(2).flatten(1).mean(1)
    gains = conditioning_gain(model, real.to(device), features.to(device))
    cfg = model.config
    token, time_dim = (cfg.patch[1], -1) if cfg.time_axis == "width" else (cfg.patch[0], -2)
    return {"latent_std_ratio": (samples.std() / real.std()).item(), "latent_abs_max": samples.abs().max().item(),
            "real_latent_abs_max": real.abs().max().item(),
            "token_boundary_ratio": token_boundary_ratio(samples, token, time_dim),
            "real_token_boundary_ratio": token_boundary_ratio(real, token, time_dim),
            "conditioning_gain": float(np.mean([g["gain"] for g in gains.values()])),
            "conditioning_gain_peak": max(g["gain"] for g in gains.values()),
            **{f"conditioning_gain_t{t}": g["gain"] for t, g in gains.items()},
            "own_vs_other_distance": (own.mean() / other.mean()).item()}


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sound_net(aisfx_band: str, recording, device: str = "cpu") -> SoundNet:
    """aisfx hearing every system in the band of a real `recording` (`aisfx_band: data`) or in full."""
    return SoundNet(device, recorded_rate(recording) if aisfx_band == "data" else None)


class TestSet:
    """The test clips and what scoring any system on them needs, computed once: frame features, true
    onsets, the real recordings and aisfx's outputs for them, the alignment classifier."""

    def __init__(self, dataset_dir, latents_dir, align_dir, audio_cfg, clips: int | None = None,
                 device: str = "cpu", aisfx_band: str = "data"):
        test = load_latents(latents_dir, "test")
        n = min(clips or len(test["clip_ids"]), len(test["clip_ids"]))
        self.audio_cfg, self.n = audio_cfg, n
        self.ids, self.labels = test["clip_ids"][:n], test["labels"][:n]
        self.features, self.latents = test["features"][:n], test["latents"][:n]
        onsets_path = Path(dataset_dir) / "onsets.json"
        all_onsets = json.loads(onsets_path.read_text()) if onsets_path.is_file() else {}
        self.timed = [i for i, cid in enumerate(self.ids) if cid in all_onsets]
        self.onsets = [all_onsets[self.ids[i]] for i in self.timed]
        self.real = self._recordings(dataset_dir, self.ids)
        self.net = sound_net(aisfx_band, Path(dataset_dir) / "clips" / f"{self.ids[0]}.mp4", device)
        self.align = AlignmentClassifier.load(align_dir)
        self.real_sound = self.net(self.real, audio_cfg.sample_rate)
        self.objects = self._object_probe(dataset_dir, latents_dir)

    def _object_probe(self, dataset_dir, latents_dir) -> ObjectProbe | None:
        """Fit on the training split's real recordings; None when it has fewer than two labels."""
        train = load_latents(latents_dir, "train")
        if len(set(train["labels"])) < 2:
            return None
        return ObjectProbe(self._recordings(dataset_dir, train["clip_ids"]), train["labels"], self.audio_cfg)

    def _recordings(self, dataset_dir, clip_ids) -> list[np.ndarray]:
        cfg = self.audio_cfg
        return [fit_length(load_audio(Path(dataset_dir) / "clips" / f"{cid}.mp4", cfg.sample_rate), cfg.clip_samples)
                for cid in clip_ids]

    def score(self, waves: list[np.ndarray], real: bool = False) -> dict:
        """Audio, onset-sync and alignment metrics of one system's waves (one per test clip)."""
        rate = self.audio_cfg.sample_rate
        sound = self.real_sound if real else self.net(waves, rate)
        scores = audio_scores(self.real_sound, sound)
        if self.objects is not None:
            scores["object_match"] = self.objects.match(waves, self.labels)
        if self.timed:
            scores.update(onset_sync([waves[i] for i in self.timed], rate, self.onsets))
        scores["align_aligned_share"] = self.align.aligned_share(self.features,
                                                                 wave_to_mel(np.stack(waves), self.audio_cfg))
        return scores


def generate_model_waves(ckpt: Checkpoint, tests: TestSet, sampling, seed: int, device: str,
                         batch_size: int) -> tuple[torch.Tensor, np.ndarray, dict]:
    """The generator's latents and waves ([clips, samples]) for every test clip, and what they cost (seconds
    per clip, peak memory)."""
    core = FeaturesToAudio(ckpt, device, batch_size)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    latents = core.denoise(tests.features, core.noise(tests.n, seed), sampling).float().cpu()
    denoise_seconds = time.perf_counter() - start
    waves = core.waves(latents).numpy()
    total_seconds = time.perf_counter() - start
    return latents, waves, {"params_inference": ckpt.model.parameter_counts()["inference"],
                   "denoise_seconds_per_clip": denoise_seconds / tests.n, "seconds_per_clip": total_seconds / tests.n,
                   "peak_memory_mb": peak_memory_mb(device), "sampling_steps": sampling.steps,
                   "cfg_scale": sampling.cfg_scale, "device": device}


def evaluate(ckpt: Checkpoint, dataset_dir, latents_dir, align_dir, settings: EvaluateConfig, sampling=None,
             device: str = "cpu", progress: Callable[[str], None] = lambda stage: None) -> dict:
    """All systems' metrics on the test split, plus the data the report draws from; `progress(stage)` is
    told each stage as it starts."""
    sampling = sampling or ckpt.sampling
    checks = settings.checks
    progress("the test set: recordings, their aisfx embeddings, the object probe")
    tests = TestSet(dataset_dir, latents_dir, align_dir, ckpt.audio, settings.clips, device, settings.aisfx_band)
    train = load_latents(latents_dir, "train")
    core = FeaturesToAudio(ckpt, device, settings.batch_size)
    progress(f"the model: {tests.n} clips, {sampling.steps} steps each")
    latents, model_waves, efficiency = generate_model_waves(ckpt, tests, sampling, settings.seed, device,
                                                            settings.batch_size)
    waves = {"model": model_waves}
    partners = shuffled_partners(tests.labels, settings.seed)
    progress("diagnostics: latent statistics, conditioning gain")
    diagnostics = diagnose(ckpt.model, latents, tests.latents, tests.features, partners, device)
    progress("the model fed shuffled videos, the codec, retrieval")
    shuffled = core.denoise(tests.features[partners], core.noise(tests.n, settings.seed), sampling)
    waves["model_shuffled_video"] = core.waves(shuffled).numpy()
    waves["ground_truth_vae"] = core.waves(tests.latents).numpy()
    if isinstance(ckpt.vae, MelStandardizer):  # no VAE: the row above already is the mel through the vocoder
        waves["vocoder_only"] = waves["ground_truth_vae"]
    else:
        real_mels = wave_to_mel(np.stack(tests.real), ckpt.audio)
        waves["vocoder_only"] = [w for part in real_mels.split(settings.batch_size)
                                 for w in vocode(part.to(device), ckpt.audio, ckpt.vocoder).cpu().numpy()]
    nearest = nearest_training_clips(tests.features, train["features"])
    waves["retrieval"] = core.waves(train["latents"][nearest]).numpy()
    waves["real_audio"] = tests.real

    progress(f"scoring {len(SYSTEMS)} systems")
    results = {name: tests.score(waves[name], real=name == "real_audio") for name in SYSTEMS}
    results["model"].update(efficiency)
    failures = checks.failures(diagnostics, results["model"], results["model_shuffled_video"]) if checks else []
    results["model"].update(diagnostics, diagnostics_pass=float(not failures))
    retrieval_labels = [train["labels"][i] for i in nearest.tolist()]
    return {"systems": results, "clips": tests.n, "clips_with_onsets": len(tests.timed),
            "retrieval_label_match": float(np.mean([a == b for a, b in zip(retrieval_labels, tests.labels)])),
            "sampling": {"steps": sampling.steps, "cfg_scale": sampling.cfg_scale, "cfg_power": sampling.cfg_power,
                         "solver": sampling.solver},
            "audio": asdict(ckpt.audio), "aisfx_band_rate": tests.net.band_rate,
            "vocoder": f"{ckpt.audio.vocoder}, fine-tuned" if ckpt.vocoder is not None else ckpt.audio.vocoder,
            "seed": settings.seed, "clip_ids": tests.ids,
            "diagnostics_failures": "; ".join(failures), "waves": waves, "sample_rate": ckpt.audio.sample_rate}


def markdown_table(result: dict) -> str:
    systems = result["systems"]
    metrics = [m for m in TABLE_METRICS if any(m in s for s in systems.values())]
    lines = [f"Test split: {result['clips']} clips ({result['clips_with_onsets']} with known onsets); "
             f"{result['sampling']['steps']} {result['sampling'].get('solver', 'dpmsolver++')} steps, "
             f"CFG {result['sampling']['cfg_scale']}, "
             f"seed {result['seed']}; " + (f"vocoder {vocoder}; " if (vocoder := result.get("vocoder")) else "")
             + "aisfx hears " + (f"every system resampled to the recordings' {rate} Hz"
                                 if (rate := result.get("aisfx_band_rate")) else "the full band")
             + ". Lower is better for " + ", ".join(sorted(LOWER_IS_BETTER)) + ".", "",
             "| system | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, scores in systems.items():
        cells = [f"{scores[m]:.3f}" if isinstance(scores.get(m), float) else "-" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    e = systems["model"]
    lines += ["", f"Model: {e['params_inference'] / 1e6:.2f}M parameters; {e['seconds_per_clip']:.2f} s per clip "
              f"({e['denoise_seconds_per_clip']:.2f} s denoising) on {e['device']}; peak memory "
              f"{e['peak_memory_mb']:.0f} MB."]
    if "latent_std_ratio" in e:
        gains = ", ".join(f"t={k.rsplit('t', 1)[1]} {v:.3f}" for k, v in e.items() if k.startswith("conditioning_gain_t"))
        verdict = "pass" if e["diagnostics_pass"] else f"FAIL ({result.get('diagnostics_failures')})"
        lines += ["", f"Diagnostics ({verdict}): sampled latent std {e['latent_std_ratio']:.3f}x the real "
                  f"(abs max {e['latent_abs_max']:.2f} vs {e['real_latent_abs_max']:.2f}); loudness jumps at "
                  f"token boundaries over those inside tokens {e['token_boundary_ratio']:.2f} (real "
                  f"{e['real_token_boundary_ratio']:.2f}); conditioning gain "
                  f"(unconditional / conditional prediction error) {gains} (peak {e['conditioning_gain_peak']:.3f}); "
                  f"sample-to-own-latent over "
                  f"sample-to-other-clip distance {e['own_vs_other_distance']:.3f}."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir, mel_clips: int = 4) -> dict:
    """metrics.json, table.md, metrics.png (bars per metric), mels.png (a few clips, every system) and
    WAVs of those clips; returns the summary (everything but the waves)."""
    from mdsgen.media.files import write_wav
    from mdsgen.media.plots import mel_grid, metric_bars

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "waves"}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(result))
    metric_bars(result["systems"], [m for m in TABLE_METRICS if m in result["systems"]["model"]], out / "metrics.png")
    rows, audio = [], AudioConfig(**result["audio"])
    for i, cid in enumerate(result["clip_ids"][:mel_clips]):
        mels = [(wave_to_mel(result["waves"][name][i], audio), name)
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
