"""Audio metrics for evaluation: Frechet distance, KL, Inception-style score and class agreement on a
pretrained sound-effects network, and onset synchronisation against known event times.

The network is aisfx's (PyPI `aisfx`, MIT; Cross-Task "X-Sequential-CE"): 96-bin htk mel at 44.1 kHz,
n_fft 2048, hop 1024, log10(S * 1e4 + 1) / 9.4578, in blocks of 100 frames (2.3 s) -> a 512-d
embedding per block, and the `ucsMixed` head's 69 sound-effect classes. Its checkpoint holds numpy
scalars, so it loads with `weights_only=True` and exactly those numpy types allowed (no pickled code).
"""
from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import torch
from scipy import linalg

from mdsgen.data.dataset import ONSET_HOP, detect_onsets
from mdsgen.media.audio import AudioConfig, wave_to_mel

SAMPLE_RATE = 44100
N_FFT, HOP, N_MELS = 2048, 1024, 96
BLOCK_FRAMES, BLOCK_HOP = 100, 50
LOG_MAX = 9.457798957824707      # aisfx's 'original' normalisation: the log-mel maximum over its datasets
CLASS_HEAD = "ucsMixed"
ONSET_TOLERANCE = 0.125          # seconds: the sync tolerance the field uses (Diff-Foley's onset metrics)


def aisfx_checkpoint() -> Path:
    import aisfx.models

    return Path(aisfx.models.__file__).with_name("checkpoint.pth")


class SoundNet:
    """aisfx's network: waves (any rate) -> per-block embeddings and class probabilities.

    `band_rate`: every wave is first resampled to this rate where it is lower than the wave's, so the network
    hears only the band that recordings at that rate hold. aisfx reads to 22 kHz on a log scale that answers
    to energy 40 dB down: the same real recordings loaded at 22,050 and at their own 16,000 Hz score FD 46.5 and
    class agreement 0.63 against each other (REPORT.md 5p), a gap that is the resampler's, not the sound's."""

    def __init__(self, device: str = "cpu", band_rate: int | None = None):
        from aisfx.models.cnn2d import CrossNet, EmbeddingNet

        allowed = [np.core.multiarray.scalar, np.dtype, np.dtypes.Int64DType]
        with torch.serialization.safe_globals(allowed):
            weights, heads = torch.load(aisfx_checkpoint(), map_location="cpu", weights_only=True)
        self.net = CrossNet(EmbeddingNet("max", 3, 1, 64), heads, "cpu")
        self.net.load_state_dict(weights)
        self.net.to(device).eval()
        self.device, self.band_rate = device, band_rate
        self.mel_basis = torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0,
                                                              fmax=SAMPLE_RATE / 2, htk=True, norm=1)).float()
        self.window = torch.hann_window(N_FFT)

    def blocks(self, wave: np.ndarray, sample_rate: int) -> torch.Tensor:
        """[blocks, 100, 96] log-mel blocks of one clip, peak-normalised as aisfx does."""
        y = np.asarray(wave, dtype=np.float32)
        if self.band_rate and self.band_rate < sample_rate:
            y, sample_rate = librosa.resample(y, orig_sr=sample_rate, target_sr=self.band_rate), self.band_rate
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
        y = y / max(float(np.abs(y).max()), 1e-8)
        spec = torch.stft(torch.from_numpy(y), N_FFT, HOP, window=self.window, center=True, pad_mode="constant",
                          return_complex=True).abs() ** 2
        logmel = torch.log10(self.mel_basis @ spec * 1e4 + 1.0).T / LOG_MAX          # [frames, 96]
        if len(logmel) < BLOCK_FRAMES:
            logmel = torch.nn.functional.pad(logmel, (0, 0, 0, BLOCK_FRAMES - len(logmel)))
        return logmel.unfold(0, BLOCK_FRAMES, BLOCK_HOP).transpose(1, 2).contiguous()

    @torch.no_grad()
    def __call__(self, waves: list[np.ndarray], sample_rate: int) -> dict:
        """embeddings: [all blocks, 512]; probs: [clips, 69] (block softmax averaged per clip)."""
        embeddings, probs = [], []
        for wave in waves:
            emb, logits = self.net(self.blocks(wave, sample_rate).to(self.device), CLASS_HEAD)
            embeddings.append(emb.cpu())
            probs.append(logits.softmax(-1).mean(0).cpu())
        return {"embeddings": torch.cat(embeddings).double().numpy(), "probs": torch.stack(probs).double().numpy()}


class ObjectProbe:
    """Which of the dataset's objects does a clip sound like? A logistic regression on the mean log-mel
    spectrum of each clip's loudest quarter of frames, fit on the training split's real recordings.

    It reads the spectrum only, not texture or timing (FD and aisfx judge how natural the sound is): on the
    embedded dataset aisfx gives real audio of the right object at other times (retrieval) 0.29 class
    agreement, so it cannot tell a wrong object from a right one rendered badly; this probe can."""

    def __init__(self, waves: list[np.ndarray], labels: list[str], audio: AudioConfig):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(set(labels)) < 2:
            raise ValueError(f"an object probe needs at least two labels in the training split, got {sorted(set(labels))}")
        self.audio = audio
        self.classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        self.classifier.fit(self.spectra(waves), labels)

    def spectra(self, waves: list[np.ndarray], chunk: int = 16) -> np.ndarray:
        """[clips, bins]; `chunk` clips at a time, so the training set's spectrograms are never all in memory."""
        out = []
        for start in range(0, len(waves), chunk):
            mel = wave_to_mel(np.stack(waves[start:start + chunk]), self.audio).numpy()  # [clips, bins, frames]
            loudest = np.argsort(mel.mean(1), axis=1)[:, -max(1, mel.shape[-1] // 4):]
            out.append(np.take_along_axis(mel, loudest[:, None, :], axis=2).mean(2))
        return np.concatenate(out)

    def match(self, waves: list[np.ndarray], labels: list[str]) -> float:
        """The share of clips assigned to their own label."""
        return float(np.mean(self.classifier.predict(self.spectra(waves)) == np.asarray(labels)))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of embeddings [n, d]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise as the FID reference code does
        eye = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def paired_kl(real: np.ndarray, generated: np.ndarray) -> float:
    """Mean KL(p_real || p_generated) over paired clips' class distributions."""
    eps = 1e-10
    return float(np.mean(np.sum(real * (np.log(real + eps) - np.log(generated + eps)), axis=1)))


def inception_score(probs: np.ndarray) -> float:
    eps = 1e-10
    marginal = probs.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(probs * (np.log(probs + eps) - np.log(marginal + eps)), axis=1))))


def class_agreement(real: np.ndarray, generated: np.ndarray) -> float:
    return float(np.mean(real.argmax(1) == generated.argmax(1)))


def onset_auc(wave: np.ndarray, sample_rate: int, truth: np.ndarray, tolerance: float = ONSET_TOLERANCE) -> float:
    """Threshold-free sync: the ROC AUC of the wave's onset strength at the true onsets against elsewhere.
    Both sides take the envelope's peak within +-`tolerance` of their centre: the positives are centred on
    the true onsets, the negatives on every frame at least two tolerances from all of them. Unlike
    detected-onset F1, noise and silence cannot score well: they sit at 0.5."""
    from scipy.ndimage import maximum_filter1d

    strength = librosa.onset.onset_strength(y=np.asarray(wave, dtype=np.float32), sr=sample_rate, hop_length=ONSET_HOP)
    radius = max(1, round(tolerance * sample_rate / ONSET_HOP))
    peaks = maximum_filter1d(strength, size=2 * radius + 1, mode="nearest")
    frames = np.arange(len(strength))
    onset_frames = np.round(np.asarray(truth, dtype=float) * sample_rate / ONSET_HOP).astype(int)
    onset_frames = onset_frames[(onset_frames >= 0) & (onset_frames < len(strength))]
    far = (np.abs(frames[:, None] - onset_frames[None, :]) > 2 * radius).all(1)
    if not len(onset_frames) or not far.any():
        return float("nan")
    pos, neg = peaks[onset_frames][:, None], peaks[far][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def onset_sync(waves: list[np.ndarray], sample_rate: int, true_onsets: list[list[float]],
               tolerance: float = ONSET_TOLERANCE) -> dict:
    """Onsets detected in each wave against the clip's true event onsets (seconds).

    median_error_ms: over true onsets, the distance to the nearest detected onset (a clip with none
    detected counts its clip length); recall / precision: shares of true / detected onsets that have a
    partner within `tolerance`; f1 combines them. Noise fires the detector everywhere and scores a fair
    recall and error, so read these beside `onset_auc` (mean over clips of `onset_auc`), which it cannot fool.
    """
    errors, hits_true, hits_detected, detected_total, aucs = [], 0, 0, 0, []
    for wave, truth in zip(waves, true_onsets):
        aucs.append(onset_auc(wave, sample_rate, truth, tolerance))
        found = detect_onsets(np.asarray(wave, dtype=np.float32), sample_rate)
        truth = np.asarray(truth, dtype=float)
        miss = len(wave) / sample_rate
        for t in truth:
            errors.append(np.abs(found - t).min() if len(found) else miss)
        hits_true += int(sum(len(found) and np.abs(found - t).min() <= tolerance for t in truth))
        hits_detected += int(sum(len(truth) and np.abs(truth - d).min() <= tolerance for d in found))
        detected_total += len(found)
    recall = hits_true / max(1, len(errors))
    precision = hits_detected / max(1, detected_total)
    return {"onset_median_error_ms": float(np.median(errors) * 1000) if errors else float("nan"),
            "onset_recall": recall, "onset_precision": precision,
            "onset_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "onset_auc": float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan"),
            "onsets_per_clip": detected_total / max(1, len(waves))}


def audio_scores(r: dict, g: dict) -> dict:
    """Distribution and per-clip class metrics of generated clips against their real counterparts, from
    the SoundNet outputs of both (`r` real, `g` generated)."""
    return {"frechet_distance": frechet_distance(r["embeddings"], g["embeddings"]),
            "kl": paired_kl(r["probs"], g["probs"]), "inception_score": inception_score(g["probs"]),
            "class_agreement": class_agreement(r["probs"], g["probs"])}
