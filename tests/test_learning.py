"""The denoiser learns: a tiny MDSGen overfits three real (picture, recording) clips."""
import numpy as np
import torch
from PIL import Image

from mdsgen.base.samples import tuxpaint_stamp
from mdsgen.media.audio import AudioConfig, fit_length, load_audio, wave_to_mel
from mdsgen.model.diffusion import SamplingConfig, sample
from mdsgen.model.encoders import EfficientNetLite0Encoder
from mdsgen.model.network import MDSGen, MDSGenConfig
from mdsgen.model.vae import MelVAE
from mdsgen.training.train import TrainConfig, fit

CLIPS = ["animals/mammals/badger", "household/kettle", "animals/mammals/elephant"]


def picture_features(picture, encoder=None) -> torch.Tensor:
    """EfficientNet features [32, F] of a still picture on white, repeated over the window."""
    encoder = encoder or EfficientNetLite0Encoder()
    stamp = Image.open(picture).convert("RGBA")
    canvas = Image.new("RGBA", stamp.size, (255, 255, 255, 255))
    canvas.alpha_composite(stamp)
    frame = torch.from_numpy(np.array(canvas.convert("RGB").resize((224, 224)))).permute(2, 0, 1) / 255
    return encoder(frame[None, None].expand(1, 32, -1, -1, -1).float())[0]


def real_clips():
    """Latents of each recording (8.192 s, looped) and EfficientNet features of its picture."""
    torch.manual_seed(0)
    encoder, vae = EfficientNetLite0Encoder(), MelVAE.from_config("small").eval()
    latents, features = [], []
    for name in CLIPS:
        picture, recording = tuxpaint_stamp(name)
        wave = load_audio(recording)
        wave = fit_length(np.tile(wave, 131072 // len(wave) + 1), 131072)
        with torch.no_grad():
            latents.append(vae.encode(wave_to_mel(wave)[None])[0])
        features.append(picture_features(picture, encoder))
    latents = torch.stack(latents)
    return latents / latents.std(), torch.stack(features)  # unit variance, as a tuned VAE scale gives


def distances(model, features, latents, noise):
    samples = sample(model.eval(), features, SamplingConfig(steps=10, cfg_scale=1.0), noise=noise)
    to_latents = torch.cdist(samples.flatten(1), latents.flatten(1))  # [sample, clip]
    to_noise = (samples - noise).flatten(1).norm(dim=1)
    return to_latents, to_noise


def test_tiny_mdsgen_overfits_three_real_clips():
    latents, features = real_clips()
    torch.manual_seed(0)
    # tiny: 128 wide, 4 blocks, patch 4 (64 tokens), TAM masking on, as the default recipe trains
    model = MDSGen(MDSGenConfig(hidden_size=128, depth=4, num_heads=4, decoder_depth=2, patch_size=4,
                                feature_dim=features.shape[-1]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))

    before, before_noise = distances(model, features, latents, noise)
    own_before = before.diagonal()
    assert (own_before > 0.9 * before_noise).all()  # untrained samples are no closer to the data than to noise

    losses = []
    model = fit(model, latents, features, TrainConfig(steps=500, batch_size=8, lr=4e-3, ema_decay=0, seed=0),
                on_step=lambda step, values: losses.append(values["loss_full"]))
    first, last = np.mean(losses[:10]), np.mean(losses[-50:])
    assert last < 0.25 * first, (first, last)

    after, after_noise = distances(model, features, latents, noise)
    own = after.diagonal()
    assert (own < 0.7 * after_noise).all(), (own, after_noise)
    # and the video condition picks the clip: each sample is nearest its own recording's latent
    assert (after.argmin(dim=1) == torch.arange(len(CLIPS))).all(), after


DEMO_AUDIO = AudioConfig(sample_rate=22050, clip_samples=180224, n_mels=80, fmin=0.0, fmax=8000.0,
                         mel_scale="log", vocoder="hifigan")


def demo_mels():
    """The three recordings as the demo's diffusion sees them: HiFi-GAN-format mels, standardised (no VAE)."""
    mels, features = [], []
    for name in CLIPS:
        picture, recording = tuxpaint_stamp(name)
        wave = load_audio(recording, DEMO_AUDIO.sample_rate)
        mels.append(wave_to_mel(fit_length(np.tile(wave, DEMO_AUDIO.clip_samples // len(wave) + 1),
                                           DEMO_AUDIO.clip_samples), DEMO_AUDIO))
        features.append(picture_features(picture))
    mels = torch.stack(mels)
    return MelVAE.from_config("none").fit(mels).encode(mels), torch.stack(features)


def tiny_demo_model(feature_dim: int) -> MDSGen:
    return MDSGen(MDSGenConfig(input_size=(80, 704), in_channels=1, hidden_size=128, depth=4, num_heads=4,
                               decoder_depth=2, patch_size=(80, 8), feature_dim=feature_dim, prediction="x0",
                               frame_tokens=True, mask_strategy="none"))


def train_demo_recipe(latents, features, cfg_dropout: float, seed: int = 0) -> MDSGen:
    """The demo recipe (mel-space x0-prediction, whole-spectrum tokens, frame tokens) on a tiny network."""
    torch.manual_seed(seed)
    cfg = TrainConfig(steps=300, batch_size=8, lr=2e-3, ema_decay=0, seed=seed, cfg_dropout=cfg_dropout)
    return fit(tiny_demo_model(features.shape[-1]), latents, features, cfg).eval()


def diagnostics_of(model, latents, features, seed: int = 7):
    """The promotion gate's latent diagnostics with their default bounds (the sample-based shuffled-video
    control needs the audio metrics: tests/test_metrics.py checks that verdict)."""
    from mdsgen.evaluation.evaluate import Checks, diagnose

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    samples = sample(model, features, SamplingConfig(steps=25, cfg_scale=2.0, solver="ddim"), noise=noise)
    partners = [(i + 1) % len(latents) for i in range(len(latents))]
    diagnostics = diagnose(model, samples, latents, features, partners)
    failures = Checks().diagnostic_failures(diagnostics)
    return {**diagnostics, "diagnostics_pass": float(not failures), "diagnostics_failures": "; ".join(failures)}


def test_diagnostics_pass_a_model_that_listens_and_fail_one_that_does_not():
    """The promotion gate's diagnostics on real clips: the demo recipe passes; the same training with the
    video always dropped (cfg_dropout 1) fails on conditioning gain, and an untrained network fails too."""
    latents, features = demo_mels()
    listening = diagnostics_of(train_demo_recipe(latents, features, cfg_dropout=0.1), latents, features)
    assert listening["diagnostics_pass"] == 1.0, listening
    assert 0.8 <= listening["latent_std_ratio"] <= 1.25 and listening["conditioning_gain_peak"] > 1.02, listening

    deaf = diagnostics_of(train_demo_recipe(latents, features, cfg_dropout=1.0), latents, features)
    assert deaf["diagnostics_pass"] == 0.0 and "conditioning_gain" in deaf["diagnostics_failures"], deaf

    torch.manual_seed(0)
    assert diagnostics_of(tiny_demo_model(features.shape[-1]).eval(), latents, features)["diagnostics_pass"] == 0.0
