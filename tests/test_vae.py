import json

import pytest
import torch

from mdsgen.model.vae import MelVAE, load_vae


@pytest.mark.parametrize("name", ["small", "sd-v1"])
def test_latent_contract(name):
    vae = MelVAE.from_config(name).eval()
    mel = torch.rand(2, 128, 512)
    with torch.no_grad():
        latents = vae.encode(mel)
        assert latents.shape == (2, 4, 16, 64)
        assert vae.decode(latents).shape == (2, 128, 512)
    assert vae.scaling_factor == 0.18215


def test_decode_channel_selection():
    torch.manual_seed(0)
    vae = MelVAE.from_config("small").eval()
    latents = torch.randn(1, 4, 16, 64)
    with torch.no_grad():
        images = vae.decode_images(latents)
        for channel in range(3):
            vae.decode_channel = channel
            assert torch.equal(vae.decode(latents), images[:, channel].clamp(0, 1))
        vae.decode_channel = "mean"
        assert torch.allclose(vae.decode(latents), images.mean(1).clamp(0, 1))
    assert not torch.equal(images[:, 0], images[:, 1])  # the channels really differ
    with pytest.raises(ValueError, match="decode_channel"):
        MelVAE.from_config("small", decode_channel=3)


@pytest.fixture(scope="module")
def sd_vae_folder(tmp_path_factory):
    """A randomly initialised SD-v1-shaped VAE in diffusers format, as a user's download looks."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd") / "vae"
    MelVAE.from_config("sd-v1").vae.save_pretrained(folder, safe_serialization=True)
    return folder


def test_sd_vae_loads_from_a_folder(sd_vae_folder):
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(sd_vae_folder).eval()
    vae = load_vae(str(sd_vae_folder))
    assert vae.decode_channel == 1 and vae.scaling_factor == 0.18215
    mel = torch.rand(1, 128, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.encode(mel[:, None].expand(-1, 3, -1, -1)).latent_dist.mode() * 0.18215
        assert torch.allclose(vae.encode(mel), expected, atol=1e-5)


def test_vae_save_and_load_keeps_channel(tmp_path):
    vae = MelVAE.from_config("small", decode_channel="mean").eval()
    vae.save(str(tmp_path / "v"))
    again = load_vae(str(tmp_path / "v"))
    assert again.decode_channel == "mean"
    assert json.loads((tmp_path / "v" / "mdsgen.json").read_text())["decode_channel"] == "mean"
    for a, b in zip(vae.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_pickled_vae_weights_are_refused(tmp_path, sd_vae_folder):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((sd_vae_folder / "config.json").read_text())
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_vae(str(folder))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_vae(str(tmp_path / "absent"))


def test_no_vae_standardises_the_mel_losslessly_and_survives_save_and_load(tmp_path):
    """`vae.config: none`: the latent is the mel itself at unit spread; decode gives back the same mel."""
    torch.manual_seed(0)
    mels = torch.rand(6, 80, 704) ** 3  # skewed, as log mels are
    codec = MelVAE.from_config("none").fit(mels)
    latents = codec.encode(mels)
    assert latents.shape == (6, 1, 80, 704) and codec.latent_size(80, 704) == (80, 704)
    assert abs(latents.mean().item()) < 1e-4 and abs(latents.std().item() - 1.0) < 1e-4
    assert torch.allclose(codec.decode(latents), mels, atol=1e-6)
    codec.save(str(tmp_path / "codec"))
    again = load_vae(str(tmp_path / "codec"))
    assert torch.allclose(again.decode(latents), mels, atol=1e-6)
    with pytest.raises(ValueError, match="vae.config 'medium'"):
        MelVAE.from_config("medium")
