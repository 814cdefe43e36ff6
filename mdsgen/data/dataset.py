"""Datasets in VGGSound layout: `clips/<clip_id>.mp4`, `metadata.csv` (clip_id, start_seconds, label,
split), `onsets.json` (true event onsets per clip, seconds) and `labels.json` (label -> source).

Two ways to get one:
- `build_dataset`: the embedded default. Debian's tuxpaint-stamps-default pairs photo cut-outs with real
  recordings of the same object. Each 8.192 s clip places one object's recording at random onsets and
  makes the object's picture follow the recording's loudness: it appears, pulses or hops with the
  sound. Backgrounds, positions, scales, event counts and timings vary, and distractor objects drift
  across the frame without sound, so neither identity nor timing comes from a trivial cue.
- `import_vggsound`: real clips from a VGGSound-style CSV and a folder of videos; clips that fail to
  decode are reported (stderr and `import_report.json`) and left out.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from mdsgen.base.errors import MediaError
from mdsgen.base.samples import TUXPAINT_STAMPS
from mdsgen.media.audio import load_audio
from mdsgen.media.video import encode_aac

METADATA_FIELDS = ["clip_id", "start_seconds", "label", "split"]
SPLITS = ("train", "val", "test")
# spoken words: letters, digits and faces say their name
SPOKEN_STAMP_FOLDERS = ("symbols",)


@dataclass(frozen=True)
class DatasetConfig:
    classes: tuple[str, ...] = ()   # stamp labels; empty = every eligible stamp
    clips_per_class: int = 24
    seed: int = 0
    frame_size: int = 128           # rendered square frames (decoding scales them to 224)
    fps: int = 16
    sample_rate: int = 16000
    clip_samples: int = 131072
    min_events: int = 1
    max_events: int = 3
    max_event_seconds: float = 3.0
    max_distractors: int = 2
    splits: dict = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    workers: int = 2

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        if set(self.splits) != set(SPLITS) or abs(sum(self.splits.values()) - 1) > 1e-6:
            raise ValueError(f"splits {self.splits}: need train, val and test shares that sum to 1")
        if not 1 <= self.min_events <= self.max_events:
            raise ValueError("need 1 <= min_events <= max_events")


# --- the sources ---------------------------------------------------------------------------------
def stamp_sources(root: Path = TUXPAINT_STAMPS) -> dict[str, Path]:
    """label -> stamp path without suffix, for every picture that has a recording of its own."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: install the Debian package tuxpaint-stamps-default "
                                "(apt-get install tuxpaint-stamps-default)")
    sources = {}
    for sound in sorted(root.rglob("*.ogg")):
        relative = sound.relative_to(root)
        if "_desc" in sound.stem or relative.parts[0] in SPOKEN_STAMP_FOLDERS:
            continue  # descriptions are read-aloud text
        picture = sound.with_suffix(".png")
        if picture.is_file():
            sources.setdefault(sound.stem, sound.with_suffix(""))
    if not sources:
        raise FileNotFoundError(f"{root}: no stamp has both a picture and a recording")
    return sources


@lru_cache(maxsize=None)
def stamp_picture(stem: str) -> Image.Image:
    picture = Image.open(f"{stem}.png").convert("RGBA")
    return picture.crop(picture.getbbox())


@lru_cache(maxsize=None)
def stamp_recording(stem: str, sample_rate: int) -> np.ndarray:
    """The recording at `sample_rate`, silence trimmed at both ends (so it starts at its onset), peak 0.9."""
    import librosa

    wave = load_audio(f"{stem}.ogg", sample_rate)
    wave, _ = librosa.effects.trim(wave, top_db=40)
    return (0.9 * wave / max(np.abs(wave).max(), 1e-6)).astype(np.float32)


ONSET_HOP = 128  # samples (8 ms at 16 kHz) for onset detection


def detect_onsets(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset times in seconds (librosa spectral flux, backtracked to the energy minimum before each)."""
    import librosa

    return librosa.onset.onset_detect(y=wave, sr=sample_rate, hop_length=ONSET_HOP, units="time", backtrack=True)


def compile_onset_detection(sample_rate: int) -> None:
    """Compile (and cache on disk) librosa's numba kernels for `detect_onsets` in this process, before a
    worker pool starts: workers compiling them at once can pair cache files written by different
    processes, and the next load crashes (numba issue 10128)."""
    clicks = np.zeros(sample_rate, dtype=np.float32)
    clicks[sample_rate // 4::sample_rate // 4] = 1.0
    detect_onsets(clicks, sample_rate)


@lru_cache(maxsize=None)
def attack_offset(stem: str, sample_rate: int) -> float:
    """Where the recording's first onset lies after its trimmed start (slow attacks start late)."""
    wave = stamp_recording(stem, sample_rate)
    padded = np.concatenate([np.zeros(sample_rate // 4, dtype=np.float32), wave])
    onsets = detect_onsets(padded, sample_rate) - 0.25
    onsets = onsets[onsets > -0.05]
    return float(max(0.0, onsets[0])) if len(onsets) else 0.0


# --- one clip ------------------------------------------------------------------------------------
def _place_events(rng, count: int, length: float, clip_seconds: float) -> list[float]:
    """Sorted onsets of `count` events of `length` seconds, 0.4 s apart at least (fewer if they do not fit)."""
    onsets = []
    for _ in range(count):
        for _ in range(50):
            start = rng.uniform(0.2, max(0.25, clip_seconds - length - 0.1))
            if all(abs(start - o) >= length + 0.4 for o in onsets):
                onsets.append(start)
                break
    return sorted(onsets)


def _background(rng, size: int) -> Image.Image:
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    image = np.broadcast_to(a * (1 - ramp) + b * ramp, (size, size, 3))
    if rng.random() < 0.5:
        image = image.transpose(1, 0, 2)
    image = image + rng.normal(0, rng.uniform(0, 12), image.shape)  # texture
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGBA")


def _scaled(picture: Image.Image, height: float, limit: int) -> Image.Image:
    """The picture at `height` pixels, shrunk further if it would be wider than `limit`."""
    scale = min(height / picture.height, limit / picture.width)
    return picture.resize((max(4, round(picture.width * scale)), max(4, round(picture.height * scale))),
                          Image.BILINEAR)


def _corner(cx: float, cy: float, sprite: Image.Image, size: int) -> tuple[int, int]:
    """Top-left corner that centres `sprite` on (cx, cy) as far as the frame allows."""
    return (int(np.clip(cx - sprite.width / 2, 0, size - sprite.width)),
            int(np.clip(cy - sprite.height / 2, 0, size - sprite.height)))


def render_clip(cfg: DatasetConfig, label: str, stem: str, others: list[str], index: int):
    """(frames uint8 [T, S, S, 3], audio float32 [clip_samples], onsets seconds)."""
    rng = np.random.default_rng([cfg.seed, index])
    sr, size = cfg.sample_rate, cfg.frame_size
    clip_seconds = cfg.clip_samples / sr
    recording = stamp_recording(stem, sr)

    count = int(rng.integers(cfg.min_events, cfg.max_events + 1))
    segment = recording[:min(len(recording), int(cfg.max_event_seconds * sr))].copy()
    fade = min(len(segment), int(0.05 * sr))
    segment[len(segment) - fade:] *= np.linspace(1, 0, fade)
    onsets = _place_events(rng, count, len(segment) / sr, clip_seconds)
    events_only = np.zeros(cfg.clip_samples, dtype=np.float32)
    for onset in onsets:
        begin = int(round(onset * sr))
        part = segment[:cfg.clip_samples - begin] * rng.uniform(0.5, 1.0)
        events_only[begin:begin + len(part)] += part
    noise_floor = 10 ** (rng.uniform(-70, -50) / 20)
    audio = events_only + rng.normal(0, noise_floor, cfg.clip_samples).astype(np.float32)

    # the loudness envelope at the video's frame rate drives the object's motion
    frames = int(round(clip_seconds * cfg.fps))
    hop = sr / cfg.fps
    envelope = np.array([np.sqrt(np.mean(events_only[int(i * hop):int((i + 1) * hop)] ** 2) + 1e-12)
                         for i in range(frames)])
    envelope = np.clip(envelope / max(envelope.max(), 1e-6) * 1.5, 0, 1)

    mode = rng.choice(["appear", "pulse", "hop"])
    background = _background(rng, size)
    picture = stamp_picture(stem)
    height = rng.uniform(0.3, 0.5) * size
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    distractors = []  # other objects drifting across the frame in silence
    for other in rng.choice(others, size=int(rng.integers(0, cfg.max_distractors + 1)), replace=False):
        sprite = _scaled(stamp_picture(other), rng.uniform(0.2, 0.35) * size, size)
        start, velocity = rng.uniform(0, 1, 2) * size, rng.normal(0, 0.15, 2) * size / clip_seconds
        distractors.append((sprite, start, velocity))

    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        canvas = background.copy()
        for sprite, start, velocity in distractors:
            x, y = (start + velocity * i / cfg.fps) % size
            canvas.alpha_composite(sprite, _corner(x, y, sprite, size))
        e = envelope[i]
        if mode != "appear" or e >= 0.05:
            sprite = _scaled(picture, height * (1 + 0.35 * e if mode == "pulse" else 1.0), size)
            if mode == "appear":  # fades in with the sound
                alpha = np.asarray(sprite.getchannel("A"), dtype=np.float32) * min(1.0, 3 * e)
                sprite.putalpha(Image.fromarray(alpha.astype(np.uint8)))
            lift = 0.18 * size * e if mode == "hop" else 0.0
            canvas.alpha_composite(sprite, _corner(cx, cy - lift, sprite, size))
        video[i] = np.asarray(canvas.convert("RGB"))
    return video, audio, [o + attack_offset(stem, sr) for o in onsets]


def write_clip(path: Path, video: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int) -> None:
    """H.264 video + AAC audio in MP4, written under a temporary name and renamed when complete."""
    tmp = path.with_name(f".{path.name}.partial.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        sound = out.add_stream("aac", rate=sample_rate, layout="mono")
        for i, image in enumerate(video):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        out.mux(encode_aac(sound, audio, sample_rate))
    tmp.replace(path)


def assign_splits(labels: list[str], shares: dict, seed: int) -> list[str]:
    """Stratified: each label's clips are shuffled and cut by the shares (val and test get one at least)."""
    rng = np.random.default_rng(seed)
    splits = [""] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, l in enumerate(labels) if l == label]
        rng.shuffle(members)
        n = len(members)
        n_val = max(1, round(shares["val"] * n)) if n >= 3 else 0
        n_test = max(1, round(shares["test"] * n)) if n >= 3 else 0
        for rank, i in enumerate(members):
            splits[i] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return splits


def _render_job(job):
    cfg, index, clip_id, label, stem, others, path = job
    video, audio, onsets = render_clip(cfg, label, stem, others, index)
    write_clip(Path(path), video, audio, cfg.fps, cfg.sample_rate)
    return clip_id, [round(o, 4) for o in onsets]


def write_metadata(out: Path, rows: list[dict]) -> None:
    with open(out / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def is_plain_name(name: str) -> bool:
    """An id that is safe as a file name: no folder separators, not '.' or '..', printable."""
    return bool(name) and name not in (".", "..") and not set(name) & set("/\\\0") and name.isprintable()


def read_metadata(dataset_dir) -> list[dict]:
    path = Path(dataset_dir) / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset here (run `mdsgen dataset build` or `import`)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for number, row in enumerate(rows, 2):
        if not is_plain_name(row.get("clip_id") or ""):
            raise ValueError(f"{path}, line {number}: clip_id {row.get('clip_id')!r} is not a plain file name")
    return rows


def build_dataset(cfg: DatasetConfig, out_dir) -> list[dict]:
    """Render the embedded dataset into `out_dir` (replaced). Seeded: the same config, the same clips."""
    from multiprocessing import get_context

    sources = stamp_sources()
    classes = cfg.classes or tuple(sorted(sources))
    unknown = [c for c in classes if c not in sources]
    if unknown:
        raise ValueError(f"unknown stamp labels {unknown}; available: {', '.join(sorted(sources))}")
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    (out / "clips").mkdir(parents=True)
    labels = [label for label in classes for _ in range(cfg.clips_per_class)]
    splits = assign_splits(labels, cfg.splits, cfg.seed)
    jobs = []
    for index, label in enumerate(labels):
        clip_id = f"{label}_{index:05d}"
        others = [str(sources[o]) for o in sorted(sources) if o != label]
        jobs.append((cfg, index, clip_id, label, str(sources[label]), others, str(out / "clips" / f"{clip_id}.mp4")))
    onsets = {}
    compile_onset_detection(cfg.sample_rate)
    with get_context("spawn").Pool(max(1, cfg.workers)) as pool:
        for clip_id, clip_onsets in tqdm(pool.imap_unordered(_render_job, jobs), total=len(jobs),
                                         desc="render", unit="clip"):
            onsets[clip_id] = clip_onsets
    rows = [{"clip_id": job[2], "start_seconds": 0, "label": job[3], "split": split}
            for job, split in zip(jobs, splits)]
    write_metadata(out, rows)
    (out / "onsets.json").write_text(json.dumps(dict(sorted(onsets.items())), indent=1))
    (out / "labels.json").write_text(json.dumps(
        {label: str(sources[label].relative_to(TUXPAINT_STAMPS)) for label in classes}, indent=1))
    return rows


# --- real data in VGGSound layout ---------------------------------------------------------------
def _find_video(videos: Path, youtube_id: str, start: int) -> Path | None:
    for name in (f"{youtube_id}_{start:06d}", f"{youtube_id}_{start}", youtube_id):
        for suffix in (".mp4", ".mkv", ".webm", ".avi", ".mov"):
            if (videos / f"{name}{suffix}").is_file():
                return videos / f"{name}{suffix}"
    return None


def import_vggsound(csv_path, videos_dir, out_dir, val_share: float = 0.05) -> tuple[list[dict], list[dict]]:
    """Copy the clips of a VGGSound CSV (youtube_id, start_seconds, label, split; header optional) that
    decode into a dataset folder. VGGSound has no val split: a seeded `val_share` of train becomes val.
    Returns (rows, failures); failures are printed and written to import_report.json."""
    from mdsgen.media.video import read_video_windows

    videos, out = Path(videos_dir), Path(out_dir)
    with open(csv_path, newline="") as f:
        entries = [row for row in csv.reader(f) if row and row[0].strip()]
    if entries and entries[0][1].strip().lower() in ("start_seconds", "start"):
        entries = entries[1:]
    shutil.rmtree(out, ignore_errors=True)
    (out / "clips").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, failures = [], []
    for entry in tqdm(entries, desc="import", unit="clip"):
        if len(entry) < 4:
            failures.append({"row": entry, "reason": "expected 4 columns: youtube_id, start_seconds, label, split"})
            continue
        youtube_id, start, label, split = (e.strip() for e in entry[:4])
        if not is_plain_name(youtube_id):
            failures.append({"row": entry, "reason": f"youtube_id {youtube_id!r} is not a plain file name"})
            continue
        try:
            start = int(float(start))
        except ValueError:
            failures.append({"row": entry, "reason": f"start_seconds {start!r} is not a number"})
            continue
        clip_id = f"{youtube_id}_{start:06d}"
        source = _find_video(videos, youtube_id, start)
        if source is None:
            failures.append({"clip_id": clip_id, "reason": f"no video file for it in {videos}"})
            continue
        try:
            read_video_windows(source)
            load_audio(source)
        except MediaError as err:
            failures.append({"clip_id": clip_id, "path": str(source), "reason": err.reason})
            continue
        split = "test" if split == "test" else ("val" if rng.random() < val_share else "train")
        shutil.copyfile(source, out / "clips" / f"{clip_id}.mp4")
        rows.append({"clip_id": clip_id, "start_seconds": start, "label": label, "split": split})
    write_metadata(out, rows)
    (out / "onsets.json").write_text("{}")  # unknown for real data: sync metrics skip these clips
    (out / "labels.json").write_text(json.dumps({r["label"]: "vggsound" for r in rows}, indent=1))
    (out / "import_report.json").write_text(json.dumps({"imported": len(rows), "failed": failures}, indent=1))
    for failure in failures:
        print(f"skipped {failure.get('clip_id', failure.get('row'))}: {failure['reason']}", file=sys.stderr)
    return rows, failures
