"""Video files in, soundtrack files out, for a batch: the inputs a folder or CSV names, one WAV (and the
video muxed with it) per input, a failing input reported and skipped. No torch: the gRPC client uses it too."""
from __future__ import annotations

import csv
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
from tqdm import tqdm

from mdsgen.base import storage
from mdsgen.base.errors import MediaError
from mdsgen.media.video import mux_audio

VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".wmv", ".3gp",
                  ".png", ".jpg", ".jpeg", ".webp", ".bmp"}  # a picture is a still scene


@dataclass
class Soundtrack:
    wave: np.ndarray      # float32 mono, as long as the video
    sample_rate: int
    windows: int
    timings: dict = field(default_factory=dict)  # seconds per stage
    model_version: str = ""                       # the served version, for soundtracks from a server


@dataclass
class Result:
    input: Path
    wav: Path | None = None
    video: Path | None = None
    error: str | None = None
    seconds: float = 0.0


def write_wav(path, wave: np.ndarray, sample_rate: int) -> None:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wave, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    storage.write_bytes(path, buffer.getvalue())


def list_inputs(source, split: str | None = None) -> list[Path]:
    """A video file, a folder of videos, or a CSV listing them: a `path`/`video`/`file` column (else the
    first) relative to the CSV, or a dataset's metadata.csv (`clip_id` -> clips/<clip_id>.mp4).
    `split` keeps the CSV rows of that split."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        for other in sorted(set(source.iterdir()) - set(files)):
            print(f"skipped: {other} ({'a folder' if other.is_dir() else 'not a video or picture file name'})",
                  file=sys.stderr)
        if not files:
            raise FileNotFoundError(f"{source}: no video files in this folder")
        return files
    if source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise ValueError(f"{source}: empty CSV")
        header = [h.strip().lower() for h in rows[0]]
        named = next((c for c in ("path", "video", "file", "clip_id") if c in header), None)
        body = rows[1:] if named else rows
        column = header.index(named) if named else 0
        if split is not None:
            if "split" not in header:
                raise ValueError(f"{source}: no split column to select {split!r} from")
            body = [r for r in body if r[header.index("split")].strip() == split]
        values = [r[column].strip() for r in body if len(r) > column and r[column].strip()]
        if named == "clip_id":
            return [source.parent / "clips" / f"{v}.mp4" for v in values]
        return [source.parent / v for v in values]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    return [source]


def output_stems(inputs: list[Path]) -> list[str]:
    """One output name per input: `<stem>`, and `<stem>-2`, `<stem>-3`... for later inputs whose name is taken
    (a/clip.mp4 and b/clip.mp4 in one batch must not overwrite each other or share a temporary file)."""
    taken, stems = set(), []
    for path in inputs:
        stem, n = path.stem, 1
        while stem in taken:
            n += 1
            stem = f"{path.stem}-{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def write_soundtracks(inputs: list[Path], outdir, make: Callable[[Path], Soundtrack], mux: bool = True,
                      workers: int = 1) -> list[Result]:
    """`make` a soundtrack for every input and write `<stem>.wav` (and the muxed video) into `outdir`.
    A failing input is reported and skipped; `workers` > 1 runs inputs concurrently (for a server)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    def one(path: Path, stem: str) -> Result:
        result, start = Result(path), time.perf_counter()
        try:
            track = make(path)
            result.wav = outdir / f"{stem}.wav"
            write_wav(result.wav, track.wave, track.sample_rate)
            if mux:
                result.video = mux_audio(path, track.wave, track.sample_rate, outdir / stem)
        except MediaError as err:
            result.error = str(err)
        except Exception as err:  # one broken file must not stop a batch; say what broke
            result.error = f"{path}: {type(err).__name__}: {err}"
        result.seconds = time.perf_counter() - start
        if result.error:
            print(f"error: {result.error}", file=sys.stderr)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(one, inputs, output_stems(inputs)), total=len(inputs), desc="generate", unit="video",
                         disable=len(inputs) < 2))
