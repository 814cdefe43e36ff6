import math
import re

import numpy as np
import pytest

from media import frame_level, make_audio_only, make_video, streams, tiny_rate, two_frames
from mdsgen.base.errors import MediaError
from mdsgen.media.video import VideoConfig, read_video_windows, window_count


def test_short_video_is_one_padded_window(bigbuckbunny):
    windows = read_video_windows(bigbuckbunny)
    assert windows.count == 1 and windows.frames.shape == (1, 32, 224, 224, 3)
    assert abs(windows.duration - 5.28) < 0.01
    assert windows.real_frames == math.ceil(5.28 * 4)
    grid = windows.grid
    # padding repeats the last real frame
    assert all((grid[i] == grid[windows.real_frames - 1]).all() for i in range(windows.real_frames, 32))
    assert not (grid[0] == grid[windows.real_frames - 1]).all()


def test_frames_are_sampled_at_4_fps(video_20s):
    windows = read_video_windows(video_20s)  # 20 s at 10 fps: frame i has grey level frame_level(i)
    assert windows.count == window_count(20.0, 8.192, 7.0) == 3
    assert windows.real_frames == 80
    for k in range(windows.real_frames):
        shown = math.floor(k / 4 * 10 + 1e-6)  # the frame on screen at k / 4 seconds
        assert abs(int(windows.grid[k][150, 150].mean()) - frame_level(shown)) <= 3, k
        assert windows.grid[k][5, 5, 0] > 200 and windows.grid[k][5, 5, 1] < 60  # red corner, top-left


def test_windows_overlap_on_one_grid(video_20s):
    windows = read_video_windows(video_20s)
    frames = windows.frames
    assert frames.shape == (3, 32, 224, 224, 3)
    np.testing.assert_array_equal(frames[1][:4], frames[0][28:])  # 4 shared frames = 1 s
    assert windows.grid.shape[0] == 2 * 28 + 32


@pytest.mark.parametrize("codec,suffix,size,fps", [
    ("mpeg4", ".avi", (320, 240), 25),
    ("libvpx-vp9", ".webm", (120, 200), 12),   # portrait
    ("mjpeg", ".mkv", (64, 48), 30),           # smaller than 224: upscaled
])
def test_other_containers_codecs_and_shapes(tmp_path, codec, suffix, size, fps):
    path = make_video(tmp_path / f"v{suffix}", seconds=2.0, fps=fps, size=size, codec=codec, audio=False)
    windows = read_video_windows(path)
    assert windows.frames.shape == (1, 32, 224, 224, 3)
    assert abs(windows.duration - 2.0) < 0.1 and windows.real_frames == 8
    assert abs(int(windows.grid[4][150, 150].mean()) - frame_level(fps)) <= 4  # the frame at 1.0 s


def test_longer_windows_config(video_20s):
    cfg = VideoConfig(hop_frames=16)
    windows = read_video_windows(video_20s, cfg)
    assert windows.count == window_count(20.0, 8.192, 4.0) == 4


def test_bad_files_raise_clear_errors(tmp_path, bigbuckbunny):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(bigbuckbunny.read_bytes()[:200_000])
    audio_only = make_audio_only(tmp_path / "audio_only.mp4")
    cases = {empty: "empty", text: "cannot be opened", truncated: "cannot be opened",
             audio_only: "no video stream", tmp_path / "missing.mp4": "no such file"}
    for path, reason in cases.items():
        with pytest.raises(MediaError) as err:
            read_video_windows(path)
        assert str(path) in str(err.value) and reason in str(err.value)


def test_display_rotation_is_applied(tmp_path):
    from media import rotate_mp4

    upright = make_video(tmp_path / "upright.mp4", seconds=1.0, audio=False)  # red corner top-left
    rotated = rotate_mp4(upright, tmp_path / "rotated.mp4")
    assert read_video_windows(upright).grid[0][10, 10, 0] > 200
    frame = read_video_windows(rotated).grid[0]
    assert frame[10, 213, 0] > 200 and frame[10, 10, 0] < 200  # turned clockwise: now top-right


def test_videos_that_cost_far_more_than_they_look_are_refused_before_the_work(tmp_path):
    from mdsgen.media.video import ReadLimits

    jump = two_frames(tmp_path / "jump.mkv", 64, 64, 10 * 3600)  # 10 hours between two frames
    assert jump.stat().st_size < 10_000
    with pytest.raises(MediaError, match=r"past the limit of 1800 s"):
        read_video_windows(jump)
    slow = tiny_rate(tmp_path / "slow.mp4", 3600)  # a stream that claims one frame an hour
    assert slow.stat().st_size < 10_000
    with pytest.raises(MediaError, match=r"runs to 10800 s, past the limit of 1800 s"):
        read_video_windows(slow)
    for width, height in ((4096, 2), (8192, 2)):
        wide = two_frames(tmp_path / f"wide{width}.mkv", width, height, 0.25)
        with pytest.raises(MediaError, match=rf"{width} x 2 pixels exceed the aspect ratio limit of 8:1"):
            read_video_windows(wide)
    huge = two_frames(tmp_path / "huge.mkv", 8640, 4320, 0.25)  # past 8K
    with pytest.raises(MediaError, match=r"8640 x 4320 pixels exceed the limit of 35,389,440 pixels"):
        read_video_windows(huge)
    crowded = make_video(tmp_path / "crowded.mkv", seconds=4.0, fps=1000, size=(16, 16), codec="ffv1", audio=False)
    with pytest.raises(MediaError, match=r"frames in its first 0.3\d s: more than the limit of 240 frames per second"):
        read_video_windows(crowded)
    assert read_video_windows(crowded, limits=ReadLimits(max_fps=1000)).real_frames == 16  # 4 s on the 4 fps grid
    normal = make_video(tmp_path / "three.mp4", seconds=3.0)  # 160 x 120
    with pytest.raises(MediaError, match=r"160 x 120 pixels exceed the limit of 10,000 pixels"):
        read_video_windows(normal, limits=ReadLimits(max_pixels=10_000))
    with pytest.raises(MediaError, match=r"runs to 3 s, past the limit of 2 s"):
        read_video_windows(normal, limits=ReadLimits(max_seconds=2.0))
    assert read_video_windows(normal, limits=ReadLimits(max_seconds=3.0)).count == 1  # the limit itself is fine


def test_a_picture_is_a_still_scene_whatever_its_name(tmp_path):
    from PIL import Image
    from mdsgen.media.video import mux_audio

    picture = np.zeros((90, 121, 3), np.uint8)
    picture[:, 60:] = 200
    Image.fromarray(picture).save(tmp_path / "still.png")
    (tmp_path / "named.mp4").write_bytes((tmp_path / "still.png").read_bytes())  # a PNG named .mp4
    for path in (tmp_path / "still.png", tmp_path / "named.mp4"):
        windows = read_video_windows(path)
        assert windows.count == 1 and windows.duration == pytest.approx(8.192)
        assert all((frame == windows.grid[0]).all() for frame in windows.grid)
    assert read_video_windows(tmp_path / "still.png", still_seconds=20.0).count == 3
    with pytest.raises(MediaError, match="positive duration"):
        read_video_windows(tmp_path / "still.png", still_seconds=0)
    wave = np.sin(np.arange(16000 * 3) / 10).astype(np.float32) * 0.3
    out = mux_audio(tmp_path / "named.mp4", wave, 16000, tmp_path / "out")
    import av
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.audio
        assert (c.streams.video[0].width, c.streams.video[0].height) == (120, 90)
        assert c.duration / av.time_base == pytest.approx(3.0, abs=0.1)


def test_trim_keeps_the_frames_shown_in_the_range(tmp_path):
    """Frame k of a trim from 1.0 s is the source frame shown at 1.0 + k / fps (frames told apart by grey level)."""
    from mdsgen.media.video import trim_video

    source = make_video(tmp_path / "source.mkv", seconds=6.0, fps=10, codec="ffv1")
    trimmed = trim_video(source, 1.0, 2.5, tmp_path / "trimmed.mp4")
    assert [(kind, codec) for kind, codec, _ in streams(trimmed)] == [("video", "h264")]  # silent
    assert abs(streams(trimmed)[0][2] - 2.5) < 1e-6
    grid = read_video_windows(trimmed).grid  # 4 fps: output times 0, 0.25, ... -> source frames 10, 12.5 ...
    for k in range(10):
        assert abs(int(grid[k, 112, 150, 0]) - frame_level(10 + math.floor(k * 2.5))) <= 3, k
    whole = trim_video(source, 4.5, None, tmp_path / "tail.mp4")  # no duration: to the end
    assert abs(streams(whole)[0][2] - 1.5) < 1e-6
    for start, duration, reason in ((-1, 2, "the start must be 0 or later"), (0, 0, "the duration positive"),
                                    (7, 1, "the trim starts at 7 s, after the video ends (6.00 s)")):
        with pytest.raises(MediaError, match=re.escape(reason)):
            trim_video(source, start, duration, tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists() and not list(tmp_path.glob(".*partial*"))
