import json

import pytest
import torch

from mdsgen.model.diffusion import training_loss
from mdsgen.model.network import MDSGen, MDSGenConfig, PAPER_PARAMS, SIZES, config_for


def tiny(**overrides) -> MDSGen:
    torch.manual_seed(0)
    return MDSGen(MDSGenConfig(**{**dict(hidden_size=32, depth=4, num_heads=2, decoder_depth=2, feature_dim=16),
                                  **overrides}))


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_counts_match_the_paper(size):
    model = MDSGen(config_for(size, feature_dim=512))  # CAVP's 512-d features, as in the paper
    counts = model.parameter_counts()
    assert counts["training"] > counts["inference"]  # the side block only exists for training
    ratio = counts["inference"] / PAPER_PARAMS[size]
    if size == "T":
        # 12 x 192 cannot be 5M: the attention and MLP alone hold 12 * 12 * 192^2 = 5.3M
        assert 8.0e6 < counts["inference"] < 8.8e6
    else:
        assert abs(ratio - 1) < 0.03, (size, counts, ratio)


def test_shapes_for_both_layouts():
    x, t, f = torch.randn(2, 4, 16, 64), torch.tensor([3, 900]), torch.randn(2, 32, 16)
    assert tiny()(x, t, f).shape == x.shape
    audioldm = tiny(input_size=(64, 16), in_channels=8, time_axis="height")
    x = torch.randn(2, 8, 64, 16)
    assert audioldm(x, t, f).shape == x.shape
    assert audioldm(x, t, f, audioldm.sample_mask(2, "cpu")).shape == x.shape


def _grid_positions(model, ids):
    gw = model.config.grid[1]
    return ids // gw, ids % gw


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_tam_masks_whole_time_columns(ratio):
    model = tiny(mask_ratio=ratio)
    gh, gw = model.config.grid  # 8 freq rows x 32 time columns
    ids = model.sample_mask(16, "cpu", torch.Generator().manual_seed(1))
    for sample in ids:
        rows, cols = _grid_positions(model, sample)
        visible_cols = cols.unique()
        assert len(visible_cols) == round(gw * (1 - ratio))
        assert len(sample) == len(visible_cols) * gh  # every row of a visible column, none of a hidden one
    assert len({tuple(s.tolist()) for s in ids}) > 1  # columns change between samples


def test_tam_on_the_height_time_axis_masks_rows():
    model = tiny(input_size=(64, 16), time_axis="height")
    gh, gw = model.config.grid
    ids = model.sample_mask(4, "cpu")
    for sample in ids:
        rows, _ = _grid_positions(model, sample)
        assert len(rows.unique()) == round(gh * 0.7) and len(sample) == len(rows.unique()) * gw


def test_sam_masks_single_tokens():
    model = tiny(mask_strategy="sam")
    ids = model.sample_mask(8, "cpu")
    assert ids.shape[1] == round(model.num_tokens * 0.7)
    _, cols = _grid_positions(model, ids[0])
    per_column = torch.bincount(cols, minlength=model.config.grid[1])
    assert (per_column != per_column[0]).any()  # not whole columns


def test_only_visible_tokens_enter_the_encoder():
    model = tiny()
    seen = []
    model.en_blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    side = []
    model.side_block.register_forward_hook(lambda m, inp, out: side.append(inp[0].shape[1]))
    x, t, f = torch.randn(2, 4, 16, 64), torch.tensor([1, 2]), torch.randn(2, 32, 16)
    model(x, t, f)
    ids = model.sample_mask(2, "cpu")
    model(x, t, f, ids)
    assert seen == [256, ids.shape[1]] and ids.shape[1] == 22 * 8
    assert side == [256]  # the side-interpolator runs in the masked pass only, on the full grid


@pytest.mark.parametrize("strategy,passes", [("tam", 2), ("sam", 2), ("none", 1)])
def test_training_loss_passes(strategy, passes):
    model = tiny(mask_strategy=strategy)
    calls = []
    model.en_blocks[0].register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[1]))
    out = training_loss(model, torch.randn(3, 4, 16, 64), torch.randn(3, 32, 16))
    assert len(calls) == passes
    assert ("loss_masked" in out) == (passes == 2)
    expected = out["loss_full"] + (out["loss_masked"] if passes == 2 else 0)
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    # the side block is in the graph (has a gradient, zero at adaLN-Zero init) only with a masked pass
    assert (model.side_block.adaLN_modulation[-1].weight.grad is not None) == (passes == 2)


def test_cfg_dropout_zeroes_the_condition():
    model = tiny()
    seen = []
    model.video_embedder.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    training_loss(model, torch.randn(64, 4, 16, 64), torch.ones(64, 32, 16), cfg_dropout=0.5,
                  generator=torch.Generator().manual_seed(0))
    dropped = (seen[0].abs().sum(dim=(1, 2)) == 0).float().mean().item()
    assert 0.3 < dropped < 0.7


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="time_axis"):
        MDSGenConfig(time_axis="diagonal")
    with pytest.raises(ValueError, match="mask_strategy"):
        MDSGenConfig(mask_strategy="random")
    with pytest.raises(ValueError, match="size"):
        config_for("XL")


@pytest.mark.slow  # builds every size, L included
def test_models_command_lists_every_size_as_json():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mdsgen", "models", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["size"]: r for r in json.loads(proc.stdout)}
    assert list(rows) == ["T", "S", "B", "L"]
    for size in "SBL":
        assert abs(rows[size]["ratio_to_paper"] - 1) < 0.03
    assert all(r["params_training"] > r["params_inference"] for r in rows.values())
    assert rows["L"]["depth"] == 24 and rows["T"]["hidden_size"] == 192


def test_frame_tokens_start_as_the_paper_model_and_put_each_frame_on_its_column():
    torch.manual_seed(0)
    paper = tiny()
    aligned = MDSGen(MDSGenConfig(**{**paper.config.to_dict(), "frame_tokens": True}))
    missing, unexpected = aligned.load_state_dict(paper.state_dict(), strict=False)
    assert all(k.startswith("frame_embedder.") for k in missing) and not unexpected
    x, t, f = torch.randn(2, 4, 16, 64), torch.tensor([10, 500]), torch.randn(2, 32, 16)
    assert torch.allclose(aligned(x, t, f), paper(x, t, f), atol=1e-6)  # zero-initialised: the paper's model
    # column j of the token grid (time on the width axis) carries frame j's embedding
    torch.nn.init.normal_(aligned.frame_embedder.project[-1].weight)
    seen = []
    aligned.en_blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    f2 = f.clone()
    f2[:, 5] += 1.0
    aligned(x, t, f)
    aligned(x, t, f2)
    changed = (seen[0] - seen[1]).abs().sum(-1)[0] > 0          # [256 tokens]
    assert changed.nonzero().flatten().tolist() == [r * 32 + 5 for r in range(8)]
    assert aligned.parameter_counts()["inference"] > paper.parameter_counts()["inference"]


def test_inference_reuses_the_position_bias_until_the_weights_change():
    from mdsgen.model.network import MDSGen, RelativePositionBias, config_for

    torch.manual_seed(0)
    model = MDSGen(config_for("T", feature_dim=64)).eval()
    for param in model.parameters():  # adaLN-Zero and zero tables at init: give every part a say
        torch.nn.init.normal_(param, std=0.05)
    x, t, f = torch.randn(2, 4, 16, 64), torch.tensor([10, 900]), torch.randn(2, 32, 64)
    with torch.no_grad():
        first = model(x, t, f)
        assert first.abs().max() > 0
        bias = model.en_blocks[0].rel_pos(None)
        assert model.en_blocks[0].rel_pos(None) is bias  # built once
        assert torch.equal(model(x, t, f), first)
        RelativePositionBias.cache_at_inference = False
        try:
            assert torch.equal(model(x, t, f), first)  # the cache changes nothing
        finally:
            RelativePositionBias.cache_at_inference = True
        # new weights (a checkpoint load, a training step) invalidate it
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["en_blocks.0.rel_pos.table"] += 1.0
        model.load_state_dict(state)
        assert not torch.equal(model.en_blocks[0].rel_pos(None), bias)
        assert not torch.equal(model(x, t, f), first)
    with torch.enable_grad():  # training never reads the cache
        model.train()
        assert model.en_blocks[0].rel_pos(None).requires_grad


def test_cross_attention_conditioning_drops_the_reducer_and_attends_to_every_frame():
    model = tiny(conditioning="cross_attention")
    assert not hasattr(model.video_embedder, "reducer")
    assert all(blk.cross_attn is not None for blk in [*model.en_blocks, model.side_block, *model.de_blocks])
    assert model.parameter_counts()["inference"] > tiny().parameter_counts()["inference"]
    x, t, f = torch.randn(2, 4, 16, 64), torch.tensor([10, 500]), torch.randn(2, 32, 16)
    assert model(x, t, f, model.sample_mask(2, "cpu")).shape == x.shape
    for blk in [*model.en_blocks, *model.de_blocks]:  # past the zero init, as after training
        torch.nn.init.normal_(blk.cross_attn.proj.weight, std=0.1)
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    base = model(x, t, f)
    later = f.clone()
    later[:, 31] += 1.0  # only the last frame changes: every token can see it
    assert not torch.allclose(model(x, t, later), base)
    with pytest.raises(ValueError, match="conditioning 'film'"):
        MDSGenConfig(conditioning="film")


def test_whole_spectrum_tokens_cover_all_bins_of_their_frames():
    """patch (80, 8) on a mel [1, 80, 704]: one row of 88 tokens, token i = frames 8i..8i+7 of every bin."""
    model = tiny(input_size=(80, 704), in_channels=1, patch_size=[80, 8], frame_tokens=True)
    assert model.config.grid == (1, 88) and model.config.patch == (80, 8)
    x, t, f = torch.randn(2, 1, 80, 704), torch.tensor([3, 900]), torch.randn(2, 32, 16)
    assert model(x, t, f).shape == x.shape and model(x, t, f, model.sample_mask(2, "cpu")).shape == x.shape
    # unpatchify puts each token's values back on its own frames, every bin
    tokens = x.view(2, 80, 88, 8).permute(0, 2, 1, 3).reshape(2, 88, 80 * 8)
    assert torch.equal(model.unpatchify(tokens), x)
    with pytest.raises(ValueError, match="not divisible by patch"):
        tiny(input_size=(80, 700), in_channels=1, patch_size=[80, 8])


def test_output_conv_starts_as_the_model_without_it_and_lets_a_token_reach_its_neighbours():
    torch.manual_seed(0)
    plain = tiny(input_size=(80, 64), in_channels=1, patch_size=[80, 8])
    conv = MDSGen(MDSGenConfig(**{**plain.config.to_dict(), "output_conv": 5}))
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("output_conv.") for k in missing) and missing and not unexpected
    x, t, f = torch.randn(2, 1, 80, 64), torch.tensor([10, 900]), torch.randn(2, 32, 16)
    assert torch.allclose(conv(x, t, f), plain(x, t, f), atol=1e-6)  # zero-initialised residual

    def nudge_token_zero(module, inputs, out):  # change what the network says about frames 0-7 only
        out = out.clone()
        out[:, 0] += 1.0
        return out

    for model in (plain, conv):
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    torch.nn.init.normal_(conv.output_conv.net[-1].weight, std=0.1)
    before = {name: m(x, t, f) for name, m in (("plain", plain), ("conv", conv))}
    for model in (plain, conv):
        model.final_layer.register_forward_hook(nudge_token_zero)
    changed = {name: (m(x, t, f) - before[name]).abs().amax((0, 1, 2)) > 0   # [64 frames]
               for name, m in (("plain", plain), ("conv", conv))}
    assert changed["plain"].nonzero().flatten().tolist() == list(range(8))  # a token's output stays on its frames
    # two layers of kernel 5 carry it 2 x (5 // 2) = 4 frames into the next token, no further
    assert changed["conv"][:12].all() and not changed["conv"][12:].any()
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=f"output_conv {bad}"):
            MDSGenConfig(output_conv=bad)
    # the time axis on the height: the conv runs along H
    tall = tiny(input_size=(64, 16), in_channels=4, patch_size=2, time_axis="height", output_conv=3)
    assert tall(torch.randn(1, 4, 64, 16), t[:1], f[:1]).shape == (1, 4, 64, 16)


def test_the_model_takes_the_frames_a_window_holds(tmp_path):
    from dataclasses import replace

    from mdsgen.config import Params
    from mdsgen.media.video import VideoConfig
    from mdsgen.model.checkpoint import init_checkpoint
    from mdsgen.model.network import ModelSettings

    small = ModelSettings.from_params({"size": "T", "hidden_size": 32, "depth": 4, "num_heads": 2, "decoder_depth": 2})
    eight_fps = replace(Params(), video=VideoConfig(fps=8.0, frames_per_window=64, hop_frames=56), model=small)
    model = init_checkpoint(eight_fps).model
    assert model.config.num_frames == 64
    x = torch.randn(1, model.config.in_channels, *model.config.input_size)
    assert model(x, torch.tensor([500]), torch.randn(1, 64, model.config.feature_dim)).shape == x.shape
    with pytest.raises(ValueError, match="model.num_frames 32 differs from video.frames_per_window 64"):
        init_checkpoint(replace(eight_fps, model=small.with_values(num_frames=32)))

    # a checkpoint whose model and video settings disagree is refused when loaded, not at its first request
    from mdsgen.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint(init_checkpoint(eight_fps), str(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["video"]["frames_per_window"] = 32
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the model reduces 64 frames, its video settings give 32"):
        load_checkpoint(str(tmp_path / "ckpt"))


def test_the_checkpoint_carries_its_texture_shape_and_refuses_a_wrong_one(tmp_path):
    from dataclasses import replace

    from mdsgen.config import Params
    from mdsgen.model.checkpoint import CheckpointError, init_checkpoint, load_checkpoint, save_checkpoint
    from mdsgen.model.network import ModelSettings

    small = ModelSettings.from_params({"size": "T", "hidden_size": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1})
    ckpt = init_checkpoint(replace(Params(), model=small))
    channels, rows = ckpt.model.config.in_channels, ckpt.model.config.input_size[0]
    assert torch.equal(ckpt.texture, torch.ones(channels, rows, 1))  # no latents seen yet: flat
    texture = torch.rand(channels, rows, 1) + 0.5
    save_checkpoint(replace(ckpt, texture=texture), str(tmp_path / "shaped"))
    assert torch.equal(load_checkpoint(str(tmp_path / "shaped")).texture, texture)

    config_path = tmp_path / "shaped" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "texture"}))
    assert load_checkpoint(str(tmp_path / "shaped")).texture is None  # as every checkpoint saved before the fit
    for bad in (texture[:, :-1].tolist(), texture[..., 0].tolist(), (-texture).tolist(), "loud", {"a": 1}):
        config_path.write_text(json.dumps(dict(config, texture=bad)))
        with pytest.raises(CheckpointError, match="texture"):
            load_checkpoint(str(tmp_path / "shaped"))
    del config["texture"]
    config["sampling"]["texture_shape"] = "fitted"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="asks for the fitted texture shape and config.json has none"):
        load_checkpoint(str(tmp_path / "shaped"))
