"""Checkpoints: a folder (local or an S3 prefix) that rebuilds a generator without running code.

    config.json          model, frame encoder, audio, video and sampling settings; the fitted texture shape
    model.safetensors    denoiser weights
    vae/                 the mel VAE as a diffusers folder (safetensors) + mdsgen.json
    vocoder.safetensors  optional: HiFi-GAN fine-tuned on the training audio (else the stock weights)
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mdsgen.base import storage
from mdsgen.base.errors import CheckpointError, describe
from mdsgen.media.audio import AudioConfig
from mdsgen.media.video import VideoConfig
from mdsgen.media.vocoder import FINE_TUNED, load_vocoder_dir, save_generator
from mdsgen.model.diffusion import SamplingConfig, flat_texture
from mdsgen.model.network import MDSGen, MDSGenConfig
from mdsgen.model.vae import MelVAE, load_vae

FORMAT = "mdsgen-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    model: MDSGen
    vae: MelVAE
    frame_encoder: dict
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    vocoder: torch.nn.Module | None = None  # a fine-tuned HiFi-GAN generator; None: the stock weights
    texture: torch.Tensor | None = None     # the texture noise's std along frequency (`fit_texture`); None: flat

    def config(self) -> dict:
        config = {"format": FORMAT, "version": VERSION, "model": self.model.config.to_dict(),
                  "frame_encoder": self.frame_encoder, "audio": asdict(self.audio),
                  "video": asdict(self.video), "sampling": asdict(self.sampling)}
        if self.texture is not None:
            config["texture"] = self.texture.tolist()
        return config


def save_checkpoint(ckpt: Checkpoint, uri: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.json").write_text(json.dumps(ckpt.config(), indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
        save_file(state, str(Path(tmp, "model.safetensors")))
        ckpt.vae.save(str(Path(tmp, "vae")))
        if ckpt.vocoder is not None:
            save_generator(ckpt.vocoder, Path(tmp, FINE_TUNED))
        storage.upload_dir(tmp, uri)


def load_checkpoint(uri: str, device: str = "cpu") -> Checkpoint:
    try:
        folder = storage.local_dir(uri)
    except FileNotFoundError as err:
        raise CheckpointError(f"{uri}: no checkpoint there ({err})") from err
    for part in ("config.json", "model.safetensors", "vae"):
        if not (folder / part).exists():
            raise CheckpointError(f"{uri}: not an mdsgen checkpoint (missing {part})")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as err:
        raise CheckpointError(f"{uri}: config.json is not valid JSON ({err})") from err
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(f"{uri}: format {config.get('format')!r} version {config.get('version')!r}, "
                              f"expected {FORMAT!r} version {VERSION}")
    try:
        model = MDSGen(MDSGenConfig(**config["model"]))
        settings = dict(frame_encoder=config["frame_encoder"], audio=AudioConfig(**config["audio"]),
                        video=VideoConfig(**config["video"]), sampling=SamplingConfig(**config["sampling"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{uri}: config.json does not describe this version's model ({err})") from err
    window = settings["video"].frames_per_window
    if model.config.conditioning != "cross_attention" and model.config.num_frames != window:
        raise CheckpointError(f"{uri}: the model reduces {model.config.num_frames} frames, its video settings give "
                              f"{window} per window")
    try:
        weights = load_file(str(folder / "model.safetensors"))
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"{uri}: model.safetensors is not a readable safetensors file ({err})") from err
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{uri}: weights do not match its config ({str(err).splitlines()[0]})") from err
    try:
        vae = load_vae(str(folder / "vae"))
    except Exception as err:
        raise CheckpointError(f"{uri}: the VAE in vae/ cannot be loaded ({describe(err)})") from err
    vocoder = _fine_tuned_vocoder(folder, settings["audio"], uri, device)
    texture = _texture(config.get("texture"), model.config, uri)
    if texture is None and settings["sampling"].texture_shape == "fitted":
        raise CheckpointError(f"{uri}: its sampling asks for the fitted texture shape and config.json has none "
                              "(a model trained before `train` fitted it: set sampling.texture_shape to flat)")
    return Checkpoint(model=model.to(device).eval(), vae=vae.to(device), vocoder=vocoder, texture=texture, **settings)


def _texture(values, model_config: MDSGenConfig, uri: str) -> torch.Tensor | None:
    """config.json's texture shape (absent in checkpoints saved before it was fitted: flat noise)."""
    if values is None:
        return None
    expected = tuple(flat_texture(model_config).shape)
    try:
        texture = torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{uri}: config.json's texture is not a table of numbers ({err})") from err
    if tuple(texture.shape) != expected or not (texture.isfinite().all() and (texture >= 0).all()):
        raise CheckpointError(f"{uri}: config.json's texture must be {' x '.join(map(str, expected))} non-negative "
                              f"numbers (one per latent channel and frequency row), got shape {tuple(texture.shape)}")
    return texture


def _fine_tuned_vocoder(folder: Path, audio: AudioConfig, uri: str, device: str) -> torch.nn.Module | None:
    if (folder / FINE_TUNED).exists() and audio.vocoder != "hifigan":
        raise CheckpointError(f"{uri}: holds a fine-tuned HiFi-GAN ({FINE_TUNED}) but its audio.vocoder is "
                              f"{audio.vocoder!r}")
    try:
        return load_vocoder_dir(folder, device)
    except Exception as err:  # a damaged file or weights of another network
        raise CheckpointError(f"{uri}: vocoder.safetensors is not a HiFi-GAN generator's weights "
                              f"({describe(err)})") from err


def init_checkpoint(params, seed: int = 0) -> Checkpoint:
    """A generator with freshly initialised (untrained) denoiser weights, built from `params`
    (a config.Params): the configured frame encoder, and the VAE from `vae.path` or a new `vae.config`."""
    from mdsgen.model.encoders import build_frame_encoder
    from mdsgen.model.network import config_for

    size, model_args = params.model.size, dict(params.model.overrides)
    encoder = build_frame_encoder(params.frame_encoder)
    if params.vae.path:
        vae = load_vae(params.vae.path, params.vae.decode_channel)
    else:
        vae = MelVAE.from_config(params.vae.config, params.vae.decode_channel)
    frames = model_args.setdefault("num_frames", params.video.frames_per_window)  # the frames a window holds
    if frames != params.video.frames_per_window:
        raise ValueError(f"model.num_frames {frames} differs from video.frames_per_window "
                         f"{params.video.frames_per_window}: leave model.num_frames out to follow the video")
    if model_args.get("time_axis", "width") == "width":  # the latent grid follows the mel and the VAE
        model_args.setdefault("in_channels", vae.latent_channels)
        model_args.setdefault("input_size", vae.latent_size(params.audio.n_mels, params.audio.mel_frames))
    torch.manual_seed(seed)
    model = MDSGen(config_for(size, feature_dim=encoder.feature_dim, **model_args))
    return Checkpoint(model=model.eval(), vae=vae.eval(), frame_encoder=encoder.spec(), audio=params.audio,
                      video=params.video, sampling=params.sampling, texture=flat_texture(model.config))
