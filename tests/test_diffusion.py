import math

import pytest
import torch

from mdsgen.model.diffusion import SamplingConfig, fit_texture, guidance_scale, sample
from mdsgen.model.network import MDSGen, MDSGenConfig


def test_power_cosine_guidance():
    assert guidance_scale(0, 5.0, 0.01) == pytest.approx(5.0)      # the end of sampling: full scale
    assert guidance_scale(1000, 5.0, 0.01) == pytest.approx(1.0)   # pure noise: no guidance
    assert 4.9 < guidance_scale(999, 5.0, 0.01) < 5.0               # p = 0.01 keeps it near s almost throughout
    assert guidance_scale(500, 5.0, 1.0) == pytest.approx(3.0)     # p = 1: plain cosine ramp
    # guidance relaxes monotonically from s at the end of sampling to 1 at pure noise
    scales = [guidance_scale(t, 6.0, 0.5) for t in range(0, 1001, 50)]
    assert scales[0] == pytest.approx(6.0) and scales[-1] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(scales, scales[1:]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MDSGen(MDSGenConfig(hidden_size=32, depth=3, num_heads=2, decoder_depth=1, feature_dim=8)).eval()
    with torch.no_grad():  # leave adaLN-Zero's identity start so outputs depend on the input
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def test_batched_cfg_equals_two_passes(model):
    x, t, f = torch.randn(2, 4, 16, 64), torch.tensor([500, 500]), torch.randn(2, 32, 8)
    with torch.no_grad():
        cond, uncond = model(x, t, f), model(x, t, torch.zeros_like(f))
        assert torch.allclose(model.forward_with_cfg(x, t, f, 4.0), uncond + 4.0 * (cond - uncond), atol=1e-5)


def test_sampling_is_deterministic_and_conditioned(model):
    f = torch.randn(2, 32, 8)
    noise = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(0))
    a = sample(model, f, SamplingConfig(steps=5), noise=noise)
    b = sample(model, f, SamplingConfig(steps=5), noise=noise.clone())
    assert a.shape == (2, 4, 16, 64) and torch.equal(a, b)
    c = sample(model, torch.randn(2, 32, 8), SamplingConfig(steps=5), noise=noise)
    assert not torch.allclose(a, c)
    # samples are independent of their batch-mates
    single = sample(model, f[:1], SamplingConfig(steps=5), noise=noise[:1])
    assert torch.allclose(single, a[:1], atol=1e-4)


def test_texture_noise_is_the_rolled_start_noise_seeded_and_batch_independent(model):
    f = torch.randn(3, 32, 8)
    noise = torch.randn(3, 4, 16, 64, generator=torch.Generator().manual_seed(0))
    smooth = sample(model, f, SamplingConfig(steps=5), noise=noise)
    textured = sample(model, f, SamplingConfig(steps=5, texture_noise=0.3), noise=noise)
    added = (textured - smooth) / 0.3
    assert torch.allclose(added, noise.roll((8, 32), dims=(-2, -1)), atol=1e-4)
    # i.i.d. and unrelated to the sample it is added to
    assert abs(added.std().item() - 1.0) < 0.05 and abs(torch.corrcoef(torch.stack([added.flatten(),
                                                                                    smooth.flatten()]))[0, 1]) < 0.05
    alone = sample(model, f[1:2], SamplingConfig(steps=5, texture_noise=0.3), noise=noise[1:2])
    assert torch.allclose(alone, textured[1:2], atol=1e-4)


def test_a_fitted_texture_shapes_the_noise_per_row(model):
    # training latents with fine structure in the low rows and none in the top ones (each its own level);
    # row 8's neighbourhood reaches into row 7's
    generator = torch.Generator().manual_seed(1)
    latents = torch.linspace(-1, 1, 16)[:, None].expand(40, 4, 16, 64).clone()
    latents[:, :, :8] += 0.5 * torch.randn(40, 4, 8, 64, generator=generator)
    texture = fit_texture(latents)
    assert texture.shape == (4, 16, 1) and texture.square().mean().item() == pytest.approx(1.0, abs=1e-5)
    assert texture[:, :8].min() > 1.3 and texture[:, 9:].max() < 1e-5
    assert torch.equal(fit_texture(torch.zeros(2, 4, 16, 64)), torch.ones(4, 16, 1))  # no fine structure: flat
    # time along the height (the AudioLDM layout): the same shape, along the width
    assert torch.allclose(fit_texture(latents.transpose(-2, -1), "height"), texture.transpose(-2, -1), atol=1e-6)

    f = torch.randn(2, 32, 8)
    noise = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(0))
    flat = sample(model, f, SamplingConfig(steps=5, texture_noise=0.3), noise=noise, texture=texture)
    fitted = SamplingConfig(steps=5, texture_noise=0.3, texture_shape="fitted")
    shaped = sample(model, f, fitted, noise=noise, texture=texture)
    smooth = sample(model, f, SamplingConfig(steps=5, texture_shape="fitted"), noise=noise, texture=texture)
    assert torch.allclose(shaped - smooth, (flat - smooth) * texture, atol=1e-3)
    assert torch.allclose(shaped[:, :, 9:], smooth[:, :, 9:], atol=1e-3)  # the smooth rows stay smooth
    with pytest.raises(ValueError, match="this model has no fitted texture"):
        sample(model, f, fitted, noise=noise)


def test_guidance_interval_guides_only_the_noisy_steps(model):
    f = torch.randn(2, 32, 8)
    noise = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(0))
    guided = sample(model, f, SamplingConfig(steps=5, cfg_scale=3.0), noise=noise)
    unguided = sample(model, f, SamplingConfig(steps=5, cfg_scale=1.0), noise=noise)
    assert torch.equal(sample(model, f, SamplingConfig(steps=5, cfg_scale=3.0, cfg_min_t=0), noise=noise), guided)
    # above every step (DDIM's trailing steps: 999, 799, ..., 199): the conditional prediction alone
    assert torch.equal(sample(model, f, SamplingConfig(steps=5, cfg_scale=3.0, solver="ddim", cfg_min_t=1000),
                              noise=noise),
                       sample(model, f, SamplingConfig(steps=5, cfg_scale=1.0, solver="ddim"), noise=noise))
    between = sample(model, f, SamplingConfig(steps=5, cfg_scale=3.0, cfg_min_t=500), noise=noise)
    assert (between - guided).abs().max() > 1e-3 and (between - unguided).abs().max() > 1e-3


@pytest.mark.parametrize("values,message", [
    (dict(steps=0), "steps"), (dict(steps=5000), "steps"),
    (dict(cfg_scale=-1.0), "cfg_scale"), (dict(cfg_scale=math.nan), "cfg_scale"),
    (dict(cfg_scale=1e9), "cfg_scale"), (dict(cfg_power=0.0), "cfg_power"),
    (dict(texture_noise=-0.1), "texture_noise"), (dict(texture_noise=math.nan), "texture_noise"),
    (dict(texture_shape="pink"), "texture_shape"),
    (dict(cfg_min_t=-1), "cfg_min_t"), (dict(cfg_min_t=1001), "cfg_min_t"), (dict(cfg_min_t=0.5), "cfg_min_t"),
])
def test_absurd_sampling_settings_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**values)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_each_training_target_is_what_the_sampler_reads(prediction):
    """The target the network learns (mdsgen) and the prediction type the sampler decodes (diffusers) must
    agree: fed the exact target, a DDIM step recovers the clean latent exactly, for every parametrisation."""
    from mdsgen.model.diffusion import add_noise, alphas_cumprod, make_scheduler, target

    x0, noise = torch.randn(2, 1, 8, 16), torch.randn(2, 1, 8, 16)
    scheduler = make_scheduler(SamplingConfig(solver="ddim"), prediction)
    scheduler.set_timesteps(25)
    cumprod = alphas_cumprod()
    for step in scheduler.timesteps[[0, 12, 24]]:
        t = step.expand(2)
        noisy = add_noise(x0, noise, t, cumprod)
        out = scheduler.step(target(x0, noise, t, cumprod, prediction), step, noisy)
        assert torch.allclose(out.pred_original_sample, x0, atol=1e-3), (prediction, int(step))


def test_min_snr_floor_keeps_noisy_steps_at_plain_x0_weight():
    from mdsgen.model.diffusion import alphas_cumprod, loss_weights

    cumprod = alphas_cumprod()
    t = torch.arange(0, 1000, 10)
    snr = cumprod[t] / (1 - cumprod[t])
    floored = loss_weights(t, cumprod, "x0", 5.0, floor=1.0)
    assert torch.allclose(floored, snr.clamp(1.0, 5.0))
    assert floored[snr < 1].eq(1.0).all() and floored[snr > 5].eq(5.0).all() and (snr < 1).any() and (snr > 5).any()
    assert torch.allclose(loss_weights(t, cumprod, "x0", 5.0), snr.clamp_max(5.0))  # no floor: min-SNR as before
    # the same x0-error weight whatever the network predicts
    assert torch.allclose(loss_weights(t, cumprod, "epsilon", 5.0, 1.0) * snr, floored)
    assert torch.allclose(loss_weights(t, cumprod, "v", 5.0, 1.0) * (snr + 1), floored)
