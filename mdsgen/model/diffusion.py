"""Diffusion: the paper's 1000-step linear schedule, MDSGen's two-pass training loss, and sampling
with DPM-Solver++ or DDIM (diffusers) under the power-cosine dynamic classifier-free guidance.

The network predicts epsilon (the paper), v = sqrt(a) * noise - sqrt(1 - a) * x0, or x0 itself (the model
config's `prediction`). With the linear schedule alpha_bar reaches 4e-5 at t = 999, where an epsilon error of
0.002 becomes an x0 error of ~45: v-prediction keeps the target's scale at every t, which is what makes
a few hundred CPU steps sample inside the data. x0-prediction suits tokens wider than the network (a
16 x 16 mel patch is 256 values, T is 192 wide): it never has to carry the noise through (Li & He 2025,
"Back to Basics: Let Denoising Generative Models Denoise"). Min-SNR-gamma weighting (Hang et al. 2023) stops the
low-noise steps from dominating the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mdsgen.model.network import MDSGen, MDSGenConfig

TRAIN_STEPS = 1000
SOLVERS = ("dpmsolver++", "ddim")
TEXTURE_SHAPES = ("flat", "fitted")
SCHEDULER_PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}  # diffusers' names
BETA_START, BETA_END = 1e-4, 0.02


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 25
    cfg_scale: float = 5.0
    cfg_power: float = 0.01
    solver_order: int = 2
    solver: str = "dpmsolver++"    # or "ddim"
    texture_noise: float = 0.0     # std of the noise left in the sample (see `add_texture`); 0: none (the paper)
    texture_shape: str = "flat"    # or "fitted": its std along frequency shaped like the training latents' (REPORT.md 5y)
    cfg_min_t: int = 0             # guidance only at steps t >= this (a guidance interval); below, one conditional pass

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver {self.solver!r}: use one of {', '.join(SOLVERS)}")
        if not 1 <= self.steps <= TRAIN_STEPS:
            raise ValueError(f"steps {self.steps}: must be between 1 and {TRAIN_STEPS}")
        if not (math.isfinite(self.cfg_scale) and 0.0 <= self.cfg_scale <= 50.0):
            raise ValueError(f"cfg_scale {self.cfg_scale}: must be between 0 and 50")
        if not (math.isfinite(self.cfg_power) and self.cfg_power > 0):
            raise ValueError(f"cfg_power {self.cfg_power}: must be positive")
        if not (math.isfinite(self.texture_noise) and 0.0 <= self.texture_noise <= 1.0):
            raise ValueError(f"texture_noise {self.texture_noise}: must be between 0 and 1")
        if self.texture_shape not in TEXTURE_SHAPES:
            raise ValueError(f"texture_shape {self.texture_shape!r}: use one of {', '.join(TEXTURE_SHAPES)}")
        if not (isinstance(self.cfg_min_t, int) and 0 <= self.cfg_min_t <= TRAIN_STEPS):
            raise ValueError(f"cfg_min_t {self.cfg_min_t!r}: must be a whole step between 0 and {TRAIN_STEPS}")


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETA_START, BETA_END, TRAIN_STEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(x0, noise, t, cumprod):
    a = cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(x0, noise, t, cumprod, prediction: str):
    """What the network is trained to output at timestep t."""
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    a = cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def loss_weights(t, cumprod, prediction: str, min_snr_gamma: float, floor: float = 0.0) -> torch.Tensor | None:
    """Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, / 1 for x0 (the same weight
    on the x0 error in all three); None when off (weight 1). A `floor` raises the x0 error's weight to
    clamp(SNR, floor, gamma): with floor 1 the noisy steps keep plain x0 MSE's weight (where events are
    placed) while the clean steps (texture) weigh up to gamma times more."""
    if not min_snr_gamma:
        return None
    a = cumprod.to(t.device)[t]
    snr = a / (1 - a)
    weight = snr.clamp(min=floor, max=min_snr_gamma) if floor else snr.clamp_max(min_snr_gamma)
    return weight / {"epsilon": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]


def _mse(prediction, wanted, weights):
    per_sample = (prediction.float() - wanted).pow(2).flatten(1).mean(1)
    return per_sample.mean() if weights is None else (weights * per_sample).mean()


def draw_training_noise(model: MDSGen, x0_shape, generator: torch.Generator | None = None) -> dict:
    """Every random draw of one training step for a batch: timesteps, the CFG-dropout coin, the noise of
    each pass and the mask. Drawn on the CPU, so a run gives the same draws on any device, and data-parallel
    ranks can draw the global batch and each take its own slice."""
    b = x0_shape[0]
    draws = {"t": (torch.rand(b, generator=generator) * TRAIN_STEPS).long().clamp_max(TRAIN_STEPS - 1),
             "dropout_coin": torch.rand(b, generator=generator),
             "noise": torch.randn(x0_shape, generator=generator)}
    if model.config.mask_strategy != "none":
        draws["noise_masked"] = torch.randn(x0_shape, generator=generator)
        draws["visible_ids"] = model.sample_mask(b, "cpu", generator)
    return draws


def training_loss(model: MDSGen, x0: torch.Tensor, features: torch.Tensor, *, cfg_dropout: float = 0.1,
                  masked_weight: float = 1.0, min_snr_gamma: float = 0.0, min_snr_floor: float = 0.0,
                  generator: torch.Generator | None = None, draws: dict | None = None) -> dict:
    """MSE on the model's target (epsilon, v or x0): L_full + lambda * L_masked with the same t and fresh noise
    per pass, each sample weighted by min-SNR-gamma (with `min_snr_floor`) when `min_snr_gamma` > 0.

    The masked pass is skipped when the model's strategy is "none" (plain DiT). With probability
    `cfg_dropout` a sample's features are zeroed, which teaches the unconditional branch of CFG.
    `draws` (from `draw_training_noise`) fixes the randomness; otherwise it is drawn from `generator`.
    `model` may be a DistributedDataParallel wrapper: its config is read from the wrapped module.
    """
    core = getattr(model, "module", model)
    draws = draws if draws is not None else draw_training_noise(core, x0.shape, generator)
    draws = {k: v.to(x0.device) for k, v in draws.items()}
    cumprod, t = alphas_cumprod(), draws["t"]
    keep = (draws["dropout_coin"] >= cfg_dropout).to(features.dtype).view(-1, 1, 1)
    features = features * keep
    kind = core.config.prediction
    weights = loss_weights(t, cumprod, kind, min_snr_gamma, min_snr_floor)
    noise = draws["noise"]
    loss_full = _mse(model(add_noise(x0, noise, t, cumprod), t, features), target(x0, noise, t, cumprod, kind),
                     weights)
    out = {"loss_full": loss_full}
    loss = loss_full
    if core.config.mask_strategy != "none" and masked_weight > 0:
        noise = draws["noise_masked"]
        prediction = model(add_noise(x0, noise, t, cumprod), t, features, draws["visible_ids"])
        loss_masked = _mse(prediction, target(x0, noise, t, cumprod, kind), weights)
        out["loss_masked"] = loss_masked
        loss = loss + masked_weight * loss_masked
    out["loss"] = loss
    return out


def guidance_scale(t: torch.Tensor | float, scale: float, power: float) -> float:
    """w(t) = (s - 1) * 0.5 * (1 - cos(pi * (1 - t/T)^p)) + 1: strong early, relaxing at the end."""
    progress = (1.0 - float(t) / TRAIN_STEPS) ** power
    return (scale - 1.0) * 0.5 * (1.0 - math.cos(math.pi * progress)) + 1.0


def make_scheduler(sampling: SamplingConfig, prediction: str = "epsilon"):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # here: diffusers takes a second to import

    schedule = dict(num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END,
                    beta_schedule="linear", prediction_type=SCHEDULER_PREDICTIONS[prediction])
    if sampling.solver == "ddim":
        return DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    return DPMSolverMultistepScheduler(**schedule, solver_order=sampling.solver_order, algorithm_type="dpmsolver++")


@torch.no_grad()
def sample(model: MDSGen, features: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           on_step: Callable[[int, int], None] | None = None, texture: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [B, C, H, W] for frame features [B, T, F]; deterministic given the initial noise.
    `on_step(done, total)` is called after each solver step (progress for a user who waits).

    `sampling.texture_noise` leaves noise in the sample (`add_texture`); with `texture_shape: fitted` its std
    along frequency follows `texture` (the checkpoint's, fitted by `train`)."""
    if sampling.texture_shape == "fitted" and texture is None:
        raise ValueError("texture_shape 'fitted': this model has no fitted texture (trained before `train` fitted "
                         "one); use texture_shape 'flat'")
    c = model.config
    shape = (features.shape[0], c.in_channels, *c.input_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device="cpu")
    x = noise.to(features.device, features.dtype)
    scheduler = make_scheduler(sampling, c.prediction)
    scheduler.set_timesteps(sampling.steps, device=features.device)
    for i, t in enumerate(scheduler.timesteps):
        ts = t.expand(x.shape[0]).to(features.device)
        guided = sampling.cfg_scale != 1.0 and int(t) >= sampling.cfg_min_t
        if guided:
            out = model.forward_with_cfg(x, ts, features, guidance_scale(t, sampling.cfg_scale, sampling.cfg_power))
        else:
            out = model(x, ts, features)
        x = scheduler.step(out, t, x).prev_sample
        if on_step is not None:
            on_step(i + 1, len(scheduler.timesteps))
    return add_texture(x, noise, sampling.texture_noise, texture if sampling.texture_shape == "fitted" else None)


def add_texture(x: torch.Tensor, noise: torch.Tensor, level: float, texture: torch.Tensor | None = None) -> torch.Tensor:
    """The sample `x` plus noise of std `level`: the part of a spectrogram no denoiser can predict (the speckle
    of noisy sounds, the noise floor), which an x0 model trained on MSE returns as its mean, a smooth mel that
    a vocoder plays as a buzz (REPORT.md 5g). The noise is the window's own starting noise rolled by half the
    grid: still i.i.d. Gaussian, far from where each part of the sample grew from, and as seeded and
    batch-independent as the rest. `texture` (`fit_texture`, RMS 1) shapes its std along the frequency axis as
    the training latents' fine structure is shaped (REPORT.md 5y); None: the same std everywhere."""
    if not level:
        return x
    start = noise.to(x.device, x.dtype).roll((noise.shape[-2] // 2, noise.shape[-1] // 2), dims=(-2, -1))
    if texture is not None:
        start = start * texture.to(x.device, x.dtype)
    return x + level * start


def flat_texture(config: MDSGenConfig) -> torch.Tensor:
    """The texture of a model that has seen no latents: ones, [C, H, 1] with time along W, [C, 1, W] along H."""
    channels, (height, width) = config.in_channels, config.input_size
    return torch.ones(channels, height, 1) if config.time_axis == "width" else torch.ones(channels, 1, width)


def fit_texture(latents: torch.Tensor, time_axis: str = "width") -> torch.Tensor:
    """The shape along frequency of the training latents' fine structure ([C, H, 1] with time along W, [C, 1, W]
    along H): the std, over clips and time, of the residual from a mean over 3 bins x 5 frames, scaled to RMS 1
    (so `texture_noise` stays the overall std). On the demo's mels the smooth top bins get half the low ones'."""
    x = latents.float()
    kernel, time_dim = ((3, 5), 3) if time_axis == "width" else ((5, 3), 2)
    local_mean = torch.nn.functional.avg_pool2d(x, kernel, stride=1, padding=(kernel[0] // 2, kernel[1] // 2),
                                                count_include_pad=False)
    spread = (x - local_mean).std(dim=(0, time_dim), keepdim=True)[0]
    rms = spread.square().mean().sqrt()
    return spread / rms if rms > 0 else torch.ones_like(spread)


@torch.no_grad()
def conditioning_gain(model: MDSGen, x0: torch.Tensor, features: torch.Tensor, timesteps=(100, 300, 500, 700, 900),
                      seed: int = 0) -> dict:
    """Per timestep: the unconditional (features zeroed) prediction error over the conditional one, on the
    same noisy latents. Above 1 the video helps the denoiser; 1.000 means the conditioning is ignored."""
    cumprod, kind = alphas_cumprod(), model.config.prediction
    generator = torch.Generator().manual_seed(seed)
    gains = {}
    for step in timesteps:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = torch.full((len(x0),), step, dtype=torch.long, device=x0.device)
        noisy, wanted = add_noise(x0, noise, t, cumprod), target(x0, noise, t, cumprod, kind)
        cond = (model(noisy, t, features).float() - wanted).pow(2).mean().item()
        uncond = (model(noisy, t, torch.zeros_like(features)).float() - wanted).pow(2).mean().item()
        gains[int(step)] = {"conditional_mse": cond, "unconditional_mse": uncond, "gain": uncond / max(cond, 1e-12)}
    return gains
