"""Evaluation metrics on known inputs, the registry's gate rule, and the alignment classifier's data."""
import numpy as np
import pytest
import torch

from mdsgen.evaluation.align import AlignConfig, AlignmentClassifier, negatives
from mdsgen.evaluation.evaluate import (Checks, markdown_table, nearest_training_clips, shuffled_partners,
                                       token_boundary_ratio)
from mdsgen.evaluation.metrics import (SoundNet, class_agreement, frechet_distance, inception_score, onset_sync,
                            paired_kl)
from mdsgen.evaluation.registry import gate_decision

SR = 16000


def clicks(times, seconds=4.0, seed=0):
    """Short noise bursts at `times` on silence (sharp onsets)."""
    rng = np.random.default_rng(seed)
    wave = np.zeros(int(seconds * SR), dtype=np.float32)
    for t in times:
        start = int(t * SR)
        burst = rng.standard_normal(800).astype(np.float32) * np.exp(-np.arange(800) / 200)
        wave[start:start + 800] += 0.5 * burst
    return wave


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 8))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    near, far = frechet_distance(a, a + 0.5), frechet_distance(a, a + 2.0)
    assert near == pytest.approx(8 * 0.25, rel=1e-3) and far == pytest.approx(8 * 4.0, rel=1e-3)


def test_class_distribution_metrics():
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert paired_kl(p, p) == pytest.approx(0, abs=1e-9) and paired_kl(p, p[::-1]) > 0.5
    assert class_agreement(p, p) == 1.0 and class_agreement(p, p[::-1]) == 0.0
    assert inception_score(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(2.0, rel=1e-6)
    assert inception_score(np.array([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(1.0)


def test_onset_sync_rewards_timing_and_punishes_shifts_and_noise():
    truth = [[0.5, 2.0], [1.2, 3.1]]
    exact = onset_sync([clicks(t) for t in truth], SR, truth)
    assert exact["onset_recall"] == 1.0 and exact["onset_precision"] == 1.0
    assert exact["onset_median_error_ms"] < 20
    late = onset_sync([clicks(np.array(t) + 0.3) for t in truth], SR, truth)
    assert late["onset_recall"] == 0.0 and late["onset_median_error_ms"] > 250
    silent = onset_sync([np.zeros(4 * SR, dtype=np.float32)] * 2, SR, truth)
    assert silent["onset_recall"] == 0.0 and silent["onset_median_error_ms"] == pytest.approx(4000)
    noisy = onset_sync([clicks(np.arange(0.1, 3.9, 0.1)) for _ in truth], SR, truth)
    assert noisy["onset_recall"] == 1.0 and noisy["onset_precision"] < 0.2  # hits everything by firing everywhere


def test_sound_net_tells_real_sounds_apart(badger):
    from mdsgen.media.audio import load_audio

    wave = load_audio(badger[1], SR)
    net = SoundNet()
    out = net([wave, wave, clicks([0.5, 1.0, 1.5, 2.0])], SR)
    assert out["probs"].shape == (3, 69) and np.allclose(out["probs"].sum(1), 1, atol=1e-5)
    assert np.allclose(out["probs"][0], out["probs"][1])
    assert out["probs"][0].argmax() != out["probs"][2].argmax()
    assert out["embeddings"].shape[1] == 512
    # a faint tone above 8 kHz: the full-band network hears it, one that hears a 16 kHz recording's band does not
    rate = 22050
    wave = load_audio(badger[1], rate)
    hiss = wave + 0.003 * np.sin(2 * np.pi * 9000 * np.arange(len(wave)) / rate).astype(np.float32)
    full, band = net([wave, hiss], rate), SoundNet(band_rate=SR)([wave, hiss], rate)
    shift = {name: np.abs(np.subtract(*np.split(out["embeddings"], 2))).max() for name, out in (("full", full), ("band", band))}
    assert shift["band"] < 0.05 * shift["full"], shift


def test_metrics_scored_in_another_band_are_not_compared():
    from mdsgen.evaluation.registry import SCORING_TAG, scoring, scoring_mismatch

    band, full = scoring({"aisfx_band_rate": 16000}), scoring({"aisfx_band_rate": None})
    assert band == "aisfx at 16000 Hz" and full == "aisfx full band"
    assert scoring_mismatch({SCORING_TAG: band}, {SCORING_TAG: band}) is None
    assert scoring_mismatch({SCORING_TAG: full}, {}) is None  # a version from before the tag was scored full band
    reason = scoring_mismatch({SCORING_TAG: band}, {})
    assert "aisfx at 16000 Hz" in reason and "aisfx full band" in reason and "--force" in reason


def test_gate_rule():
    gate = {"frechet_distance": "lower", "onset_f1": "higher"}
    champ = {"frechet_distance": 100.0, "onset_f1": 0.5}
    assert gate_decision({"frechet_distance": 90.0, "onset_f1": 0.6}, champ, gate)[0]
    assert gate_decision({"frechet_distance": 90.0, "onset_f1": 0.5}, champ, gate)[0]
    ok, reason = gate_decision({"frechet_distance": 90.0, "onset_f1": 0.4}, champ, gate)
    assert not ok and "worse on onset_f1" in reason
    ok, reason = gate_decision(dict(champ), champ, gate)
    assert not ok and "no gate metric improves" in reason
    assert gate_decision({"frechet_distance": 500.0, "onset_f1": 0.0}, None, gate) == (True, "no champion yet")
    with pytest.raises(ValueError, match="onset_f1"):
        gate_decision({"frechet_distance": 90.0}, champ, gate)


def test_references_pick_what_they_claim():
    labels = ["dog", "dog", "cow", "cello"]
    partners = shuffled_partners(labels, seed=0)
    assert all(labels[j] != label for j, label in zip(partners, labels))
    train = torch.randn(10, 32, 16)
    test = train[[3, 7]] + 0.01 * torch.randn(2, 32, 16)
    assert nearest_training_clips(test, train).tolist() == [3, 7]


def test_alignment_negatives_and_classifier_shapes():
    g = torch.Generator().manual_seed(0)
    mels = torch.rand(6, 128, 512)
    neg = negatives(torch.randn(6, 32, 20), mels, 31, 125, g)
    for i in range(6):
        assert not torch.equal(neg[i], mels[i])
        if i % 2:  # shifted copies keep the clip's content
            assert torch.allclose(neg[i].sum(), mels[i].sum(), rtol=1e-4)
    torch.manual_seed(0)
    model = AlignmentClassifier(AlignConfig(feature_dim=20))
    features = torch.randn(6, 32, 20)
    logits = model(features, mels)
    assert logits.shape == (6,)
    # the same video at twice the frame rate (every frame shown twice) is judged on the same time grid
    assert torch.allclose(model(features.repeat_interleave(2, dim=1), mels), logits, atol=1e-6)
    reversed_video = model(features.flip(1).repeat_interleave(2, dim=1), mels)  # the order of frames counts
    assert (reversed_video - logits).abs().max() > 1e-4


def test_onset_auc_rewards_sound_at_the_true_onsets_and_not_noise():
    from mdsgen.evaluation.metrics import onset_auc

    rate, truth = 16000, np.array([1.0, 3.5, 6.0])
    rng = np.random.default_rng(0)
    timed = np.zeros(rate * 8, dtype=np.float32)
    for t in truth:  # a decaying burst at each true onset
        start = int(t * rate)
        timed[start:start + 4000] = rng.standard_normal(4000) * np.exp(-np.arange(4000) / 800)
    assert onset_auc(timed, rate, truth) > 0.8
    noise = [onset_auc(rng.standard_normal(rate * 8).astype(np.float32) * 0.1, rate, truth) for _ in range(20)]
    assert abs(np.mean(noise) - 0.5) < 0.1  # chance, whatever the loudness
    assert onset_auc(np.roll(timed, rate // 2), rate, truth) < 0.5  # half a second late: below chance
    assert onset_auc(np.zeros(rate * 8, dtype=np.float32), rate, truth) == 0.5  # silence: all ties


def test_the_object_probe_tells_objects_apart_and_noise_from_both():
    from mdsgen.evaluation.metrics import ObjectProbe
    from mdsgen.media.audio import AudioConfig

    audio = AudioConfig()
    rng = np.random.default_rng(0)
    t = np.arange(audio.clip_samples) / audio.sample_rate

    def clip(pitch, seed):  # a harmonic tone in one or two events at random places, over faint noise
        r = np.random.default_rng(seed)
        wave = 0.01 * r.standard_normal(len(t))
        for start in r.uniform(0, 6, r.integers(1, 3)):
            on = (t >= start) & (t < start + 1.5)
            wave[on] += 0.3 * sum(np.sin(2 * np.pi * pitch * k * t[on]) / k for k in (1, 2, 3))
        return wave.astype(np.float32)

    pitches = {"low": 220.0, "mid": 660.0, "high": 1760.0}
    train = [(clip(p, 10 * i + j), label) for i, (label, p) in enumerate(pitches.items()) for j in range(6)]
    probe = ObjectProbe([w for w, _ in train], [label for _, label in train], audio)
    tests = [(clip(p, 100 + 10 * i + j), label) for i, (label, p) in enumerate(pitches.items()) for j in range(3)]
    waves, labels = [w for w, _ in tests], [label for _, label in tests]
    assert probe.match(waves, labels) == 1.0
    assert probe.match(waves[3:] + waves[:3], labels) == 0.0           # another object's sound
    noise = [rng.standard_normal(len(t)).astype(np.float32) * 0.1 for _ in labels]
    assert probe.match(noise, labels) <= 1 / 3 + 1e-9                   # one label for all: chance at best
    with pytest.raises(ValueError, match="at least two labels"):
        ObjectProbe(waves[:3], ["low"] * 3, audio)


def diagnostics(gains, std_ratio=1.0, own_vs_other=0.5):
    return {"latent_std_ratio": std_ratio, "conditioning_gain_peak": max(gains),
            **{f"conditioning_gain_t{t}": g for t, g in zip((100, 300, 500, 700, 900), gains)},
            "own_vs_other_distance": own_vs_other}


def test_the_gate_checks_the_peak_conditioning_gain_and_the_shuffled_video_control():
    checks = Checks()
    # a model whose video helps only at high noise (its mean over t is below 1.02) listens: it passes
    assert checks.diagnostic_failures(diagnostics([0.99, 0.98, 0.98, 1.05, 1.20])) == []
    # a model that ignores the video: every gain at 1.00 (the failure this check exists for)
    deaf = checks.diagnostic_failures(diagnostics([1.0, 1.001, 0.999, 1.004, 1.01]))
    assert len(deaf) == 1 and deaf[0].startswith("conditioning_gain_peak 1.010 < 1.02")
    assert len(checks.diagnostic_failures(diagnostics([1.1] * 5, std_ratio=3.3, own_vs_other=1.0))) == 2
    assert "not finite" in checks.diagnostic_failures(diagnostics([1.1] * 5, std_ratio=float("nan")))[0]

    model, shuffled = {"class_agreement": 0.20, "onset_auc": 0.70}, {"class_agreement": 0.02, "onset_auc": 0.53}
    assert checks.control_failures(model, shuffled) == []
    near = checks.control_failures({"class_agreement": 0.21, "onset_auc": 0.70}, {"class_agreement": 0.20, "onset_auc": 0.53})
    assert len(near) == 1 and near[0].startswith("class_agreement 0.210 is not 0.05 above")
    # no onsets known on this test set: the asked-for sync check cannot pass silently
    missing = checks.control_failures({"class_agreement": 0.2}, {"class_agreement": 0.0})
    assert missing == ["onset_auc not measured, so not checked against the shuffled-video control"]
    assert len(checks.control_failures({**model, "onset_auc": float("nan")}, shuffled)) == 1


def test_the_verdict_joins_both_kinds_of_check_and_the_table_says_why():
    checks = Checks()
    model = {"class_agreement": 0.21, "onset_auc": 0.70, "frechet_distance": 120.0, "params_inference": 9e6,
             "seconds_per_clip": 1.6, "denoise_seconds_per_clip": 0.4, "device": "cpu", "peak_memory_mb": 900.0,
             "latent_abs_max": 4.0, "real_latent_abs_max": 3.9, "token_boundary_ratio": 3.77,
             "real_token_boundary_ratio": 1.0, "conditioning_gain": 1.0, **diagnostics([1.0] * 5)}
    shuffled = {"class_agreement": 0.20, "onset_auc": 0.50, "frechet_distance": 125.0}
    failures = checks.failures(diagnostics([1.0] * 5), model, shuffled)
    assert [f.split()[0] for f in failures] == ["conditioning_gain_peak", "class_agreement"]
    result = {"systems": {"model": {**model, "diagnostics_pass": 0.0}, "model_shuffled_video": shuffled},
              "clips": 60, "clips_with_onsets": 60, "seed": 0, "diagnostics_failures": "; ".join(failures),
              "sampling": {"steps": 25, "cfg_scale": 2.0, "solver": "ddim"}}
    table = markdown_table(result)
    assert "Diagnostics (FAIL (conditioning_gain_peak 1.000 < 1.02; class_agreement 0.210 is not 0.05" in table
    assert "token boundaries over those inside tokens 3.77 (real 1.00)" in table
    # onset_auc dropped (a dataset without known onsets): only class agreement is compared
    assert Checks.from_params({"min_over_shuffled": {"class_agreement": 0.05, "onset_auc": None}}).control_failures(
        {"class_agreement": 0.3}, {"class_agreement": 0.0}) == []


def test_checks_refuse_an_unknown_or_malformed_bound():
    assert Checks.from_params(None) is None
    assert Checks.from_params({"min_conditioning_gain": 1.1}).latent_std_ratio == (0.8, 1.25)
    with pytest.raises(ValueError, match=r"unknown keys \['min_gain'\]"):
        Checks.from_params({"min_gain": 1.1})
    with pytest.raises(ValueError, match="low < high"):
        Checks.from_params({"latent_std_ratio": [1.25, 0.8]})
    with pytest.raises(ValueError, match="low < high"):
        Checks.from_params({"latent_std_ratio": None})
    with pytest.raises(ValueError, match=r"\['frechet_distance'\] cannot be compared that way"):
        Checks.from_params({"min_over_shuffled": {"frechet_distance": 5.0}})  # lower is better: not "above"
    assert Checks(latent_std_ratio=[0.7, 1.3]).latent_std_ratio == (0.7, 1.3)


def test_token_boundary_ratio_marks_blocks_on_the_token_grid_and_nothing_else():
    """Loudness bumps at random frames leave no mark on the 8-frame grid (1.0; 0.98-1.06 over 8 seeds);
    the same clips with each token set to its mean, plus fresh noise, jump at every boundary (9.0-10.8)."""
    g = torch.Generator().manual_seed(0)
    frames, t = 704, torch.arange(704).float()
    envelope = torch.zeros(8, frames)
    for clip in range(8):
        for start in torch.randint(0, frames - 60, (3,), generator=g).tolist():
            envelope[clip] += torch.exp(-0.5 * ((t - start - 30) / 10) ** 2)
    smooth = (torch.rand(80, 1, generator=g) * envelope[:, None] + 0.05 * torch.randn(8, 80, frames, generator=g))
    smooth = smooth.unsqueeze(1)                                            # [clips, 1, mel bins, frames]
    blocks = smooth.view(8, 1, 80, 88, 8).mean(-1, keepdim=True).expand(-1, -1, -1, -1, 8).reshape(smooth.shape)
    blocky = blocks + 0.05 * torch.randn(smooth.shape, generator=g)
    assert 0.9 < token_boundary_ratio(smooth, 8, -1) < 1.15
    assert token_boundary_ratio(blocky, 8, -1) > 5.0
    assert token_boundary_ratio(3.0 * smooth - 1.0, 8, -1) == pytest.approx(token_boundary_ratio(smooth, 8, -1), rel=1e-4)
    # time on the height axis (the AudioLDM layout) reads the same
    assert token_boundary_ratio(blocky.transpose(-1, -2), 8, -2) == pytest.approx(token_boundary_ratio(blocky, 8, -1))
