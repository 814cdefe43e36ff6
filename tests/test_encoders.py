import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mdsgen.base.errors import CheckpointError
from mdsgen.model.encoders import CAVPEncoder, EfficientNetLite0Encoder, build_frame_encoder


def test_efficientnet_features_are_l2_normalised_and_deterministic():
    encoder = build_frame_encoder("efficientnet-lite0")
    frames = torch.rand(2, 3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    features = encoder(frames)
    assert features.shape == (2, 3, 1280)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    assert torch.equal(features, encoder(frames))
    # frames go through the network a few at a time on a CPU (the speed); one batch gives the same features
    assert torch.allclose(EfficientNetLite0Encoder(chunk=64)(frames), features, atol=1e-6)


def test_efficientnet_weights_are_the_imagenet_ones(badger):
    """The packaged weights are really loaded: the badger picture is classified as a badger (362)."""
    encoder = EfficientNetLite0Encoder()
    stamp = Image.open(badger[0]).convert("RGBA")
    canvas = Image.new("RGBA", stamp.size, (255, 255, 255, 255))
    canvas.alpha_composite(stamp)
    x = torch.from_numpy(np.array(canvas.convert("RGB").resize((224, 224)))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        logits = encoder.net((x[None] - 0.5) / 0.5)
    assert logits.argmax().item() == 362


@pytest.fixture(scope="module")
def cavp():
    torch.manual_seed(0)
    model = CAVPEncoder()
    for m in model.modules():  # non-trivial batch-norm statistics, so a lost buffer would show
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _diff_foley_state(model) -> dict:
    # how Diff-Foley's training saves it: a state_dict under "state_dict", DDP "module." prefixes,
    # plus the audio branch the video encoder does not use
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.spec_encoder.conv.weight"] = torch.zeros(3)
    return {"state_dict": state}


def test_cavp_checkpoint_round_trip(tmp_path, cavp):
    frames = torch.rand(1, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = cavp(frames)
    assert expected.shape == (1, 4, 512)
    torch.save(_diff_foley_state(cavp), tmp_path / "cavp.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in cavp.state_dict().items()}, str(tmp_path / "cavp.safetensors"))
    for name in ("cavp.pth", "cavp.safetensors"):
        loaded = build_frame_encoder({"name": "cavp", "weights": str(tmp_path / name)})
        assert torch.allclose(loaded(frames), expected, atol=1e-5)


def test_cavp_refuses_pickled_code_and_wrong_weights(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(CheckpointError, match="without running pickled code"):
        CAVPEncoder(str(tmp_path / "evil.pth"))
    torch.save({"resnet.fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no video_encoder"):
        CAVPEncoder(str(tmp_path / "other.pth"))
    with pytest.raises(CheckpointError, match="needs weights"):
        build_frame_encoder({"name": "cavp"})
