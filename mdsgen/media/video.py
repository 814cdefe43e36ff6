"""Video front-end: PyAV decoding into 4 fps windows of 32 frames, and muxing a new soundtrack.

Windows: 32 frames at 4 fps start every `hop_frames` frames (28 = 7.0 s by default), each paired with
8.192 s of audio; consecutive windows overlap by 1.192 s of audio, where their waveforms are
crossfaded. Because the hop is a whole number of frames, every window's frames lie on one 4 fps grid
and are decoded once. A video shorter than its last window is padded by repeating its last frame (the
padded frames look like the scene, so the condition stays in distribution); the real duration is kept
and the generated audio is cut to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mdsgen.base.errors import MediaError, describe


TIME_TOLERANCE = 1e-3  # seconds


@dataclass(frozen=True)
class VideoConfig:
    fps: float = 4.0
    frames_per_window: int = 32
    hop_frames: int = 28
    frame_size: int = 224

    @property
    def hop_seconds(self) -> float:
        return self.hop_frames / self.fps


@dataclass(frozen=True)
class ReadLimits:
    """What one video may cost to read, checked before and while decoding (a 1 KB file whose two frames are
    10 hours apart must not fill a 4 fps grid with 144,000 frames)."""
    max_seconds: float = 1800.0          # 30 minutes: a 4 fps grid of 224 x 224 frames is about 1 GB
    max_pixels: int = 8192 * 4320        # per frame (8K)
    max_aspect: float = 8.0              # longer side over shorter: 4096 x 2 would scale to 458,752 x 224
    max_fps: float = 240.0               # decoded frames per second of video (slow motion phones record 240)

    def __post_init__(self):
        for name, least in (("max_seconds", 1e-3), ("max_pixels", 1), ("max_aspect", 1), ("max_fps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not least <= value < math.inf:
                raise ValueError(f"{name} {value!r}: must be a number of at least {least:g}")

    @classmethod
    def for_windows(cls, windows: int, cfg: VideoConfig, clip_seconds: float) -> "ReadLimits":
        return cls(max_seconds=clip_seconds + (windows - 1) * cfg.hop_seconds)


def check_frame_size(path, width: int, height: int, limits: ReadLimits) -> None:
    if width < 1 or height < 1:
        raise MediaError(path, f"frames of {width} x {height} pixels")
    if width * height > limits.max_pixels:
        raise MediaError(path, f"frames of {width} x {height} pixels exceed the limit of {limits.max_pixels:,} pixels")
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise MediaError(path, f"frames of {width} x {height} pixels exceed the aspect ratio limit of "
                               f"{limits.max_aspect:g}:1")


def is_still_image(container) -> bool:
    """A picture (PNG, JPEG, WebP, ...), whatever its file name says: FFmpeg reads it with an image demuxer."""
    name = container.format.name
    return name == "image2" or name.endswith("_pipe")


@dataclass
class VideoWindows:
    grid: np.ndarray     # uint8 [frames, size, size, 3]: every frame on the 4 fps grid, padding included
    duration: float      # seconds of real video (audio is trimmed to it); for a still image, the asked length
    real_frames: int     # frames of the grid inside the video (the rest repeat the last one)
    count: int           # windows
    cfg: VideoConfig
    still: bool = False  # a picture, shown for `duration`

    def slices(self) -> list[slice]:
        step, size = self.cfg.hop_frames, self.cfg.frames_per_window
        return [slice(w * step, w * step + size) for w in range(self.count)]

    @property
    def frames(self) -> np.ndarray:
        """uint8 [windows, frames_per_window, size, size, 3]."""
        return np.stack([self.grid[s] for s in self.slices()])


# A video at most this much longer than its windows ends in silence instead of paying for one more window:
# the embedded dataset's 8.1875 s clips against the 8.173 s window would otherwise cost two windows for 14 ms.
SILENT_TAIL_SECONDS = 0.05


def window_count(duration: float, clip_seconds: float, hop_seconds: float,
                 silent_tail: float = SILENT_TAIL_SECONDS) -> int:
    if duration <= clip_seconds + silent_tail:
        return 1
    return 1 + math.ceil((duration - clip_seconds - silent_tail) / hop_seconds - 1e-9)


def _to_rgb(frame: av.VideoFrame, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, apply the display rotation, centre-crop a square."""
    scale = size / min(frame.width, frame.height)
    width, height = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
    image = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    rotation = getattr(frame, "rotation", 0) or 0
    if rotation % 360:
        image = np.rot90(image, k=round(rotation / 90) % 4)  # rotation is counterclockwise
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def open_media(path, stream: str = "video") -> av.container.InputContainer:
    """Open `path` with PyAV, refusing with the reason a file that is missing, empty, unreadable or lacks a
    `stream` ("video" or "audio") stream."""
    if not Path(path).is_file():
        raise MediaError(path, "no such file")
    if Path(path).stat().st_size == 0:
        raise MediaError(path, "file is empty")
    try:
        container = av.open(str(path))
    except Exception as err:
        kind = "a video" if stream == "video" else "media"
        raise MediaError(path, f"cannot be opened as {kind} ({describe(err)})") from err
    if not getattr(container.streams, stream):
        container.close()
        raise MediaError(path, f"has no {stream} stream")
    return container


def is_still(path) -> bool:
    """Whether the file at `path` is a picture rather than a video (only its header is read)."""
    with open_media(path) as container:
        return is_still_image(container)


def read_video_windows(path, cfg: VideoConfig = VideoConfig(), clip_seconds: float = 8.192,
                       limits: ReadLimits = ReadLimits(), still_seconds: float | None = None) -> VideoWindows:
    """Decode `path` once and cut it into the windows the denoiser conditions on, within `limits`.
    A still image is a scene of `still_seconds` (default: one window) showing it."""
    container = open_media(path)
    still = is_still_image(container)
    grid: list[np.ndarray] = []
    end_time = 0.0

    def check_time(t: float) -> None:
        if t > limits.max_seconds + TIME_TOLERANCE:
            raise MediaError(path, f"video runs to {t:.0f} s, past the limit of {limits.max_seconds:.0f} s")

    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        check_frame_size(path, stream.codec_context.width or 1, stream.codec_context.height or 1, limits)
        if container.duration:  # what the container claims, before decoding anything
            check_time(container.duration / av.time_base)
        start, current, current_rgb, decoded = None, None, None, 0

        def shown():  # each decoded frame is converted once, however many grid times it covers
            nonlocal current_rgb
            if current_rgb is None:
                current_rgb = _to_rgb(current, cfg.frame_size)
            return current_rgb

        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if start is None:
                    start = frame.time
                t = frame.time - start
                check_time(t)
                decoded += 1  # frames crowded into little time (or sharing one) cost decoding all the same
                if decoded > limits.max_fps * (t + 1.0):
                    raise MediaError(path, f"{decoded} frames in its first {t:.2f} s: more than the limit of "
                                           f"{limits.max_fps:g} frames per second")
                if current is None or (frame.width, frame.height) != (current.width, current.height):
                    check_frame_size(path, frame.width, frame.height, limits)
                # the frame on screen at grid time k / fps is the last one that started by then
                # (within a millisecond: Matroska and WebM store times in whole milliseconds)
                while current is not None and len(grid) / cfg.fps < t - TIME_TOLERANCE:
                    grid.append(shown())
                current, current_rgb = frame, None
                end_time = t + _frame_duration(stream)
        except av.error.FFmpegError as err:
            if current is None:
                raise MediaError(path, f"video cannot be decoded ({describe(err)})") from err
            # a damaged tail: keep what decoded, as players do
        if current is None:
            raise MediaError(path, "video stream has no decodable frames")
        if still:
            end_time = clip_seconds if still_seconds is None else still_seconds
            if end_time <= 0:
                raise MediaError(path, f"a still image needs a positive duration, not {end_time} s")
        check_time(end_time)  # a file that claims a tiny frame rate stretches its last frame
        while len(grid) / cfg.fps < end_time - TIME_TOLERANCE:
            grid.append(shown())
    real = len(grid)
    count = window_count(end_time, clip_seconds, cfg.hop_seconds)
    needed = (count - 1) * cfg.hop_frames + cfg.frames_per_window
    grid.extend([grid[-1]] * (needed - real))
    return VideoWindows(np.stack(grid), duration=end_time, real_frames=real, count=count, cfg=cfg, still=still)


def _frame_duration(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return 1.0 / float(rate) if rate else 0.0


def frames_to_tensor(frames: np.ndarray):
    """uint8 [..., H, W, 3] -> float32 torch [..., 3, H, W] in [0, 1]."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(frames))
    return tensor.movedim(-1, -3).float().div_(255.0)


# Codecs an MP4 file can hold; others keep their stream in Matroska, which holds nearly anything.
MP4_VIDEO_CODECS = {"h264", "hevc", "mpeg4", "av1", "vp9", "mjpeg", "mpeg2video", "mpeg1video"}


def mux_audio(video_path, wave: np.ndarray, sample_rate: int, out_stem) -> Path:
    """Write `out_stem` + .mp4 (or .mkv for codecs MP4 cannot hold): the input's video stream copied
    packet for packet, plus `wave` as AAC. Returns the path written.

    The audio starts at the first video frame, as the windows do. Packets of both streams are
    interleaved by time. The file appears under its name only when complete.
    """
    with open_media(video_path) as source:
        if is_still_image(source):
            return _still_with_audio(video_path, next(source.decode(video=0)), wave, sample_rate, out_stem)
        in_video = source.streams.video[0]
        suffix = ".mp4" if in_video.codec_context.name in MP4_VIDEO_CODECS else ".mkv"
        out_path = Path(f"{out_stem}{suffix}")
        tmp = out_path.with_name(f".{out_path.stem}.partial{suffix}")
        video_start = float((in_video.start_time or 0) * in_video.time_base)
        try:
            with av.open(str(tmp), "w") as sink:
                out_video = sink.add_stream_from_template(in_video)
                out_audio = sink.add_stream("aac", rate=sample_rate, layout="mono")
                audio_packets = encode_aac(out_audio, wave, sample_rate, video_start)
                _interleave(sink, source.demux(in_video), out_video, audio_packets)
            tmp.replace(out_path)
        finally:
            tmp.unlink(missing_ok=True)
    return out_path


def _still_with_audio(image_path, picture: av.VideoFrame, wave: np.ndarray, sample_rate: int, out_stem) -> Path:
    """An MP4 that shows the picture (H.264 at 1 fps, sides rounded down to even) for as long as `wave` lasts."""
    out_path = Path(f"{out_stem}.mp4")
    tmp = out_path.with_name(f".{out_path.stem}.partial.mp4")
    width, height = max(2, picture.width // 2 * 2), max(2, picture.height // 2 * 2)
    image = picture.reformat(width=width, height=height, format="yuv420p")
    try:
        with av.open(str(tmp), "w") as sink:
            video = sink.add_stream("libx264", rate=1, options={"crf": "18", "preset": "veryfast"})
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            audio = sink.add_stream("aac", rate=sample_rate, layout="mono")
            pixels = image.to_ndarray()  # converted once; each second re-sends the same picture
            for second in range(max(1, math.ceil(len(wave) / sample_rate))):
                frame = av.VideoFrame.from_ndarray(pixels, format="yuv420p")
                frame.pts = second
                sink.mux(video.encode(frame))
            sink.mux(video.encode(None))
            sink.mux(encode_aac(audio, wave, sample_rate))
        tmp.replace(out_path)
    except av.error.FFmpegError as err:
        raise MediaError(image_path, f"cannot write the still as a video ({describe(err)})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


TRIM_MAX_SIDE = 720  # a trimmed copy's shorter side: enough for the frame encoder (224) and a preview


def trim_video(path, start: float, duration: float | None, out_path, limits: ReadLimits = ReadLimits()) -> Path:
    """The part of `path` shown from `start` for `duration` seconds (to its end for None), as a silent H.264 MP4
    at the source's frame rate, decoded and encoded in one pass (memory stays one frame): the frame shown at
    each output time is the last one that started by then."""
    if start < 0 or (duration is not None and duration <= 0):
        raise MediaError(path, f"cannot trim from {start} s for {duration} s: the start must be 0 or later and "
                               "the duration positive")
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.stem}.partial.mp4")
    end = math.inf if duration is None else start + duration
    try:
        with open_media(path) as container, av.open(str(tmp), "w") as sink:
            if is_still_image(container):
                raise MediaError(path, "a picture has no time to trim: give its sound a duration instead")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            width, height = stream.codec_context.width or 1, stream.codec_context.height or 1
            check_frame_size(path, width, height, limits)
            rate = round(min(60.0, float(stream.average_rate or stream.guessed_rate or 25)))
            scale = min(1.0, TRIM_MAX_SIDE / min(width, height))
            video = sink.add_stream("libx264", rate=rate, options={"crf": "20", "preset": "veryfast"})
            video.width, video.height = (max(2, round(side * scale) // 2 * 2) for side in (width, height))
            video.pix_fmt = "yuv420p"
            written, first, current, last_time = 0, None, None, 0.0

            def show_until(t: float) -> None:  # output frames k with k / rate before `t` show `current`
                nonlocal written
                while current is not None and start + written / rate < min(t, end) - TIME_TOLERANCE:
                    picture = current.reformat(width=video.width, height=video.height, format="yuv420p")
                    picture.pts, picture.time_base = written, Fraction(1, rate)  # not the source's clock
                    sink.mux(video.encode(picture))
                    written += 1

            try:
                for frame in container.decode(stream):
                    if frame.time is None:
                        continue
                    first = frame.time if first is None else first
                    t = frame.time - first
                    if t > limits.max_seconds + TIME_TOLERANCE:
                        raise MediaError(path, f"video runs to {t:.0f} s, past the limit of {limits.max_seconds:.0f} s")
                    if t >= end:
                        break
                    check_frame_size(path, frame.width, frame.height, limits)
                    show_until(t)
                    current, last_time = frame, t + _frame_duration(stream)
            except av.error.FFmpegError as err:
                if current is None:
                    raise MediaError(path, f"video cannot be decoded ({describe(err)})") from err
            if current is None or last_time <= start:
                raise MediaError(path, f"the trim starts at {start:g} s, after the video ends ({last_time:.2f} s)")
            show_until(last_time)
            sink.mux(video.encode(None))
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def encode_aac(stream, wave: np.ndarray, sample_rate: int, start_seconds: float = 0.0) -> list:
    """Mono float samples -> AAC packets of `stream`, timed from `start_seconds`."""
    offset = round(start_seconds * sample_rate)
    samples = np.ascontiguousarray(wave.astype(np.float32).reshape(1, -1))
    packets = []
    step = 1024  # AAC frame size
    for begin in range(0, samples.shape[1], step):
        frame = av.AudioFrame.from_ndarray(samples[:, begin:begin + step], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = offset + begin
        packets.extend(stream.encode(frame))
    packets.extend(stream.encode(None))
    return packets


def _interleave(sink, video_packets, out_video, audio_packets: list) -> None:
    pending = iter(audio_packets)
    next_audio = next(pending, None)
    for packet in video_packets:
        if packet.dts is None:  # the demuxer's flush packet
            continue
        t = float(packet.dts * packet.time_base)
        while next_audio is not None and float(next_audio.dts * next_audio.time_base) <= t:
            sink.mux(next_audio)
            next_audio = next(pending, None)
        packet.stream = out_video
        sink.mux(packet)
    while next_audio is not None:
        sink.mux(next_audio)
        next_audio = next(pending, None)
