"""Denoiser training on cached latents and frame features with the paper's recipe (Adan, EMA, CFG
dropout, two-pass masked loss), resumable and data-parallel.

- `Trainer` is one optimisation step and the state that makes it reproducible: model, EMA, optimizer and
  the random generator. All random draws come from that one CPU generator, for the global batch; each
  data-parallel rank takes its slice, so K processes follow the same trajectory as one process with the
  same global batch (up to float summation order).
- `train` is the `mdsgen train` stage: resume from the last training state, checkpoint every N steps
  (atomically: a run killed at any moment resumes from the last complete state), log to MLflow, and
  write the final generator checkpoint with the EMA weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from adan_pytorch import Adan
from safetensors.torch import load_file, save_file

from mdsgen.base.precision import PRECISIONS, autocast
from mdsgen.model.diffusion import draw_training_noise, fit_texture, training_loss
from mdsgen.model.network import MDSGen



@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500_000
    batch_size: int = 64           # global batch, split evenly across data-parallel processes
    lr: float = 5e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999      # 0 turns EMA off (short runs, tests)
    ema_warmup: bool = True        # decay min(ema_decay, (1 + step) / (10 + step)): short runs get a useful EMA
    cfg_dropout: float = 0.1
    masked_weight: float = 1.0     # lambda in L_full + lambda * L_masked
    min_snr_gamma: float = 0.0     # min-SNR-gamma loss weighting (5 is the usual value); 0: off (the paper)
    min_snr_floor: float = 0.0     # with min_snr_gamma: x0 error weighted clamp(SNR, floor, gamma); 0: min(SNR, gamma)
    time_roll: bool = False        # roll each clip's latents and frames together by a random whole frame count
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"        # auto: bf16 autocast where the device runs it natively (CUDA, AVX-512-BF16), else fp32
    checkpoint_every: int = 1000   # training state for resuming; also written at the end
    keep_checkpoints: int = 2
    log_every: int = 10            # MLflow metrics, averaged over the last `log_every` steps
    sample_every: int = 0          # val samples (mel PNG + WAV) to MLflow; 0: only at the end
    sample_clips: int = 4

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"train.steps {self.steps} and train.batch_size {self.batch_size} must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay {self.ema_decay}: must be in [0, 1)")

    def recipe(self) -> dict:
        """The settings that shape the trajectory (a resumed state must match them). `steps` is left out
        so that a finished run can be continued to more steps."""
        bookkeeping = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                       "sample_clips"}
        return {k: v for k, v in asdict(self).items() if k not in bookkeeping}


def roll_in_time(latents: torch.Tensor, features: torch.Tensor, shifts: torch.Tensor, time_dim: int):
    """Roll each clip's latents [B, C, H, W] along `time_dim` and its frames [B, T, F] together, by `shifts`
    [B] frames: events move, each still on its own frames (the wrap is a cut, as between two clips)."""
    steps = latents.shape[time_dim]
    if steps % features.shape[1]:
        raise ValueError(f"time roll: {steps} latent steps are not a whole number per {features.shape[1]} frames")
    per_frame = steps // features.shape[1]
    latents = torch.stack([x.roll(int(k) * per_frame, time_dim) for x, k in zip(latents, shifts)])
    features = torch.stack([f.roll(int(k), 0) for f, k in zip(features, shifts)])
    return latents, features


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


class Trainer:
    """Model, EMA, optimizer and generator; `step` runs one optimisation step on the global batch."""

    def __init__(self, model: MDSGen, cfg: TrainConfig, device: str | torch.device = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if cfg.batch_size % self.world:
            raise ValueError(f"train.batch_size {cfg.batch_size} does not split evenly over {self.world} processes")
        self.model = model.to(self.device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=model.config.mask_strategy == "none")  # the side block idles without masking
        self.optimizer = Adan(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.losses = {"first": None, "last": None}  # kept in the state: a resumed run still knows them
        self.autocast = autocast(self.device.type, cfg.precision, "train.precision")

    def step(self, latents: torch.Tensor, features: torch.Tensor) -> dict:
        """One step on a batch drawn from the whole training set (latents [N, C, H, W], features [N, T, F])."""
        cfg = self.cfg
        index = torch.randint(len(latents), (cfg.batch_size,), generator=self.generator)
        draws = draw_training_noise(self.model, (cfg.batch_size, *latents.shape[1:]), self.generator)
        per = cfg.batch_size // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        x0 = latents[index[mine]].to(self.device, non_blocking=True)
        feats = features[index[mine]].to(self.device, non_blocking=True)
        if cfg.time_roll:  # drawn for the whole batch, so every process draws the same numbers
            shifts = torch.randint(features.shape[1], (cfg.batch_size,), generator=self.generator)
            x0, feats = roll_in_time(x0, feats, shifts[mine], -1 if self.model.config.time_axis == "width" else -2)
        with self.autocast:
            losses = training_loss(self.net, x0, feats, cfg_dropout=cfg.cfg_dropout,
                                   masked_weight=cfg.masked_weight, min_snr_gamma=cfg.min_snr_gamma,
                                   min_snr_floor=cfg.min_snr_floor, draws={k: v[mine] for k, v in draws.items()})
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        if self.ema is not None:
            decay = min(cfg.ema_decay, (1 + self.step_count) / (10 + self.step_count)) if cfg.ema_warmup \
                else cfg.ema_decay
            update_ema(self.ema, self.model, decay)
        names = sorted(losses)
        values = torch.stack([losses[k].detach().float() for k in names])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        result = dict(zip(names, values.tolist()))
        self.losses["last"] = result["loss"]
        if self.losses["first"] is None:
            self.losses["first"] = result["loss"]
        return result

    def final_model(self) -> MDSGen:
        return (self.ema if self.ema is not None else self.model).eval()

    # --- state for resuming -----------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        """(tensors for safetensors, JSON-able rest): everything `load_state` needs to continue exactly."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optim = self.optimizer.state_dict()
        scalars = {}
        for index, values in optim["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{name}"] = value
                else:
                    scalars[f"{index}.{name}"] = value
        tensors["generator"] = self.generator.get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        groups = [{k: v for k, v in g.items() if k != "restart_cond"} for g in optim["param_groups"]]
        return tensors, {"step": self.step_count, "optimizer_scalars": scalars, "param_groups": groups,
                         "losses": self.losses}

    def load_state(self, tensors: dict, rest: dict) -> None:
        def part(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("model."))
        if self.ema is not None:
            self.ema.load_state_dict(part("ema."))
        state: dict = {}
        for key, value in part("optimizer.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for key, value in rest["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [dict(g, restart_cond=None) for g in rest["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.generator.set_state(tensors["generator"])
        self.step_count = rest["step"]
        self.losses = dict(rest.get("losses") or {"first": None, "last": None})


def fit(model: MDSGen, latents: torch.Tensor, features: torch.Tensor, cfg: TrainConfig,
        on_step: Callable[[int, dict], None] | None = None) -> MDSGen:
    """Train on in-memory tensors; returns the EMA model (or the trained model itself when EMA is off)."""
    trainer = Trainer(model, cfg, latents.device)
    for step in range(1, cfg.steps + 1):
        values = trainer.step(latents, features)
        if on_step is not None:
            on_step(step, values)
    trainer.model.eval()
    return trainer.final_model()


# --- training state on disk ----------------------------------------------------------------------
LATEST = "latest"


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_train_state(state_dir, trainer: Trainer, extra: dict, keep: int = 2) -> Path:
    """Write `step-NNNNNNNN/` completely, then point `latest` at it with an atomic rename; older states
    beyond `keep` are removed only after that. A kill at any moment leaves `latest` on a complete state."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors, rest = trainer.state()
    name = f"step-{trainer.step_count:08d}"
    for leftover in state_dir.glob(".step-*.partial"):  # from a run killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    partial = state_dir / f".{name}.partial"
    partial.mkdir()
    save_file(tensors, str(partial / "state.safetensors"))
    with open(partial / "state.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    _fsync_write(partial / "state.json", json.dumps({**rest, **extra}, indent=1))
    final = state_dir / name
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _fsync_write(state_dir / f".{LATEST}.partial", name)
    os.replace(state_dir / f".{LATEST}.partial", state_dir / LATEST)
    states = sorted(p for p in state_dir.glob("step-*") if p.is_dir())
    for old in states[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(state_dir) -> tuple[dict, dict] | None:
    """(tensors, rest) of the state `latest` points at; when that one is missing or unreadable, the newest
    complete one before it (said on stderr); None when there is none."""
    state_dir = Path(state_dir)
    folders = sorted((p for p in state_dir.glob("step-*") if p.is_dir()), reverse=True)
    pointer = state_dir / LATEST
    if pointer.is_file():
        named = state_dir / pointer.read_text().strip()
        folders = [named] + [f for f in folders if f != named]
    for folder in folders:
        try:
            return load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())
        except Exception as err:  # safetensors, JSON and OS errors alike: this state is not usable
            print(f"{folder}: unreadable training state ({type(err).__name__}: {err}); trying an older one",
                  file=sys.stderr)
    return None


def set_aside_train_state(state_dir) -> Path:
    """Move the states of another recipe into `state_dir/replaced/` (the one set aside before goes):
    starting over must not delete a run's work silently."""
    state_dir = Path(state_dir)
    aside = state_dir / "replaced"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for entry in list(state_dir.iterdir()):
        if entry != aside:
            os.replace(entry, aside / entry.name)
    return aside


def data_fingerprint(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# --- the stage ----------------------------------------------------------------------------------
def init_distributed(device: str) -> str:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU); returns this
    process's device."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def log_samples(ckpt, val: dict, step: int, clips: int, device: str) -> None:
    """Sample the first val clips with `ckpt` (the model being trained, the run's VAE and settings), log their
    mels beside the ground truth (through the VAE) and the WAVs."""
    import tempfile

    import mlflow

    from mdsgen.inference.generate import FeaturesToAudio
    from mdsgen.media.audio import vocode
    from mdsgen.media.files import write_wav
    from mdsgen.media.plots import mel_grid

    ckpt.vae.to(device)  # the run keeps its VAE on the CPU until here (the latents are encoded before training)
    core = FeaturesToAudio(ckpt, device)
    generated = core.mels(core.latents(val["features"][:clips], ckpt.sampling, seed=0))
    truth = core.mels(val["latents"][:clips])
    waves = vocode(generated, ckpt.audio, ckpt.vocoder)
    with tempfile.TemporaryDirectory() as tmp:
        ids = val["clip_ids"][:clips]
        mel_grid([(cid, [(g, f"generated, step {step}"), (t, "ground truth (VAE)")])
                  for cid, g, t in zip(ids, generated, truth)], Path(tmp, f"mels-step{step:08d}.png"))
        for cid, wave in zip(ids, waves):
            write_wav(Path(tmp, f"{cid}-step{step:08d}.wav"), wave.numpy(), ckpt.audio.sample_rate)
        mlflow.log_artifacts(tmp, "samples")


def train(params, latents_dir, vae_dir, out, state_dir, device: str = "auto",
          on_step: Callable[[int, dict], None] | None = None, vocoder_dir=None) -> dict:
    """The `mdsgen train` stage. Returns the metrics it writes (rank 0; other ranks return {}). The checkpoint
    carries the train_vocoder stage's generator from `vocoder_dir` where it fine-tuned one."""
    import mlflow

    from mdsgen.data.features import load_latents
    from mdsgen.evaluation import tracking
    from mdsgen.media.vocoder import load_vocoder_dir
    from mdsgen.model.checkpoint import init_checkpoint

    cfg: TrainConfig = params.train
    device = init_distributed(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    data = load_latents(latents_dir, "train")
    val = load_latents(latents_dir, "val") if (Path(latents_dir) / "val.safetensors").is_file() else None
    params = replace(params, vae=replace(params.vae, path=str(vae_dir)))
    ckpt = init_checkpoint(params, seed=cfg.seed)
    ckpt = replace(ckpt, texture=fit_texture(data["latents"], ckpt.model.config.time_axis))
    if vocoder_dir is not None:
        if not Path(vocoder_dir).is_dir():
            raise ValueError(f"{vocoder_dir}: no train-vocoder folder there (run `mdsgen train-vocoder`)")
        ckpt = replace(ckpt, vocoder=load_vocoder_dir(vocoder_dir))
    if ckpt.model.config.feature_dim != data["features"].shape[-1]:
        raise ValueError(f"{latents_dir}: features are {data['features'].shape[-1]}-d, the configured frame "
                         f"encoder gives {ckpt.model.config.feature_dim}-d (re-run the features stage)")
    if ckpt.model.config.num_frames != data["features"].shape[1]:
        raise ValueError(f"{latents_dir}: {data['features'].shape[1]} frames per clip, video.frames_per_window is "
                         f"{ckpt.model.config.num_frames} (re-run the features stage)")
    trainer = Trainer(ckpt.model, cfg, device)
    recipe = {"train": cfg.recipe(), "model": ckpt.model.config.to_dict(),
              "data": data_fingerprint(Path(latents_dir) / "train.safetensors"), "world_size": trainer.world}
    saved = load_train_state(state_dir)
    run_id = None
    if saved is not None and saved[1].get("recipe") == json.loads(json.dumps(recipe)):
        trainer.load_state(*saved)
        run_id = saved[1].get("mlflow_run_id")
        if rank == 0:
            print(f"resuming from step {trainer.step_count} ({state_dir})")
    elif saved is not None and rank == 0:
        aside = set_aside_train_state(state_dir)
        print(f"{state_dir}: the saved state is from another recipe or data; starting over "
              f"(the old state is kept in {aside} until the next change)")
    if dist.is_initialized():
        dist.barrier()  # nobody reads or removes the state while another rank decides

    run = None
    if rank == 0:
        tracking.use_tracking(params.mlflow.tracking_uri, params.mlflow.experiment)
        if run_id and not tracking.run_exists(run_id):
            print(f"MLflow run {run_id} of the saved state is not in this store; logging to a new run")
            run_id = None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"train-{params.model.size}")
        if run_id is None:
            mlflow.log_params(tracking.flat_params(params))
            mlflow.log_dict(tracking.environment(), "environment.json")
            mlflow.set_tags({"stage": "train", "train_clips": len(data["latents"]),
                             "params_inference": ckpt.model.parameter_counts()["inference"]})

    start_step, start_time = trainer.step_count, time.perf_counter()
    window: dict[str, list[float]] = {}
    try:
        while trainer.step_count < cfg.steps:
            values = trainer.step(data["latents"], data["features"])
            step = trainer.step_count
            if on_step is not None:
                on_step(step, values)
            if rank != 0:
                continue
            for k, v in values.items():
                window.setdefault(k, []).append(v)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = {k: sum(v) / len(v) for k, v in window.items()}
                metrics["steps_per_second"] = (step - start_step) / (time.perf_counter() - start_time)
                mlflow.log_metrics(metrics, step=step)
                window = {}
            if cfg.sample_every and step % cfg.sample_every == 0 and val is not None:
                log_samples(replace(ckpt, model=trainer.final_model()), val, step, cfg.sample_clips, device)
                trainer.model.train()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_train_state(state_dir, trainer, {"recipe": recipe, "mlflow_run_id": run.info.run_id},
                                 cfg.keep_checkpoints)
        metrics = finish(trainer, ckpt, val, params, out, device, start_step, start_time, run) if rank == 0 else {}
    finally:
        if run is not None:
            mlflow.end_run()
    if dist.is_initialized():
        # Every rank waits for rank 0's final save. The group is not destroyed: tearing gloo down hung a
        # rank after all the work was done (pytorch#75097; seen here even after this barrier), so
        # `mdsgen train` ends a torchrun process with os._exit once its outputs are written.
        dist.barrier()
    return metrics


def finish(trainer: Trainer, ckpt, val, params, out, device: str, start_step: int, start_time: float,
           run) -> dict:
    """Rank 0 after the last step: the final samples, the checkpoint and the stage's metrics."""
    import mlflow

    from mdsgen.model.checkpoint import save_checkpoint

    final = trainer.final_model()
    if val is not None:
        log_samples(replace(ckpt, model=final), val, trainer.step_count, params.train.sample_clips, device)
    save_checkpoint(replace(ckpt, model=copy.deepcopy(final).float().cpu()), str(out))
    metrics = {"steps": trainer.step_count, "final_loss": trainer.losses["last"],
               "first_loss": trainer.losses["first"],
               "seconds_this_invocation": time.perf_counter() - start_time,
               "resumed_from_step": start_step, "world_size": trainer.world,
               "mlflow_run_id": run.info.run_id, "mlflow_tracking_uri": mlflow.get_tracking_uri()}
    mlflow.log_metrics({"train_seconds": metrics["seconds_this_invocation"]}, step=trainer.step_count)
    return metrics
