"""The gRPC client of the Triton server (`mdsgen serve`).

    from mdsgen.serving.client import SoundtrackClient
    track = SoundtrackClient("127.0.0.1:8001").soundtrack("clip.mp4", seed=3)   # track.wave, track.sample_rate

Long videos are windowed on the server (the same windows and crossfade as `mdsgen generate`): send the
whole file, get the whole soundtrack back.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from mdsgen.media.files import Result, Soundtrack, list_inputs, write_soundtracks
from mdsgen.media.video import is_still
from mdsgen.serving.server import MODEL_NAME

MAX_MESSAGE = 2 ** 31 - 1  # videos are sent whole


class SoundtrackClient:
    """One connection to the server. Not shared between threads: make one per thread (as `client_files` does)."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL_NAME, timeout: float | None = 600.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url, self.model, self.timeout = url, model, timeout
        self.client = grpcclient.InferenceServerClient(url, channel_args=[
            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)])

    def ready(self) -> bool:
        try:
            return self.client.is_model_ready(self.model)
        except Exception:
            return False

    def _tensor(self, name: str, array: np.ndarray, datatype: str):
        tensor = self._grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    def soundtrack(self, video: str | Path | bytes | None = None, *, features: np.ndarray | None = None,
                   duration: float | None = None, steps: int | None = None, cfg_scale: float | None = None,
                   seed: int = 0) -> Soundtrack:
        """A soundtrack for a video (path or encoded bytes) or for its frame features [windows, 32, F].
        Raises tritonclient's InferenceServerException with the server's reason for a bad request."""
        inputs = []
        if video is not None:
            data = video if isinstance(video, bytes) else Path(video).read_bytes()
            inputs.append(self._tensor("VIDEO", np.array([[data]], dtype=np.object_), "BYTES"))
        if features is not None:
            inputs.append(self._tensor("FEATURES", np.asarray(features, np.float32)[None], "FP32"))
        for name, value, dtype, kind in (("DURATION", duration, np.float32, "FP32"), ("STEPS", steps, np.int32, "INT32"),
                                         ("CFG_SCALE", cfg_scale, np.float32, "FP32"), ("SEED", seed, np.int64, "INT64")):
            if value is not None:
                inputs.append(self._tensor(name, np.array([[value]], dtype=dtype), kind))
        outputs = [self._grpc.InferRequestedOutput(n) for n in ("WAVEFORM", "SAMPLE_RATE")]
        start = time.perf_counter()
        result = self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout)
        wave = result.as_numpy("WAVEFORM")[0]
        rate = int(result.as_numpy("SAMPLE_RATE").reshape(-1)[0])
        response = result.get_response()
        return Soundtrack(wave, rate, windows=0, timings={"round_trip": time.perf_counter() - start},
                          model_version=response.model_version)

    def close(self) -> None:
        self.client.close()


def client_files(source, outdir, url: str, concurrency: int = 4, mux: bool = True, steps: int | None = None,
                 cfg_scale: float | None = None, seed: int = 0, split: str | None = None,
                 limit: int | None = None, still_seconds: float | None = None) -> list[Result]:
    """Like `mdsgen generate`, through the server: `concurrency` requests in flight (the server batches them).
    `still_seconds`: how long a picture's sound lasts (sent for pictures only; a video's sound lasts as long
    as the video)."""
    inputs = list_inputs(source, split)[:limit]
    local = threading.local()
    clients = []

    def make(path: Path) -> Soundtrack:
        if not hasattr(local, "client"):
            local.client = SoundtrackClient(url)
            clients.append(local.client)
        duration = still_seconds if still_seconds is not None and is_still(path) else None
        return local.client.soundtrack(path, duration=duration, steps=steps, cfg_scale=cfg_scale, seed=seed)

    try:
        return write_soundtracks(inputs, outdir, make, mux, workers=concurrency)
    finally:
        for client in clients:
            client.close()
