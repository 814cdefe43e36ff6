"""Feature caches for training: per clip, frame features [32, F] at 4 fps and the mel [128, 512];
then, once a VAE exists, one latent file per split.

`extract_features` is incremental: `index.json` maps each clip to a fingerprint of its file and of the
settings, so a re-run only processes new or changed clips and drops the ones no longer listed.
Work is spread over processes (each loads the frame encoder once and uses one thread).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mdsgen.base.errors import MediaError
from mdsgen.data.dataset import read_metadata
from mdsgen.media.audio import AudioConfig, fit_length, load_audio, wave_to_mel
from mdsgen.media.video import VideoConfig, frames_to_tensor, read_video_windows
from mdsgen.model.encoders import FrameEncoderSpec, build_frame_encoder

INDEX = "index.json"


@dataclass(frozen=True)
class FeatureExtraction:
    """params.yaml `features`."""
    workers: int = 2  # processes for feature extraction


def _fingerprint(path: Path, settings: str) -> str:
    digest = hashlib.sha256(settings.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def clip_arrays(path, encoder, audio_cfg: AudioConfig, video_cfg: VideoConfig) -> dict:
    """The first window of one clip: frame features [32, F], mel [128, 512], real duration."""
    windows = read_video_windows(path, video_cfg, audio_cfg.clip_seconds)
    frames = windows.grid[:video_cfg.frames_per_window]
    with torch.inference_mode():
        features = encoder(frames_to_tensor(frames)[None])[0].numpy()
    wave = fit_length(load_audio(path, audio_cfg.sample_rate), audio_cfg.clip_samples)
    mel = wave_to_mel(wave, audio_cfg).numpy()
    return {"features": features.astype(np.float32), "mel": mel.astype(np.float32),
            "duration": np.float32(min(windows.duration, audio_cfg.clip_seconds))}


def save_npz(path: Path, arrays: dict) -> None:
    """np.savez through a buffer (it would append .npz to a path) and an atomic rename."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


_worker = {}


def _init_worker(encoder_spec, audio_cfg, video_cfg):
    torch.set_num_threads(1)
    _worker.update(encoder=build_frame_encoder(encoder_spec), audio=audio_cfg, video=video_cfg)


def _extract_job(job):
    clip_id, path, out_path, fingerprint = job
    try:
        arrays = clip_arrays(path, _worker["encoder"], _worker["audio"], _worker["video"])
    except MediaError as err:
        return clip_id, None, str(err)
    save_npz(Path(out_path), arrays)
    return clip_id, fingerprint, None


def extract_features(dataset_dir, out_dir, encoder_spec: FrameEncoderSpec, audio_cfg: AudioConfig = AudioConfig(),
                     video_cfg: VideoConfig = VideoConfig(), workers: int = 2) -> dict:
    """Bring `out_dir` up to date with the dataset; returns counts of computed, reused, removed, failed."""
    from multiprocessing import get_context

    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metadata(dataset_dir)
    settings = json.dumps([encoder_spec.as_dict(), audio_cfg.mel_settings(), asdict(video_cfg)], sort_keys=True)
    index_path = out / INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    wanted = {r["clip_id"] for r in rows}
    removed = [c for c in index if c not in wanted]
    for clip_id in removed:
        (out / f"{clip_id}.npz").unlink(missing_ok=True)
        del index[clip_id]
    jobs = []
    for row in rows:
        path = dataset_dir / "clips" / f"{row['clip_id']}.mp4"
        fingerprint = _fingerprint(path, settings)
        if index.get(row["clip_id"]) != fingerprint or not (out / f"{row['clip_id']}.npz").is_file():
            jobs.append((row["clip_id"], str(path), str(out / f"{row['clip_id']}.npz"), fingerprint))
    failed = []
    try:
        if jobs:
            with get_context("spawn").Pool(max(1, min(workers, len(jobs))), _init_worker,
                                           (encoder_spec, audio_cfg, video_cfg)) as pool:
                for clip_id, fingerprint, error in tqdm(pool.imap_unordered(_extract_job, jobs),
                                                        total=len(jobs), desc="features", unit="clip"):
                    if error:
                        failed.append(error)
                        index.pop(clip_id, None)
                        print(f"skipped: {error}", file=sys.stderr)
                    else:
                        index[clip_id] = fingerprint
    finally:  # what finished stays counted even if the run is interrupted
        index_path.write_text(json.dumps(dict(sorted(index.items())), indent=1))
    return {"computed": len(jobs) - len(failed), "reused": len(rows) - len(jobs), "removed": len(removed),
            "failed": failed}


def load_split(dataset_dir, features_dir, split: str) -> dict:
    """Stacked arrays of one split: clip_ids, labels, features [N, 32, F], mels [N, 128, 512]."""
    rows = [r for r in read_metadata(dataset_dir) if r["split"] == split]
    rows = [r for r in rows if (Path(features_dir) / f"{r['clip_id']}.npz").is_file()]
    if not rows:
        raise FileNotFoundError(f"{features_dir}: no features for the {split} split (run `mdsgen features`)")
    arrays = [load_npz(Path(features_dir) / f"{r['clip_id']}.npz") for r in rows]
    return {"clip_ids": [r["clip_id"] for r in rows], "labels": [r["label"] for r in rows],
            "features": torch.from_numpy(np.stack([a["features"] for a in arrays])),
            "mels": torch.from_numpy(np.stack([a["mel"] for a in arrays]))}


LATENTS_INDEX = "index"  # the clip ids and labels of a latents file, in order


def save_latents(path, latents: torch.Tensor, features: torch.Tensor, clip_ids: list, labels: list) -> None:
    """One split's latents [N, C, H, W] and frame features [N, T, F], with its clip index, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    # One metadata entry: safetensors writes several in a random order on every write, and the file's
    # bytes (its DVC hash, and so every stage after it) would change on each re-run.
    meta = {LATENTS_INDEX: json.dumps({"clip_ids": list(clip_ids), "labels": list(labels)})}
    tmp = path.with_name(f".{path.name}.partial")
    save_file({"latents": latents.contiguous(), "features": features.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)


def encode_latents(dataset_dir, features_dir, vae, out_dir, batch_size: int = 16) -> dict:
    """Mel -> VAE latents for every split, saved with their frame features as `<split>.safetensors`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val", "test"):
        try:
            data = load_split(dataset_dir, features_dir, split)
        except FileNotFoundError:
            continue
        with torch.inference_mode():
            latents = torch.cat([vae.encode(m) for m in data["mels"].split(batch_size)])
        save_latents(out / f"{split}.safetensors", latents, data["features"], data["clip_ids"], data["labels"])
        counts[split] = len(data["clip_ids"])
    return counts


def load_latents(latents_dir, split: str) -> dict:
    from safetensors import safe_open

    path = Path(latents_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latents for the {split} split (run `mdsgen encode`)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if LATENTS_INDEX not in meta:
            raise ValueError(f"{path}: no clip index in its metadata (written by an older mdsgen: re-run "
                             "`mdsgen encode`, or `dvc repro encode`)")
        index = json.loads(meta[LATENTS_INDEX])
        return {"latents": f.get_tensor("latents"), "features": f.get_tensor("features"),
                "clip_ids": index["clip_ids"], "labels": index["labels"]}
