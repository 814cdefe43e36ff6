"""MDSGen: a masked diffusion transformer that turns video features into audio latents.

Pham et al., "MDSGen: Fast and Efficient Masked Diffusion Temporal-Aware Transformers for Open-Domain
Sound Generation", ICLR 2025. Built from DiT (Peebles & Xie) adaLN-Zero blocks and MDT's masked
encoder / side-interpolator / decoder layout (Gao et al.), with two MDSGen pieces:

- the Reducer condenses the per-frame video features [B, 32, F] into one vector that joins the timestep
  embedding in every block's adaLN;
- temporal-aware masking (TAM) hides whole time columns of the token grid during training; random token
  masking (SAM, as MDT) and no masking (plain DiT) are the ablations.

Two conditioning options beyond the paper, for its ablations and ours (REPORT.md): `conditioning=
"cross_attention"` drops the Reducer and lets every block attend to all 32 projected frame features (as
Diff-Foley's U-Net conditions); `frame_tokens` adds each frame's feature to the tokens of its time column.
A third, `output_conv`, ends the network with a residual convolution along time (U-ViT ends with a conv for
the same reason): without it each token's output is one linear map of its own state, and a mel sampled
from whole-spectrum tokens jumps in loudness where one token ends and the next begins.

The latent grid is [C, H, W]; `time_axis` says which of H ("height", the AudioLDM layout) or W ("width",
the Stable Diffusion layout: 4 x 16 x 64, freq x time) is time.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mdsgen.base.errors import refuse_unknown_keys


CONDITIONINGS = ("reducer", "cross_attention")
PREDICTIONS = ("epsilon", "v", "x0")


@dataclass
class MDSGenConfig:
    input_size: tuple[int, int] = (16, 64)   # latent H x W
    in_channels: int = 4
    patch_size: int | tuple[int, int] = 2     # square, or (H, W): e.g. (80, 8) makes each token a whole spectrum
    hidden_size: int = 192
    depth: int = 12                          # encoder + decoder blocks
    num_heads: int = 3
    decoder_depth: int = 4
    mlp_ratio: float = 4.0
    feature_dim: int = 1280                  # frame feature width (512 for CAVP)
    num_frames: int = 32
    time_axis: str = "width"                 # "width" (SD layout) or "height" (AudioLDM layout)
    mask_strategy: str = "tam"               # "tam", "sam" or "none"
    mask_ratio: float = 0.3
    rel_pos_bias: bool = True                # BEiT-style bias in every attention (the authors' code)
    frame_tokens: bool = False               # beyond the paper: each time column also gets its own frame's feature
    conditioning: str = "reducer"            # "reducer" (paper) or "cross_attention" (all frames, Diff-Foley style)
    prediction: str = "epsilon"              # what the network outputs: "epsilon" (paper), "v" (Salimans & Ho) or "x0"
    output_conv: int = 0                     # beyond the paper: kernel (frames) of a residual conv along time; 0: none

    def __post_init__(self):
        self.input_size = tuple(self.input_size)
        self.patch_size = self.patch_size if isinstance(self.patch_size, int) else tuple(self.patch_size)
        if self.time_axis not in ("width", "height"):
            raise ValueError(f"time_axis {self.time_axis!r}: use 'width' or 'height'")
        if self.mask_strategy not in ("tam", "sam", "none"):
            raise ValueError(f"mask_strategy {self.mask_strategy!r}: use 'tam', 'sam' or 'none'")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning {self.conditioning!r}: use one of {', '.join(CONDITIONINGS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction {self.prediction!r}: use one of {', '.join(PREDICTIONS)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {self.mask_ratio}: must be in [0, 1)")
        if any(s % p for s, p in zip(self.input_size, self.patch)):
            raise ValueError(f"input_size {self.input_size} is not divisible by patch {self.patch_size}")
        if self.output_conv < 0 or (self.output_conv and self.output_conv % 2 == 0):
            raise ValueError(f"output_conv {self.output_conv}: an odd kernel size in frames, or 0 for none")
        if not 0 < self.decoder_depth < self.depth:
            raise ValueError(f"decoder_depth {self.decoder_depth} must be between 1 and depth - 1")

    @property
    def patch(self) -> tuple[int, int]:
        p = self.patch_size
        return (p, p) if isinstance(p, int) else p

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch[0], self.input_size[1] // self.patch[1]

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP (as DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def frame_projection(feature_dim: int, hidden_size: int) -> nn.Module:
    return nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size))


class VideoConditioner(nn.Module):
    """Frame features [B, T, F] -> one vector [B, D]: project, then the Reducer over the frame axis."""

    def __init__(self, feature_dim: int, num_frames: int, hidden_size: int):
        super().__init__()
        self.project = frame_projection(feature_dim, hidden_size)
        self.reducer = nn.Conv1d(num_frames, 1, kernel_size=1)  # a learned weighting of the frames
        self.out = nn.Sequential(nn.GELU(), nn.LayerNorm(hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.reducer(self.project(features)).squeeze(1))


class FrameTokens(nn.Module):
    """Time-aligned conditioning (not in the paper): frame features [B, T, F] -> one embedding per time
    column of the token grid [B, columns, D], added to that column's tokens. The global Reducer vector
    says *what* sounds; these say *when*. Zero-initialised, so training starts from the paper's model."""

    def __init__(self, feature_dim: int, hidden_size: int, columns: int):
        super().__init__()
        self.columns = columns
        self.project = nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.columns:  # e.g. 32 frames onto the AudioLDM layout's time rows
            features = F.interpolate(features.transpose(1, 2), size=self.columns, mode="linear").transpose(1, 2)
        return self.project(features)


class RelativePositionBias(nn.Module):
    """A learned bias per head for every 2-D offset between tokens (BEiT).

    At inference the full-grid bias is the same for every call until the table changes: it is built
    once and reused (50 denoiser calls per clip would otherwise gather and copy it in every block)."""

    cache_at_inference = True

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self._cached: tuple | None = None  # (table version, device, dtype), bias
        h, w = grid
        self.table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
        index = (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)
        self.register_buffer("index", index, persistent=False)

    def forward(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Bias [1 or B, heads, N, N] for all tokens, or for the tokens `ids` [B, n] of each sample."""
        if ids is None:
            caching = self.cache_at_inference and not torch.is_grad_enabled()
            key = (self.table._version, self.table.device, self.table.dtype)
            if caching and self._cached is not None and self._cached[0] == key:
                return self._cached[1]
            bias = self.table[self.index].permute(2, 0, 1).unsqueeze(0).contiguous()
            if caching:
                self._cached = (key, bias)
            return bias
        index = self.index[ids[:, :, None], ids[:, None, :]]  # [B, n, n]
        return self.table[index].permute(0, 3, 1, 2).contiguous()  # SDPA needs a dense mask to stay fast


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Tokens [B, N, D] attend to the projected frame features [B, T, D] (the cross_attention ablation)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads = self.num_heads
        q = self.q(self.norm(x)).view(b, n, heads, d // heads).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid, rel_pos_bias: bool,
                 cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.rel_pos = RelativePositionBias(grid, num_heads) if rel_pos_bias else None

    def forward(self, x, c, ids=None, context=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        bias = None if self.rel_pos is None else self.rel_pos(ids)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), bias)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: tuple[int, int], out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch[0] * patch[1] * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class OutputConv(nn.Module):
    """x + conv(GELU(conv(x))) along the time axis, the other axes as channels; the second conv starts at
    zero, so the network starts as without it. It lets an output cross the borders between tokens."""

    def __init__(self, channels: int, kernel: int, time_axis: str):
        super().__init__()
        self.time_axis = time_axis
        self.net = nn.Sequential(nn.Conv1d(channels, channels, kernel, padding=kernel // 2), nn.GELU(),
                                 nn.Conv1d(channels, channels, kernel, padding=kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x if self.time_axis == "width" else x.transpose(2, 3)    # [B, C, F, T]
        b, c, f, t = seq.shape
        seq = seq + self.net(seq.reshape(b, c * f, t)).view(b, c, f, t)
        return seq if self.time_axis == "width" else seq.transpose(2, 3)


def sincos_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """2-D sine-cosine position table [H*W, dim] (MAE / DiT)."""
    h, w = grid
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], axis=1)


class MDSGen(nn.Module):
    def __init__(self, config: MDSGenConfig):
        super().__init__()
        self.config = cfg = config
        dim, grid = cfg.hidden_size, cfg.grid
        self.num_tokens = grid[0] * grid[1]
        self.x_embedder = nn.Conv2d(cfg.in_channels, dim, cfg.patch, cfg.patch)
        self.t_embedder = TimestepEmbedder(dim)
        cross = cfg.conditioning == "cross_attention"
        self.video_embedder = (frame_projection(cfg.feature_dim, dim) if cross
                               else VideoConditioner(cfg.feature_dim, cfg.num_frames, dim))
        columns = grid[1] if cfg.time_axis == "width" else grid[0]
        token_time = torch.arange(self.num_tokens)
        self.register_buffer("token_time", token_time % grid[1] if cfg.time_axis == "width" else token_time // grid[1],
                             persistent=False)
        self.frame_embedder = FrameTokens(cfg.feature_dim, dim, columns) if cfg.frame_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

        def block():
            return DiTBlock(dim, cfg.num_heads, cfg.mlp_ratio, grid, cfg.rel_pos_bias, cross)

        self.en_blocks = nn.ModuleList(block() for _ in range(cfg.depth - cfg.decoder_depth))
        self.side_block = block()  # the side-interpolator: runs only in masked training passes
        self.de_blocks = nn.ModuleList(block() for _ in range(cfg.decoder_depth))
        self.final_layer = FinalLayer(dim, cfg.patch, cfg.in_channels)
        freq = cfg.input_size[0] if cfg.time_axis == "width" else cfg.input_size[1]
        self.output_conv = (OutputConv(cfg.in_channels * freq, cfg.output_conv, cfg.time_axis)
                            if cfg.output_conv else None)
        self.initialize_weights()

    def initialize_weights(self):
        def xavier(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier)
        table = torch.from_numpy(sincos_2d(self.config.hidden_size, self.config.grid)).float().unsqueeze(0)
        self.pos_embed.data.copy_(table)
        self.decoder_pos_embed.data.copy_(table)
        nn.init.normal_(self.mask_token, std=0.02)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for blk in [*self.en_blocks, self.side_block, *self.de_blocks]:  # adaLN-Zero: blocks start as identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.output_conv is not None:
            nn.init.zeros_(self.output_conv.net[-1].weight)
            nn.init.zeros_(self.output_conv.net[-1].bias)
        if self.frame_embedder is not None:
            nn.init.zeros_(self.frame_embedder.project[-1].weight)
            nn.init.zeros_(self.frame_embedder.project[-1].bias)
        for blk in [*self.en_blocks, self.side_block, *self.de_blocks]:
            if blk.cross_attn is not None:  # like adaLN-Zero: cross-attention starts as a no-op
                nn.init.zeros_(blk.cross_attn.proj.weight)
                nn.init.zeros_(blk.cross_attn.proj.bias)

    # --- masking -------------------------------------------------------------------------------
    def sample_mask(self, batch: int, device, generator=None) -> torch.Tensor:
        """Ids of the visible tokens [B, n] for the configured strategy (sorted, for the bias)."""
        cfg, (gh, gw) = self.config, self.config.grid
        if cfg.mask_strategy == "tam":
            columns = gw if cfg.time_axis == "width" else gh
            keep = max(1, round(columns * (1 - cfg.mask_ratio)))
            kept = torch.rand(batch, columns, generator=generator, device=device).argsort(1)[:, :keep]
            visible = (self.token_time.to(device)[None, :, None] == kept[:, None, :]).any(-1)  # [B, N]
            return visible.nonzero()[:, 1].view(batch, -1)
        if cfg.mask_strategy == "sam":
            keep = max(1, round(self.num_tokens * (1 - cfg.mask_ratio)))
            ids = torch.rand(batch, self.num_tokens, generator=generator, device=device).argsort(1)[:, :keep]
            return ids.sort(1).values
        raise ValueError("mask_strategy 'none' has no masked pass")

    # --- forward -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x).flatten(2).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), c, (gh, gw) = self.config.patch, self.config.in_channels, self.config.grid
        x = x.view(x.shape[0], gh, gw, ph, pw, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * ph, gw * pw)

    def condition(self, t: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(adaLN vector [B, D], cross-attention context [B, T, D] or None)."""
        if self.config.conditioning == "cross_attention":
            return self.t_embedder(t), self.video_embedder(features)
        return self.t_embedder(t) + self.video_embedder(features), None

    def forward(self, x, t, features, visible_ids: torch.Tensor | None = None):
        """Predict the noise in latents x [B, C, H, W] at steps t [B] given frame features [B, T, F].

        With `visible_ids` (from `sample_mask`) only those tokens enter the encoder; mask tokens fill
        the rest before the side-interpolator and the decoder, as in training's masked pass.
        """
        c, context = self.condition(t, features)
        frames = 0.0 if self.frame_embedder is None else self.frame_embedder(features)[:, self.token_time]
        x = self.patchify(x) + self.pos_embed + frames
        if visible_ids is not None:
            x = x.gather(1, visible_ids[..., None].expand(-1, -1, x.shape[-1]))
        for blk in self.en_blocks:
            x = blk(x, c, visible_ids, context)
        if visible_ids is None:
            x = x + self.decoder_pos_embed + frames
        else:
            x = self.interpolate_masked(x, c, visible_ids, frames, context)
        for blk in self.de_blocks:
            x = blk(x, c, context=context)
        x = self.unpatchify(self.final_layer(x, c))
        return x if self.output_conv is None else self.output_conv(x)

    def interpolate_masked(self, x, c, visible_ids, frames=0.0, context=None):
        """Put visible tokens back on the grid, fill the gaps with mask tokens, let the side block
        predict the hidden ones; visible tokens pass through unchanged (MDT's side-interpolator)."""
        b, _, d = x.shape
        full = self.mask_token.expand(b, self.num_tokens, d).clone()
        full.scatter_(1, visible_ids[..., None].expand(-1, -1, d), x)
        full = full + self.decoder_pos_embed + frames
        hidden = torch.ones(b, self.num_tokens, 1, device=x.device, dtype=x.dtype)
        hidden.scatter_(1, visible_ids[..., None], 0.0)
        return hidden * self.side_block(full, c, context=context) + (1 - hidden) * full

    def forward_with_cfg(self, x, t, features, guidance: torch.Tensor | float):
        """Conditional and unconditional (zeroed features) passes in one batch, then guidance."""
        x2 = torch.cat([x, x])
        features2 = torch.cat([features, torch.zeros_like(features)])
        eps_cond, eps_uncond = self(x2, torch.cat([t, t]), features2).chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    # --- sizes ---------------------------------------------------------------------------------
    def parameter_counts(self) -> dict:
        total = sum(p.numel() for p in self.parameters())
        side = sum(p.numel() for p in self.side_block.parameters()) + self.mask_token.numel()
        return {"inference": total - side, "training": total}


SIZES = {
    "T": dict(depth=12, hidden_size=192, num_heads=3),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
}
PAPER_PARAMS = {"T": 5e6, "S": 33e6, "B": 131e6, "L": 461e6}


def config_for(size: str, **overrides) -> MDSGenConfig:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: use one of {', '.join(SIZES)}")
    return MDSGenConfig(**{**SIZES[size], **overrides})


@dataclass(frozen=True)
class ModelSettings:
    """params.yaml `model`: a size (SIZES) and the MDSGenConfig fields set on top of it; the fields left out
    follow the size, the VAE's latent grid and the video (checkpoint.init_checkpoint)."""
    size: str = "T"
    overrides: tuple[tuple[str, object], ...] = ()   # (field, value) pairs, in params.yaml's order

    @classmethod
    def from_params(cls, values: dict | None) -> ModelSettings:
        values = dict(values or {})
        refuse_unknown_keys(values, {"size"} | {f.name for f in fields(MDSGenConfig)}, "model")
        return cls(values.pop("size", cls.size), tuple(values.items()))

    def with_values(self, **values) -> ModelSettings:
        """These settings with some fields (or the size) set anew."""
        return ModelSettings.from_params({**self.as_dict(), **values})

    def as_dict(self) -> dict:
        return {"size": self.size, **dict(self.overrides)}
