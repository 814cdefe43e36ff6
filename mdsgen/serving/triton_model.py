"""The Triton python-backend model: requests in, waveforms out.

Triton's dynamic batcher hands `execute` every request that queued while the previous batch ran. Each
request is decoded and encoded on its own (videos differ in length), then the windows of all requests
that share sampling settings go through the denoiser together, then through the VAE and Griffin-Lim
together: the sampling loop, the expensive part, runs once per batch, not once per request.
Everything runs in this one model (no BLS sub-models): on one device a call to another model would copy
the latents between processes 50 times per clip (25 steps, two CFG branches) for no gain in parallelism.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdsgen.base.errors import MediaError, describe
from mdsgen.inference.generate import VideoToAudio, with_overrides
from mdsgen.media.video import ReadLimits
from mdsgen.model.diffusion import SamplingConfig
from mdsgen.serving.server import CHECKPOINT_DIR, MONITOR_LOG_ENV


@dataclass
class Job:
    index: int                 # position in the batch of requests
    features: torch.Tensor     # [windows, frames_per_window, feature_dim]
    duration: float            # seconds of audio to return
    sampling: SamplingConfig
    seed: int


class RequestError(ValueError):
    """A request that cannot be served; the message names the input and the problem."""


def parse_request(generator: VideoToAudio, inputs: dict, limits: dict) -> tuple:
    """Validate one request's inputs ({name: numpy array or None}) into (features, duration, sampling, seed)."""
    ckpt = generator.ckpt
    video, features = inputs.get("VIDEO"), inputs.get("FEATURES")
    if (video is None) == (features is None):
        raise RequestError("send exactly one of VIDEO (encoded video bytes) or FEATURES (frame features)")
    if video is not None:
        features, duration = _video_features(generator, video, inputs.get("DURATION"), limits["max_windows"],
                                             limits["max_video_bytes"])
    else:
        features, duration = _given_features(ckpt, features, inputs.get("DURATION"), limits["max_windows"])
    steps = _scalar(inputs, "STEPS", ckpt.sampling.steps, int)
    if not 1 <= steps <= limits["max_steps"]:
        raise RequestError(f"STEPS {steps}: must be between 1 and {limits['max_steps']}")
    values = {"steps": steps, "cfg_scale": _scalar(inputs, "CFG_SCALE", ckpt.sampling.cfg_scale, float)}
    try:
        sampling = with_overrides(ckpt.sampling, **values)
    except ValueError as err:
        raise RequestError(str(err).replace("cfg_scale", "CFG_SCALE")) from err
    seed = _scalar(inputs, "SEED", 0, int)
    if not 0 <= seed < 2 ** 63:
        raise RequestError(f"SEED {seed}: must be a non-negative 64-bit integer")
    return features.to(generator.device), duration, sampling, seed


def _scalar(inputs: dict, name: str, default, kind):
    value = inputs.get(name)
    if value is None:
        return default
    if value.size != 1:
        raise RequestError(f"{name}: expected one value, got shape {list(value.shape)}")
    return kind(value.reshape(-1)[0])


def _video_features(generator: VideoToAudio, video: np.ndarray, duration: np.ndarray | None, max_windows: int,
                    max_bytes: int):
    if video.size != 1 or not isinstance(video.reshape(-1)[0], bytes):
        raise RequestError(f"VIDEO: expected one element of encoded video bytes, got shape {list(video.shape)}")
    data = video.reshape(-1)[0]
    if not data:
        raise RequestError("VIDEO: empty (0 bytes)")
    if len(data) > max_bytes:
        raise RequestError(f"VIDEO: {len(data):,} bytes; this server takes at most {max_bytes:,} per request "
                           f"(parameter max_video_bytes)")
    still_seconds = None if duration is None else float(_scalar({"DURATION": duration}, "DURATION", 0.0, float))
    with tempfile.NamedTemporaryFile(suffix=".video") as file:  # PyAV probes formats best from a file
        file.write(data)
        file.flush()
        try:
            windows = generator.read(file.name, ReadLimits.for_windows(max_windows, generator.ckpt.video,
                                                                        generator.ckpt.audio.clip_seconds),
                                     still_seconds=still_seconds)
        except MediaError as err:
            raise RequestError(f"VIDEO ({len(data)} bytes): {err.reason}") from err
    if still_seconds is not None and not windows.still:
        raise RequestError("DURATION: sets how long a picture's sound lasts (or the length for FEATURES); "
                           "a video's sound lasts as long as the video")
    if windows.count > max_windows:
        raise RequestError(f"VIDEO: {windows.duration:.0f} s gives {windows.count} windows; this server takes "
                           f"at most {max_windows} per request (parameter max_windows)")
    return generator.features(windows), windows.duration


def _given_features(ckpt, features: np.ndarray, duration: np.ndarray | None, max_windows: int):
    frames, dim = ckpt.video.frames_per_window, ckpt.model.config.feature_dim
    if features.ndim == 4 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 3 or features.shape[1:] != (frames, dim):
        raise RequestError(f"FEATURES: expected shape [windows, {frames}, {dim}], got {list(features.shape)}")
    if not 1 <= len(features) <= max_windows:
        raise RequestError(f"FEATURES: {len(features)} windows; between 1 and {max_windows} are served")
    if not np.isfinite(features).all():
        raise RequestError("FEATURES: contains NaN or infinite values")
    full = (len(features) - 1) * ckpt.video.hop_seconds + ckpt.audio.clip_seconds
    seconds = full if duration is None else float(duration.reshape(-1)[0])
    if not (math.isfinite(seconds) and 0 < seconds <= full + 1e-6):
        raise RequestError(f"DURATION {seconds}: {len(features)} windows cover between 0 and {full:.3f} s")
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), seconds


def generate_batch(generator: VideoToAudio, jobs: list[Job]) -> list[np.ndarray]:
    """Waveforms for jobs sharing one SamplingConfig: all their windows are denoised and decoded together."""
    return generator.batch([job.features for job in jobs], [job.duration for job in jobs],
                           [job.seed for job in jobs], jobs[0].sampling)


class TritonPythonModel:
    """Triton's entry point (serving/mdsgen/model.py imports it)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if parameters.get("torch_threads"):
            torch.set_num_threads(int(parameters["torch_threads"]))
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args['model_instance_device_id']}"
        self.limits = {"max_windows": int(parameters.get("max_windows", 64)),
                       "max_steps": int(parameters.get("max_steps", 200)),
                       "max_video_bytes": int(parameters.get("max_video_bytes", 256 << 20))}
        checkpoint = Path(args["model_repository"]) / args["model_version"] / CHECKPOINT_DIR
        self.generator = VideoToAudio(str(checkpoint), device=device,
                                      batch_size=int(parameters.get("denoise_batch", 16)))
        self.version = args["model_version"]
        self.recorder = self._recorder(config["name"], checkpoint)

    def _recorder(self, name: str, checkpoint: Path):
        from mdsgen.evaluation.registry import MONITORING_DIR
        from mdsgen.serving.monitoring import SUMMARIZER_FILE, Recorder, RecordLog, Summarizer

        log = os.environ.get(MONITOR_LOG_ENV)
        if not log:
            return None
        reference = checkpoint / MONITORING_DIR
        summarizer = Summarizer.load(reference) if (reference / SUMMARIZER_FILE).is_file() else None
        return Recorder(RecordLog(log), summarizer, name, self.version)

    def finalize(self):
        if self.recorder is not None:
            self.recorder.close()

    def _inputs(self, request) -> dict:
        names = ("VIDEO", "FEATURES", "DURATION", "STEPS", "CFG_SCALE", "SEED")
        tensors = {name: self.pb.get_input_tensor_by_name(request, name) for name in names}
        return {name: t.as_numpy() for name, t in tensors.items() if t is not None}

    def _reply(self, wave: np.ndarray):
        rate = np.array([[self.generator.ckpt.audio.sample_rate]], dtype=np.int32)
        return self.pb.InferenceResponse(output_tensors=[
            self.pb.Tensor("WAVEFORM", wave[None].astype(np.float32)), self.pb.Tensor("SAMPLE_RATE", rate)])

    def _error(self, message: str):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message))

    def execute(self, requests):
        arrived = time.perf_counter()
        responses, jobs = [None] * len(requests), []
        for i, request in enumerate(requests):
            try:
                jobs.append(Job(i, *parse_request(self.generator, self._inputs(request), self.limits)))
            except RequestError as err:
                responses[i] = self._error(str(err))
            except Exception as err:  # a request must never take the server down
                responses[i] = self._error(f"request could not be read: {type(err).__name__}: {describe(err)}")
        groups: dict[SamplingConfig, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.sampling, []).append(job)
        for group in groups.values():
            start = time.perf_counter()
            try:
                waves = generate_batch(self.generator, group)
            except Exception as err:
                waves = [None] * len(group)
                message = f"generation failed: {type(err).__name__}: {describe(err)}"
            latency = time.perf_counter() - arrived
            for job, wave in zip(group, waves):
                responses[job.index] = self._reply(wave) if wave is not None else self._error(message)
                if wave is not None and self.recorder is not None:
                    self.recorder.submit(job.features, wave, self.generator.ckpt.audio.sample_rate, latency,
                                         windows=len(job.features), batch_requests=len(requests),
                                         steps=job.sampling.steps, cfg_scale=job.sampling.cfg_scale)
            self.pb.Logger.log_verbose(f"mdsgen: {len(group)} requests, "
                                       f"{sum(len(j.features) for j in group)} windows, {time.perf_counter() - start:.2f} s")
        return responses
