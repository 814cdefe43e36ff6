"""Small real media files written with PyAV for the tests."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mdsgen.media.video import encode_aac


def frame_level(index: int) -> int:
    """The grey level of frame `index` in `make_video` files: frames are told apart by brightness."""
    return 20 + (index * 5) % 200


def make_video(path, seconds: float = 3.0, fps: int = 10, size=(160, 120), codec: str = "libx264",
               audio: bool = True, sample_rate: int = 44100) -> Path:
    """A video whose frame i is uniformly grey at `frame_level(i)`, with an optional sine soundtrack."""
    path = Path(path)
    width, height = size
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height = width, height
        video.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        sound = out.add_stream("aac", rate=sample_rate, layout="mono") if audio else None
        frames = round(seconds * fps)
        for i in range(frames):
            image = np.full((height, width, 3), frame_level(i), dtype=np.uint8)
            image[: height // 4, : width // 4] = (255, 0, 0)  # a red corner: colours stay in order
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            t = np.arange(round(seconds * sample_rate)) / sample_rate
            out.mux(encode_aac(sound, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sample_rate))
    return path


def make_audio_only(path, seconds: float = 2.0, sample_rate: int = 22050) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        sound = out.add_stream("aac", rate=sample_rate, layout="mono")
        wave = (0.3 * np.sin(2 * np.pi * 330 * np.arange(round(seconds * sample_rate)) / sample_rate)).astype(np.float32)
        out.mux(encode_aac(sound, wave, sample_rate))
    return Path(path)


def streams(path) -> list[tuple[str, str, float]]:
    """(type, codec, seconds) of every stream."""
    with av.open(str(path)) as c:
        return [(s.type, s.codec_context.name, float(s.duration * s.time_base) if s.duration else
                 c.duration / 1e6) for s in c.streams]


def video_packets(path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(video=0) if p.dts is not None]


def rotate_mp4(path, out_path) -> Path:
    """Copy an MP4 whose track header says: display rotated 90 degrees clockwise (as phones write)."""
    import struct

    data = bytearray(Path(path).read_bytes())
    matrix = data.find(b"tkhd") + 44  # after version/flags, times, ids, duration, layer, volume
    assert struct.unpack(">9i", data[matrix:matrix + 36])[0] == 65536, "expected an identity matrix"
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    Path(out_path).write_bytes(bytes(data))
    return Path(out_path)


def darken(source, path, factor: float = 0.05) -> Path:
    """A copy of `source`'s video stream with every frame's brightness scaled by `factor` (no sound)."""
    path = Path(path)
    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        stream = src.streams.video[0]
        video = out.add_stream("libx264", rate=stream.average_rate)
        video.width, video.height, video.pix_fmt = stream.width, stream.height, "yuv420p"
        for i, frame in enumerate(src.decode(stream)):
            image = (frame.to_ndarray(format="rgb24") * factor).astype(np.uint8)
            new = av.VideoFrame.from_ndarray(image, format="rgb24")
            new.pts = i
            out.mux(video.encode(new))
        out.mux(video.encode(None))
    return path


def two_frames(path, width, height, seconds_apart, codec="ffv1"):
    """A tiny file of two frames `seconds_apart` apart (millisecond time base)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p" if codec != "ffv1" else "yuv444p"
        stream.time_base = Fraction(1, 1000)
        for pts in (0, int(seconds_apart * 1000)):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def tiny_rate(path, seconds_per_frame: int, frames: int = 3):
    """A tiny file whose stream claims one frame every `seconds_per_frame` seconds (its rate and time base)."""
    rate = Fraction(1, seconds_per_frame)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=rate)
        stream.width, stream.height, stream.pix_fmt, stream.time_base = 64, 64, "yuv444p", 1 / rate
        for pts in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, 1 / rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path

