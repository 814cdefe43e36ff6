"""The embedded dataset, feature caches, VAE training, latents, and the DVC pipeline (ci profile)."""
import collections
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from media import make_video, streams
from procs import ROOT, digests, run
from mdsgen.media.audio import MEL_FIELDS, AudioConfig, load_audio, wave_to_mel
from mdsgen.data.dataset import (DatasetConfig, detect_onsets, import_vggsound, read_metadata, render_clip,
                            stamp_recording, stamp_sources)
from mdsgen.config import load_params
from mdsgen.data.features import extract_features, load_latents, load_npz, save_latents
from mdsgen.model.encoders import FrameEncoderSpec
from mdsgen.model.vae import load_vae

# --- dataset --------------------------------------------------------------------------------------
@pytest.mark.reads_pipeline
def test_ci_dataset_layout(ci_repo):
    repo, _ = ci_repo
    rows = read_metadata(repo / "data/dataset")
    cfg = DatasetConfig(classes=("dog", "cow", "cello", "firetruck"), clips_per_class=6)
    assert len(rows) == 24 and list(rows[0]) == ["clip_id", "start_seconds", "label", "split"]
    assert collections.Counter(r["label"] for r in rows) == {c: 6 for c in cfg.classes}
    splits = collections.Counter(r["split"] for r in rows)
    assert splits["train"] >= 12 and splits["val"] >= 4 and splits["test"] >= 4
    for row in rows[::5]:
        kinds = streams(repo / "data/dataset/clips" / f"{row['clip_id']}.mp4")
        assert [k[:2] for k in kinds] == [("video", "h264"), ("audio", "aac")]
        assert all(abs(seconds - 8.192) < 0.08 for _, _, seconds in kinds)
        import av

        with av.open(str(repo / "data/dataset/clips" / f"{row['clip_id']}.mp4")) as c:
            assert float(c.streams.video[0].average_rate) >= 16


@pytest.mark.reads_pipeline
def test_onsets_agree_with_the_audio(ci_repo):
    repo, _ = ci_repo
    onsets = json.loads((repo / "data/dataset/onsets.json").read_text())
    # 1 to 3 events per clip, and the count really varies (timing is not a constant cue)
    counts = collections.Counter(len(truth) for truth in onsets.values())
    assert set(counts) <= {1, 2, 3} and len(counts) >= 2, counts
    errors = []
    for clip_id, truth in onsets.items():
        detected = detect_onsets(load_audio(repo / "data/dataset/clips" / f"{clip_id}.mp4"), 16000)
        errors += [np.abs(detected - t).min() for t in truth]
    errors = np.array(errors)
    # every true onset has a detected one within 0.1 s, most within one 16 fps frame
    assert errors.max() < 0.1 and np.median(errors) < 0.02 and (errors < 1 / 16).mean() > 0.9, errors


@pytest.mark.reads_pipeline
def test_labels_map_to_their_recordings(ci_repo):
    """The sound at each clip's first onset matches its own label's recording better than the others'."""
    repo, _ = ci_repo
    sources = json.loads((repo / "data/dataset/labels.json").read_text())
    stamps = stamp_sources()
    templates = {}
    for label in sources:
        wave = stamp_recording(str(stamps[label]), 16000)[:8192]
        templates[label] = wave_to_mel(np.pad(wave, (0, 8192 - len(wave)))).mean(-1)
    onsets = json.loads((repo / "data/dataset/onsets.json").read_text())
    hits = 0
    rows = read_metadata(repo / "data/dataset")
    for row in rows:
        wave = load_audio(repo / "data/dataset/clips" / f"{row['clip_id']}.mp4")
        start = max(0, int((onsets[row["clip_id"]][0] - 0.05) * 16000))
        profile = wave_to_mel(wave[start:start + 8192]).mean(-1)
        nearest = min(templates, key=lambda label: (templates[label] - profile).abs().mean())
        hits += nearest == row["label"]
    assert hits >= 0.9 * len(rows), hits


def test_rendering_is_seeded():
    cfg = DatasetConfig(classes=("dog",), clips_per_class=1)
    stamps = stamp_sources()
    others = [str(stamps["cow"]), str(stamps["kettle"])]
    a, b = (render_clip(cfg, "dog", str(stamps["dog"]), others, 3) for _ in range(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    c = render_clip(cfg, "dog", str(stamps["dog"]), others, 4)
    assert c[2] != a[2]


@pytest.mark.slow  # two fresh processes compile numba kernels (about 40 s)
def test_onset_kernels_are_compiled_before_the_render_workers(tmp_path):
    """After the parent's compile (build_dataset does it before its pool), a worker's render writes no numba
    cache file: workers that compile at once can pair each other's cache files and crash (numba #10128)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def cache_files():
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    subprocess.run([sys.executable, "-c", "from mdsgen.data.dataset import DatasetConfig, compile_onset_detection; "
                    "compile_onset_detection(DatasetConfig().sample_rate)"], env=env, check=True)
    compiled = cache_files()
    subprocess.run([sys.executable, "-c", "from mdsgen.data.dataset import DatasetConfig, render_clip, stamp_sources; "
                    "s = stamp_sources(); render_clip(DatasetConfig(), 'dog', str(s['dog']), [str(s['cow'])], 3)"],
                   env=env, check=True)
    assert compiled and cache_files() == compiled


def test_missing_debian_package_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install tuxpaint-stamps-default"):
        stamp_sources(tmp_path / "no-stamps")


@pytest.mark.reads_pipeline
def test_import_reports_clips_that_do_not_decode(tmp_path, ci_repo, bigbuckbunny):
    repo, _ = ci_repo
    videos = tmp_path / "videos"
    videos.mkdir()
    first = read_metadata(repo / "data/dataset")[0]["clip_id"]
    shutil.copy(repo / "data/dataset/clips" / f"{first}.mp4", videos / "goodclip_000030.mp4")
    (videos / "broken_000010.mp4").write_bytes(bigbuckbunny.read_bytes()[:100_000])
    (tmp_path / "vgg.csv").write_text("goodclip,30,dog barking,train\nbroken,10,cat,test\nmissing,0,cow,train\n")
    rows, failures = import_vggsound(tmp_path / "vgg.csv", videos, tmp_path / "imported")
    assert [r["clip_id"] for r in rows] == ["goodclip_000030"]
    assert (tmp_path / "imported/clips/goodclip_000030.mp4").is_file()
    reasons = {f["clip_id"]: f["reason"] for f in failures}
    assert set(reasons) == {"broken_000010", "missing_000000"}
    assert "cannot be opened" in reasons["broken_000010"] and "no video file" in reasons["missing_000000"]
    report = json.loads((tmp_path / "imported/import_report.json").read_text())
    assert report["imported"] == 1 and len(report["failed"]) == 2
    assert read_metadata(tmp_path / "imported")[0]["label"] == "dog barking"


def test_ids_that_are_not_plain_file_names_are_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds/metadata.csv").write_text("clip_id,start_seconds,label,split\nok,0,dog,train\n../../etc/x,0,dog,test\n")
    with pytest.raises(ValueError, match=r"line 3: clip_id '../../etc/x' is not a plain file name"):
        read_metadata(tmp_path / "ds")
    (tmp_path / "videos").mkdir()
    (tmp_path / "vgg.csv").write_text("../escape,30,dog,train\n")
    rows, failures = import_vggsound(tmp_path / "vgg.csv", tmp_path / "videos", tmp_path / "imported")
    assert rows == [] and "not a plain file name" in failures[0]["reason"]


# --- features and latents ---------------------------------------------------------------------------
@pytest.mark.reads_pipeline
def test_feature_files(ci_repo):
    repo, _ = ci_repo
    rows = read_metadata(repo / "data/dataset")
    index = json.loads((repo / "data/features/index.json").read_text())
    assert set(index) == {r["clip_id"] for r in rows}
    arrays = load_npz(repo / "data/features" / f"{rows[0]['clip_id']}.npz")
    assert arrays["features"].shape == (32, 1280) and arrays["features"].dtype == np.float32
    assert np.allclose(np.linalg.norm(arrays["features"], axis=1), 1, atol=1e-4)
    audio = load_params(repo / "params.yaml").audio
    assert arrays["mel"].shape == (audio.n_mels, audio.mel_frames) and arrays["mel"].dtype == np.float32
    assert 0 <= arrays["mel"].min() and arrays["mel"].max() <= 1


@pytest.mark.reads_pipeline
def test_features_are_deterministic_and_incremental(tmp_path, ci_repo):
    repo, _ = ci_repo
    mini = tmp_path / "mini"
    (mini / "clips").mkdir(parents=True)
    rows = read_metadata(repo / "data/dataset")[:3]
    for row in rows:
        shutil.copy(repo / "data/dataset/clips" / f"{row['clip_id']}.mp4", mini / "clips")
    from mdsgen.data.dataset import write_metadata

    write_metadata(mini, rows)
    spec = FrameEncoderSpec("efficientnet-lite0")
    first = extract_features(mini, tmp_path / "f", spec, workers=1)
    assert first == {"computed": 3, "reused": 0, "removed": 0, "failed": []}
    for row in rows:  # the same numbers as the pipeline's own run
        ours, theirs = (load_npz(d / f"{row['clip_id']}.npz") for d in (tmp_path / "f", repo / "data/features"))
        assert np.allclose(ours["features"], theirs["features"], atol=1e-5)
        assert np.array_equal(ours["mel"], theirs["mel"])
    assert extract_features(mini, tmp_path / "f", spec, workers=1)["computed"] == 0
    vocoder_only = dataclasses.replace(AudioConfig(), griffin_lim_iters=8, vocoder_precision="bf16")
    assert extract_features(mini, tmp_path / "f", spec, vocoder_only, workers=1)["computed"] == 0
    make_video(mini / "clips" / f"{rows[0]['clip_id']}.mp4", seconds=8.0, fps=16)  # a clip changes
    write_metadata(mini, rows[:2])  # another leaves the dataset
    again = extract_features(mini, tmp_path / "f", spec, workers=1)
    assert again == {"computed": 1, "reused": 1, "removed": 1, "failed": []}
    assert not (tmp_path / "f" / f"{rows[2]['clip_id']}.npz").exists()


@pytest.mark.reads_pipeline
def test_vae_stage_learned_and_latents_match(ci_repo):
    repo, _ = ci_repo
    metrics = json.loads((repo / "reports/vae-metrics.json").read_text())
    assert metrics["train_l1_last"] < 0.7 * metrics["train_l1_first"]  # a few steps reduce the loss
    assert metrics["val_mel_l1"] < metrics["val_mel_l1_of_mean_mel"]  # and it beats the mean mel on val
    assert (repo / "reports/vae/mels.png").is_file() and len(list((repo / "reports/vae").glob("*.wav"))) == 6
    train = load_latents(repo / "data/latents", "train")
    rows = [r for r in read_metadata(repo / "data/dataset") if r["split"] == "train"]
    assert train["clip_ids"] == [r["clip_id"] for r in rows]
    p = load_params(repo / "params.yaml")
    vae = load_vae(str(repo / "models/vae"))
    latent = (vae.latent_channels, *vae.latent_size(p.audio.n_mels, p.audio.mel_frames))
    assert train["latents"].shape == (len(rows), *latent) and train["features"].shape == (len(rows), 32, 1280)
    assert 0.7 < train["latents"].std().item() < 1.3  # the saved scale gives unit-variance latents


def test_latents_files_are_the_same_bytes_on_every_write(tmp_path):
    # safetensors orders several metadata entries at random per write: a re-run of `encode` used to change
    # the file's DVC hash half the time, and with it every stage downstream. 16 writes: the old format
    # would give one byte layout in all 16 with odds 2^-15.
    latents, features = torch.arange(24.0).view(2, 1, 3, 4), torch.ones(2, 32, 5)
    digests = set()
    for i in range(16):
        save_latents(tmp_path / "train.safetensors", latents, features, ["a", "b"], ["dog", "cow"])
        digests.add(hashlib.sha256((tmp_path / "train.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = load_latents(tmp_path, "train")
    assert loaded["clip_ids"] == ["a", "b"] and loaded["labels"] == ["dog", "cow"]
    assert torch.equal(loaded["latents"], latents) and torch.equal(loaded["features"], features)
    assert [p.name for p in tmp_path.iterdir()] == ["train.safetensors"]  # no partial file left behind
    # A file in the old layout is refused with what to do, not a KeyError.
    save_file({"latents": latents, "features": features}, str(tmp_path / "val.safetensors"),
              metadata={"clip_ids": "[]", "labels": "[]"})
    with pytest.raises(ValueError, match="mdsgen encode"):
        load_latents(tmp_path, "val")


# --- DVC --------------------------------------------------------------------------------------------
@pytest.mark.reads_pipeline  # on its own copy
def test_changing_a_parameter_reruns_only_what_depends_on_it(own_ci_repo, pipeline_env):
    repo, first_run = own_ci_repo
    for stage in ("dataset", "features", "train_vae", "encode"):
        assert f"Running stage '{stage}'" in first_run
    status = run(["dvc", "status"], repo, pipeline_env).stdout
    assert "up to date" in status
    params = (repo / "params.yaml").read_text().replace("kl_weight: 1.0e-06", "kl_weight: 2.0e-06")
    (repo / "params.yaml").write_text(params)
    changed = run(["dvc", "status"], repo, pipeline_env).stdout
    assert "train_vae" in changed and "dataset:" not in changed and "features:" not in changed
    run(["git", "checkout", "params.yaml"], repo)
    # A vocoder setting reaches the VAE stage's report and the checkpoint (which carries it to evaluation and
    # serving), not the features (they hold the mel only).
    params = (repo / "params.yaml").read_text()
    assert "griffin_lim_iters: 32" in params
    (repo / "params.yaml").write_text(params.replace("griffin_lim_iters: 32", "griffin_lim_iters: 16"))
    changed = run(["dvc", "status"], repo, pipeline_env).stdout
    assert "train_vae" in changed and "train:" in changed and "features:" not in changed
    run(["git", "checkout", "params.yaml"], repo)
    assert "up to date" in run(["dvc", "status"], repo, pipeline_env).stdout


def test_the_features_stage_reads_the_mel_settings_the_code_fingerprints():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["features"]
    audio = [p.removeprefix("audio.") for p in stage["params"] if p.startswith("audio")]
    assert tuple(audio) == MEL_FIELDS
    # every other audio setting belongs to the vocoder: a new field that shapes the mel must join MEL_FIELDS
    others = {f.name for f in dataclasses.fields(AudioConfig)} - set(MEL_FIELDS)
    assert others == {"griffin_lim_iters", "griffin_lim_momentum", "vocoder", "vocoder_precision", "lowpass_hz"}


@pytest.mark.reads_pipeline  # on its own copy
def test_push_to_s3_and_pull_into_a_clone(own_ci_repo, s3_server, tmp_path, pipeline_env):
    repo, _ = own_ci_repo
    env = dict(pipeline_env, **{k: os.environ[k] for k in
                                ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    run(["dvc", "remote", "add", "-f", "-d", "s3", f"{s3_server}/dvc"], repo, env)
    run(["dvc", "remote", "modify", "s3", "endpointurl", env["AWS_ENDPOINT_URL"]], repo, env)
    run(["dvc", "push"], repo, env)
    run(["git", "commit", "-qam", "s3 remote"], repo, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data").exists()
    run(["dvc", "pull"], clone, env)
    for out in ("data/dataset", "data/features", "models/vae", "data/latents"):
        assert digests(clone / out) == digests(repo / out), out
    assert "up to date" in run(["dvc", "status"], clone, env).stdout


@pytest.mark.reads_pipeline
def test_a_pretrained_vae_replaces_training(ci_repo, tmp_path):
    """With vae.path set (a user's Stable Diffusion VAE, say) the stage adopts and evaluates it."""
    from mdsgen.model.vae import MelVAE, VAESettings, load_vae
    from mdsgen.training.vae_train import VAETrainConfig, train_vae

    repo, _ = ci_repo
    torch.manual_seed(1)
    MelVAE.from_config("small").save(str(tmp_path / "pretrained"))
    metrics = train_vae(repo / "data/dataset", repo / "data/features", tmp_path / "out", tmp_path / "report",
                        VAETrainConfig(steps=500), vae_params=VAESettings(path=str(tmp_path / "pretrained")))
    assert metrics["pretrained"] == str(tmp_path / "pretrained") and metrics["steps"] == 0
    adopted, original = load_vae(str(tmp_path / "out")), load_vae(str(tmp_path / "pretrained"))
    assert all(torch.equal(a, b) for a, b in zip(adopted.state_dict().values(), original.state_dict().values()))
    assert (tmp_path / "report/mels.png").is_file()
