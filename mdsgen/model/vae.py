"""The mel VAE: a diffusers AutoencoderKL between mels [B, n_mels, frames] and latents [B, C, H, W]
(the paper: mels [B, 128, 512], latents [B, 4, 16, 64]).

As in the paper, the mel (values in [0, 1]) is repeated to the VAE's input channels and one channel
of the decoder's output is the mel: channel 1 (G) by default, `"mean"` averages them. Two shapes:
Stable Diffusion v1's VAE (loaded from a diffusers folder, local or S3; scale 0.18215), and shapes
that train on a CPU: `small` (the same 8x downsampling and 4 channels) and `wide-4x`.

`none` is no VAE at all (`MelStandardizer`): the diffusion runs on the mel itself, shifted and scaled to
zero mean and unit variance. On the demo data every VAE that trains here in minutes blurs the harmonics
that a neural vocoder needs (the codec table in REPORT.md), so the demo diffuses mels directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mdsgen.base import storage

if TYPE_CHECKING:  # imported where used: diffusers takes a second to import, which every CLI command paid
    from diffusers import AutoencoderKL

SD_V1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
# 1M parameters: one block per level, narrow channels (full-resolution convolutions dominate on CPU)
SMALL_VAE = dict(SD_V1_VAE, block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=16,
                 sample_size=128)
# 4x downsampling, wider: an 80 x 704 HiFi-GAN mel -> latent 4 x 20 x 176 (4x compression instead of 16x).
# The paper's 8x is tuned for images; on mels it blurs the harmonics that tell a cello from a cow.
WIDE_4X_VAE = dict(SD_V1_VAE, block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
                   sample_size=128, down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3)
VAE_CONFIGS = {"sd-v1": SD_V1_VAE, "small": SMALL_VAE, "wide-4x": WIDE_4X_VAE}
NO_VAE = "none"


@dataclass(frozen=True)
class VAESettings:
    """params.yaml `vae`: which codec turns mels into latents."""
    config: str = "small"          # a MelVAE.from_config name, or "none": diffuse the standardised mel itself
    decode_channel: int | str = 1  # the paper's G channel (0, 1, 2 or "mean")
    path: str | None = None        # a diffusers VAE folder (local or s3://): used instead of training one


class MelVAE(nn.Module):
    def __init__(self, vae: AutoencoderKL, decode_channel: int | str = 1):
        super().__init__()
        self.vae = vae
        channels = vae.config.out_channels
        if decode_channel != "mean" and not 0 <= int(decode_channel) < channels:
            raise ValueError(f"decode_channel {decode_channel!r}: use 0..{channels - 1} or 'mean'")
        self.decode_channel = decode_channel if decode_channel == "mean" else int(decode_channel)

    @classmethod
    def from_config(cls, name: str = "small", decode_channel: int | str = 1, **overrides) -> "MelVAE":
        if name == NO_VAE:
            return MelStandardizer()
        if name not in VAE_CONFIGS:
            raise ValueError(f"vae.config {name!r}: use one of {', '.join([*VAE_CONFIGS, NO_VAE])}")
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL(**dict(VAE_CONFIGS[name], **overrides)), decode_channel)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_size(self, n_mels: int, frames: int) -> tuple[int, int]:
        """Latent H x W for a mel of n_mels x frames; both must divide by the downsampling."""
        d = self.downsampling
        if n_mels % d or frames % d:
            raise ValueError(f"a {n_mels} x {frames} mel does not divide by the VAE's {d}x downsampling")
        return n_mels // d, frames // d

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def _images(self, mel: torch.Tensor) -> torch.Tensor:
        return mel.unsqueeze(1).expand(-1, self.vae.config.in_channels, -1, -1)

    def encode(self, mel: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Mel [B, F, T] in [0, 1] -> scaled latents [B, C, F/d, T/d] (d: the downsampling)."""
        posterior = self.vae.encode(self._images(mel)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents * self.scaling_factor

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> mel [B, F, T] in [0, 1] from the configured output channel."""
        images = self.decode_images(latents)
        mel = images.mean(1) if self.decode_channel == "mean" else images[:, self.decode_channel]
        return mel.clamp(0.0, 1.0)

    def save(self, uri: str) -> None:
        """A diffusers folder (safetensors) plus mdsgen.json; to a local path or an S3 prefix."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.vae.save_pretrained(tmp, safe_serialization=True)
            Path(tmp, "mdsgen.json").write_text(json.dumps({"decode_channel": self.decode_channel}))
            storage.upload_dir(tmp, uri)


class MelStandardizer(nn.Module):
    """No VAE: the latent is the mel itself [B, 1, n_mels, frames], standardised with the training mels'
    mean and spread (`fit`), so the diffusion sees unit variance as it does with a VAE's scale. Nothing
    is lost between mel and latent: the codec's ceiling is the vocoder's."""

    decode_channel = 0
    latent_channels = 1
    downsampling = 1

    def __init__(self, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def fit(self, mels: torch.Tensor) -> "MelStandardizer":
        self.shift.fill_(mels.mean().item())
        self.scale.fill_(1.0 / mels.std().item())
        return self

    latent_size = MelVAE.latent_size

    @property
    def scaling_factor(self) -> float:
        return float(self.scale)

    def encode(self, mel: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        return ((mel - self.shift) * self.scale).unsqueeze(1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents[:, 0] / self.scale + self.shift).clamp(0.0, 1.0)

    def save(self, uri: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "mdsgen.json").write_text(json.dumps({"config": NO_VAE, "shift": float(self.shift),
                                                            "scale": float(self.scale)}))
            storage.upload_dir(tmp, uri)


def load_vae(uri: str, decode_channel: int | str | None = None) -> MelVAE | MelStandardizer:
    """Load a diffusers AutoencoderKL folder (e.g. Stable Diffusion v1's `vae/`) from disk or S3, or a
    saved `MelStandardizer` (mdsgen.json alone).

    Only safetensors weights are accepted, so loading runs no pickled code.
    """
    folder = storage.local_dir(uri)
    meta = folder / "mdsgen.json"
    settings = json.loads(meta.read_text()) if meta.is_file() else {}
    if settings.get("config") == NO_VAE:
        return MelStandardizer(settings["shift"], settings["scale"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{uri}: not a diffusers VAE folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{uri}: no .safetensors weights (pickled .bin files are refused)")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                        low_cpu_mem_usage=False)
    if decode_channel is None:
        decode_channel = settings.get("decode_channel", 1)
    return MelVAE(vae.eval(), decode_channel)
