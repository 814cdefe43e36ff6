"""`mdsgen train`: resuming after SIGKILL, DistributedDataParallel on two CPU processes, MLflow logging."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mdsgen.data.features import save_latents
from mdsgen.model.vae import MelVAE
from mdsgen.training.train import roll_in_time
from procs import BIN, ROOT, run

SMALL_MODEL = {"size": "T", "hidden_size": 64, "depth": 4, "num_heads": 2, "decoder_depth": 2}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic latents (structured, so the loss can fall), a small VAE and a params file."""
    root = tmp_path_factory.mktemp("train")
    g = torch.Generator().manual_seed(0)
    latents_dir = root / "latents"
    latents_dir.mkdir()
    for split, n in (("train", 24), ("val", 4)):
        features = torch.randn(n, 32, 1280, generator=g)
        latents = features[:, :, :64].mean(1).view(n, 1, 1, 64).expand(n, 4, 16, 64).contiguous()
        save_latents(latents_dir / f"{split}.safetensors", latents + 0.1 * torch.randn(latents.shape, generator=g),
                     features, [f"{split}{i}" for i in range(n)], ["x"] * n)
    MelVAE.from_config("small").save(str(root / "vae"))
    return root


def write_params(root, name, **train):
    settings = {"model": SMALL_MODEL, "sampling": {"steps": 2},
                "train": {"steps": 6, "batch_size": 8, "lr": 2e-3, "ema_decay": 0.99, "checkpoint_every": 2,
                          "log_every": 1, "sample_every": 0, "sample_clips": 2, **train}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def train_cmd(root, name, params):
    return ["train", str(root / "latents"), "--vae", str(root / "vae"), "--out", str(root / name / "model"),
            "--state", str(root / name / "state"), "--metrics", str(root / name / "metrics.json"),
            "--device", "cpu", "--params", str(params)]


def env_for(mlflow_server):
    return dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="1")


def weights(root, name):
    return load_file(str(root / name / "model" / "model.safetensors"))


def loss_history(mlflow_server, run_id):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}  # a resumed run re-logs steps after its last state: last wins


def kill_once_saved(process: subprocess.Popen, state, step: int) -> int:
    """SIGKILL a training process as soon as its state holds step `step` or later; the step it had saved."""
    latest = state / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if latest.is_file() and latest.read_text() >= f"step-{step:08d}":
            break
        time.sleep(0.02)
    assert process.poll() is None, "training ended before it could be killed: make the run longer"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return int(latest.read_text().split("-")[1])


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(workdir, mlflow_server):
    env = env_for(mlflow_server)
    params = write_params(workdir, "resume", steps=30, checkpoint_every=4)
    run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "straight", params)], workdir, env)

    victim = subprocess.Popen([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "killed", params)], cwd=workdir,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_once_saved(victim, workdir / "killed" / "state", 8)
    assert 8 <= killed_at < 30 and not (workdir / "killed" / "model").exists()

    proc = run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "killed", params)], workdir, env)
    assert f"resuming from step {killed_at}" in proc.stdout
    metrics = json.loads((workdir / "killed" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at and metrics["steps"] == 30
    straight, resumed = weights(workdir, "straight"), weights(workdir, "killed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # the resumed invocation logged into the same MLflow run, and its losses continue the straight run's
    first = json.loads((workdir / "straight" / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] != first["mlflow_run_id"]
    assert loss_history(mlflow_server, metrics["mlflow_run_id"]) == loss_history(mlflow_server, first["mlflow_run_id"])


def test_a_finished_state_is_not_retrained_and_a_new_recipe_starts_over(workdir, mlflow_server):
    env = env_for(mlflow_server)
    params = write_params(workdir, "again", steps=4)
    run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "again", params)], workdir, env)
    before = weights(workdir, "again")
    proc = run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "again", params)], workdir, env)
    assert "resuming from step 4" in proc.stdout
    assert all(torch.equal(before[k], v) for k, v in weights(workdir, "again").items())
    changed = write_params(workdir, "again", steps=4, lr=1e-3)
    proc = run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "again", changed)], workdir, env)
    assert "starting over" in proc.stdout
    aside = workdir / "again" / "state" / "replaced"  # the old run's state is moved aside, not deleted
    assert (aside / "latest").read_text().strip() == "step-00000004" and (aside / "step-00000004").is_dir()
    assert (workdir / "again" / "state" / "latest").read_text().strip() == "step-00000004"


def test_an_unreadable_latest_state_falls_back_to_the_one_before(tmp_path, capsys):
    from mdsgen.model.network import MDSGen, config_for
    from mdsgen.training.train import Trainer, TrainConfig, load_train_state, save_train_state

    small = {k: v for k, v in SMALL_MODEL.items() if k != "size"}
    trainer = Trainer(MDSGen(config_for("T", **small)), TrainConfig(steps=2, ema_decay=0))
    for step in (1, 2):
        trainer.step_count = step
        save_train_state(tmp_path, trainer, {"tag": step})
    (tmp_path / ".step-00000009.partial").mkdir()  # a write cut by a kill
    (tmp_path / "step-00000002" / "state.safetensors").write_bytes(b"torn")
    assert load_train_state(tmp_path)[1]["tag"] == 1
    assert "step-00000002: unreadable training state" in capsys.readouterr().err
    (tmp_path / "latest").unlink()  # no pointer at all: the newest complete state
    assert load_train_state(tmp_path)[1]["tag"] == 1
    trainer.step_count = 3
    save_train_state(tmp_path, trainer, {"tag": 3})
    assert not list(tmp_path.glob(".*.partial")) and load_train_state(tmp_path)[1]["tag"] == 3


@pytest.mark.parametrize("time_dim", [-1, -2])
def test_time_roll_keeps_each_latent_step_on_its_own_frame(time_dim):
    frames = torch.arange(32.0)[None, :, None].expand(3, 32, 5)  # feature = its frame number
    steps = torch.arange(64.0) // 2  # two latent steps per frame, valued by their frame number
    latents = (steps.view(1, 1, 1, 64).expand(3, 4, 16, 64) if time_dim == -1
               else steps.view(1, 1, 64, 1).expand(3, 4, 64, 16))
    rolled, feats = roll_in_time(latents, frames, torch.tensor([0, 5, 31]), time_dim)
    assert torch.equal(rolled[0], latents[0]) and not torch.equal(rolled[1], latents[1])
    for clip in range(3):
        per_step = rolled[clip, 0, 0] if time_dim == -1 else rolled[clip, 0, :, 0]
        assert torch.equal(per_step, feats[clip, :, 0].repeat_interleave(2))
    with pytest.raises(ValueError, match="whole number"):
        roll_in_time(latents[..., :63] if time_dim == -1 else latents[:, :, :63], frames, torch.zeros(3), time_dim)


def test_two_ddp_processes_follow_the_single_process_trajectory(workdir, mlflow_server):
    """Same global batch (8) as one process with batch 8, or two with 4 each: the per-step losses (all-reduced
    means) and the final weights agree up to float summation order."""
    env = env_for(mlflow_server)
    params = write_params(workdir, "ddp", steps=6, batch_size=8, time_roll=True)  # both draw the same rolls
    run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "single", params)], workdir, env)
    run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "mdsgen",
         *train_cmd(workdir, "two", params)], workdir, env, timeout=300)  # about 30 s; a hang fails sooner
    single = json.loads((workdir / "single" / "metrics.json").read_text())
    two = json.loads((workdir / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1
    a = loss_history(mlflow_server, single["mlflow_run_id"])
    b = loss_history(mlflow_server, two["mlflow_run_id"])
    assert list(a) == list(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    assert a[6] < a[1]  # and it is learning, not standing still
    wa, wb = weights(workdir, "single"), weights(workdir, "two")
    # Adan normalises each update, so a weight whose gradient is near zero turns float-order noise into up
    # to a step or two (lr 2e-3), and how many weights that touches depends on the CPU's kernels: apart by
    # more than a twentieth of a step, 0.03% of the weights on an AVX-512 machine, 7.2% on an AVX2 one
    # (largest difference 4.5e-3), while the losses agreed to 1e-4. So the test bounds the share apart by
    # more than half a step: 0.53% on the AVX2 machine, against 51.5% for the same run on other batches
    # (no time roll; 91% of them apart by a twentieth of a step)
    apart = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa]) > 1e-3
    assert apart.float().mean().item() < 0.05, f"{apart.sum().item()} of {apart.numel()} weights differ by > 1e-3"


def test_the_run_logs_params_environment_and_samples(workdir, mlflow_server):
    import mlflow

    metrics = json.loads((workdir / "straight" / "metrics.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    logged = client.get_run(metrics["mlflow_run_id"])
    assert logged.data.params["train.lr"] == "0.002" and logged.data.params["model.depth"] == "4"
    assert {"loss", "loss_full", "loss_masked", "steps_per_second"} <= set(logged.data.metrics)
    names = {f.path for f in client.list_artifacts(logged.info.run_id)}
    assert {"environment.json", "samples"} <= names
    samples = [f.path for f in client.list_artifacts(logged.info.run_id, "samples")]
    assert any(p.endswith(".png") for p in samples) and sum(p.endswith(".wav") for p in samples) == 2
    env = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=logged.info.run_id, artifact_path="environment.json", tracking_uri=mlflow_server)).read())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"] == torch.__version__


@pytest.mark.slow  # one training process per bad setting
def test_bad_training_settings_are_named(workdir, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": {"steps": 4, "batch_size": 8, "precision": "fp8"}}))
    proc = run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "bad", params)], workdir, check=False)
    assert proc.returncode == 2 and "train.precision 'fp8'" in proc.stderr
    params.write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": {"steps": 4, "batch_size": 8}}))
    proc = run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "bad", params)[:1], str(tmp_path / "nowhere"),
                *train_cmd(workdir, "bad", params)[2:]], workdir, check=False)
    assert proc.returncode == 2 and "no latents for the train split" in proc.stderr
    eight_fps = {"fps": 8.0, "frames_per_window": 64, "hop_frames": 56}  # latents made at 32 frames per clip
    params.write_text(yaml.safe_dump({"model": SMALL_MODEL, "video": eight_fps, "train": {"steps": 4, "batch_size": 8}}))
    proc = run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "bad", params)], workdir, check=False)
    assert proc.returncode == 2 and "32 frames per clip, video.frames_per_window is 64" in proc.stderr
    params.write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": {"steps": 4, "batch_size": 8}}))
    proc = run([sys.executable, "-m", "mdsgen", *train_cmd(workdir, "bad", params), "--vocoder", str(tmp_path / "nowhere")],
               workdir, check=False)
    assert proc.returncode == 2 and "nowhere: no train-vocoder folder there" in proc.stderr


def test_the_kubeflow_train_task_resumes_from_its_volume_after_a_kill(workdir, mlflow_server):
    """The pipeline's train task keeps its state in `train_state` (a folder on the PVC): a pod killed mid-run
    and started again resumes from the last saved step instead of starting over."""
    params = write_params(workdir, "kfp", steps=30, checkpoint_every=4)
    state, model = workdir / "kfp" / "state", workdir / "kfp" / "model"
    task = f"""
import sys, types
sys.path.insert(0, {str(ROOT)!r})
import components

class Metrics:
    def log_metric(self, key, value):
        print("metric", key, value, flush=True)

folder = lambda path: types.SimpleNamespace(path=path)
components.train(params=open({str(params)!r}).read(), latents=folder({str(workdir / "latents")!r}),
                 vae=folder({str(workdir / "vae")!r}), vocoder=folder({str(workdir)!r}), num_gpus=1, mlflow_tracking_uri={mlflow_server!r},
                 train_state={str(state)!r}, model=folder({str(model)!r}), metrics=Metrics())
"""
    env = env_for(mlflow_server)
    pod = subprocess.Popen([sys.executable, "-c", task], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    killed_at = kill_once_saved(pod, state, 8)
    assert 8 <= killed_at < 30 and not model.exists()

    restarted = run([sys.executable, "-c", task], workdir, env)
    assert f"resuming from step {killed_at}" in restarted.stdout
    assert f"metric resumed_from_step {killed_at}" in restarted.stdout and "metric steps 30" in restarted.stdout
    assert (model / "model.safetensors").is_file()


def test_bf16_autocast_keeps_fp32_weights_and_follows_the_fp32_run():
    """The demo trains under bf16 autocast on CPU: the weights, EMA and optimizer state stay fp32, and the
    loss curve follows the fp32 run's from the same draws."""
    from mdsgen.model.network import MDSGen, MDSGenConfig
    from mdsgen.training.train import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    features = torch.randn(16, 32, 64, generator=g)
    latents = features[:, :, :8].mean(1).view(16, 1, 1, 8).expand(16, 1, 8, 8).contiguous()
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = MDSGen(MDSGenConfig(input_size=(8, 8), in_channels=1, hidden_size=64, depth=4, num_heads=2,
                                    decoder_depth=2, feature_dim=64, mask_strategy="none", prediction="x0"))
        trainer = Trainer(model, TrainConfig(steps=60, batch_size=8, lr=2e-3, seed=0, precision=precision))
        curves[precision] = torch.tensor([trainer.step(latents, features)["loss"] for _ in range(60)])
        assert {p.dtype for p in [*trainer.model.parameters(), *trainer.ema.parameters()]} == {torch.float32}
        assert {v.dtype for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)} \
            == {torch.float32}
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert bf16[-10:].mean() < 0.6 * bf16[:5].mean(), bf16  # it learns (0.29-0.42 over seeds 0-4)
    assert (bf16[-10:].mean() / fp32[-10:].mean() - 1).abs() < 0.15, (fp32[-10:], bf16[-10:])  # 0.00-0.06
    assert not torch.equal(fp32, bf16)  # the autocast was on
