"""`mdsgen app`: a web page to try the generator. Drop a video or a picture; get it back playing with its
generated sound, a mel picture, and the WAV and MP4 to download, with progress while it works.

A FastAPI app (FastAPI and uvicorn come with MLflow already) serving one HTML page without external scripts
or fonts, so it works offline. Gradio, the field's habit, was not used: it would add a large dependency tree
beside MLflow's pins and its front end fetches assets from a CDN; the page needs only an upload, a few
fields, polling for progress and a <video> tag.

Uploads become jobs in a queue; `concurrency` jobs run at once (1 in-process: one generation already uses
every core), the rest wait and the page shows their place. Each job lives in its own folder under one
temporary root: the upload is deleted when its job ends, the results of the last `keep_results` jobs stay
for download, and the root is removed when the app stops.
"""

import math
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NoReturn, Protocol

import numpy as np

PAGE = Path(__file__).with_name("app.html")
DRAIN_BYTES = 64 * 2 ** 20  # of a refused upload, read and dropped so the client hears why
Report = Callable[[str, float], None]  # (what is happening, fraction done)


@dataclass(frozen=True)
class AppConfig:
    host: str = "127.0.0.1"      # bind address; 0.0.0.0 only behind a proxy with authentication
    port: int = 7860
    max_upload_mb: float = 256.0
    concurrency: int = 1         # jobs generated at once; the others queue
    max_queue: int = 16          # jobs waiting; more are refused with "busy"
    keep_results: int = 32       # finished jobs whose files stay for download
    max_variations: int = 4
    max_steps: int = 200


@dataclass(frozen=True)
class Request:
    """One upload's settings, checked."""
    name: str                    # the uploaded file's name, for the page
    start: float = 0.0           # trim: seconds into the video
    duration: float | None = None  # trim length; for a picture, how long its sound lasts
    steps: int | None = None     # None: the model's own settings
    cfg_scale: float | None = None
    seed: int = 0
    variations: int = 1          # seeds seed, seed + 1, ...

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.variations)]

    @property
    def trimmed(self) -> bool:
        return self.start > 0 or self.duration is not None


def parse_request(query: dict[str, str], cfg: AppConfig) -> Request:
    """The page's query parameters -> a Request; a ValueError names the field and what it must be."""

    def value(key: str, kind, low: float, high: float):
        raw = (query.get(key) or "").strip()
        if not raw:
            return None
        try:
            number = kind(raw)
        except ValueError:
            raise ValueError(f"{key}: {raw!r} is not a {'whole number' if kind is int else 'number'}") from None
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"{key}: {raw} is outside {low:g} to {high:g}")
        return number

    variations = value("variations", int, 1, cfg.max_variations) or 1
    return Request(name=(query.get("name") or "upload")[:200],
                   start=value("start", float, 0, 1e6) or 0.0,
                   duration=value("duration", float, 0.1, 1e6),
                   steps=value("steps", int, 1, cfg.max_steps),
                   cfg_scale=value("cfg_scale", float, 1, 20),
                   seed=value("seed", int, 0, 2 ** 63 - 1 - variations) or 0,
                   variations=variations)


class Backend(Protocol):
    def model(self) -> str: ...
    def soundtracks(self, video: Path, request: Request, report: Report) -> tuple[list[np.ndarray], int, str]:
        """One wave per seed, the sample rate, and which model version made them."""


class InProcess:
    """The generator loaded in this process: all variations are sampled as one batch."""

    def __init__(self, generator, label: str):
        self.generator, self.label = generator, label

    def model(self) -> str:
        return self.label

    def soundtracks(self, video: Path, request: Request, report: Report):
        from mdsgen.inference.generate import with_overrides

        g = self.generator
        sampling = with_overrides(g.ckpt.sampling, steps=request.steps, cfg_scale=request.cfg_scale)
        report("decoding the video", 0.02)
        windows = g.read(video, still_seconds=request.duration)  # a video's trim is already cut
        report(f"frame features ({windows.count} window{'s' * (windows.count > 1)})", 0.1)
        features = g.features(windows)

        def step(done: int, total: int) -> None:
            report(f"sampling: step {done} of {total}", 0.15 + 0.6 * done / total)
            if done == total:
                report("VAE decoder and vocoder", 0.8)

        n = request.variations
        waves = g.batch([features] * n, [windows.duration] * n, request.seeds, sampling, on_step=step)
        return waves, g.ckpt.audio.sample_rate, self.label


class ThroughServer:
    """A Triton server (`mdsgen serve`) through SoundtrackClient: the variations are sent together and the
    server's dynamic batcher samples them as one batch."""

    def __init__(self, url: str):
        self.url = url

    def model(self) -> str:
        return f"the Triton server at {self.url}"

    def soundtracks(self, video: Path, request: Request, report: Report):
        from tritonclient.utils import InferenceServerException

        from mdsgen.serving.client import SoundtrackClient

        data = video.read_bytes()
        done = []

        def one(seed: int):
            client = SoundtrackClient(self.url)
            try:
                track = client.soundtrack(data, duration=request.duration,
                                          steps=request.steps, cfg_scale=request.cfg_scale, seed=seed)
            finally:
                client.close()
            done.append(seed)
            report(f"the server returned {len(done)} of {request.variations}", 0.1 + 0.8 * len(done) / request.variations)
            return track

        report("sent to the server", 0.1)
        try:
            with ThreadPoolExecutor(request.variations) as pool:
                tracks = list(pool.map(one, request.seeds))
        except InferenceServerException as err:
            raise ValueError(f"{request.name}: {err.message()}") from None
        return [t.wave for t in tracks], tracks[0].sample_rate, f"{self.model()}, model version {tracks[0].model_version}"


@dataclass
class Job:
    id: str
    request: Request
    folder: Path
    state: str = "queued"        # queued, running, done, error
    stage: str = "waiting in the queue"
    progress: float = 0.0
    error: str | None = None
    model: str = ""
    results: list[dict] = field(default_factory=list)
    seconds: float | None = None

    def view(self, ahead: int) -> dict:
        return {"id": self.id, "name": self.request.name, "state": self.state, "ahead": ahead,
                "stage": f"waiting in the queue ({ahead} ahead)" if self.state == "queued" else self.stage,
                "progress": round(self.progress, 3), "error": self.error, "model": self.model,
                "results": self.results, "seconds": self.seconds}


class Jobs:
    """The queue: uploads in, results out, files under one temporary root."""

    def __init__(self, backend: Backend, cfg: AppConfig):
        self.backend, self.cfg = backend, cfg
        self.root = Path(tempfile.mkdtemp(prefix="mdsgen-app-"))
        self.jobs: dict[str, Job] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="mdsgen-app")

    def new_folder(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex[:12]
        folder = self.root / job_id
        folder.mkdir()
        return job_id, folder

    def submit(self, job_id: str, folder: Path, upload: Path, request: Request) -> Job:
        job = Job(job_id, request, folder)
        with self.lock:
            if sum(j.state == "queued" for j in self.jobs.values()) >= self.cfg.max_queue:
                shutil.rmtree(folder, ignore_errors=True)
                raise OverflowError(f"busy: {self.cfg.max_queue} uploads are already waiting; try again shortly")
            self.jobs[job_id] = job
            self.order.append(job_id)
        self.pool.submit(self._run, job, upload)
        return job

    def ahead(self, job: Job) -> int:
        with self.lock:
            queued = [j for j in self.order if self.jobs[j].state == "queued"]
        return queued.index(job.id) if job.id in queued else 0

    def _run(self, job: Job, upload: Path) -> None:
        from mdsgen.base.errors import MediaError
        from mdsgen.media.files import write_wav
        from mdsgen.media.plots import soundtrack_mel
        from mdsgen.media.video import is_still, mux_audio, trim_video

        start = time.perf_counter()
        job.state = "running"

        def report(stage: str, progress: float) -> None:
            job.stage, job.progress = stage, progress

        try:
            video, request = upload, job.request
            if request.trimmed and not is_still(upload):  # a picture's duration is its sound's length
                report("trimming the video", 0.01)
                video = trim_video(upload, request.start, request.duration, job.folder / "trimmed.mp4")
                request = replace(request, start=0.0, duration=None)
            waves, rate, job.model = self.backend.soundtracks(video, request, report)
            report("writing the files", 0.9)
            stem = Path(job.request.name).stem[:60] or "upload"
            for seed, wave in zip(job.request.seeds, waves):
                name = f"{stem}-seed{seed}"
                write_wav(job.folder / f"{name}.wav", wave, rate)
                muxed = mux_audio(video, wave, rate, job.folder / name)
                soundtrack_mel(wave, rate, job.folder / f"{name}.png", f"{job.request.name}, seed {seed}")
                job.results.append({"seed": seed, "wav": f"{name}.wav", "video": muxed.name, "mel": f"{name}.png",
                                    "seconds": round(len(wave) / rate, 3),
                                    "plays_in_browser": muxed.suffix == ".mp4"})
            job.state, job.stage, job.progress = "done", "done", 1.0
        except (MediaError, ValueError) as err:
            job.state, job.error = "error", str(err).replace(str(upload), job.request.name)
        except Exception as err:  # the page must hear why, and the app must keep serving
            job.state, job.error = "error", f"{job.request.name}: {type(err).__name__}: {err}"
        finally:
            job.seconds = round(time.perf_counter() - start, 2)
            for leftover in (upload, job.folder / "trimmed.mp4"):
                leftover.unlink(missing_ok=True)
            self._forget_old()

    def _forget_old(self) -> None:
        with self.lock:
            finished = [j for j in self.order if self.jobs[j].state in ("done", "error")]
            for job_id in finished[:max(0, len(finished) - self.cfg.keep_results)]:
                shutil.rmtree(self.jobs.pop(job_id).folder, ignore_errors=True)
                self.order.remove(job_id)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)


def build_app(backend: Backend, cfg: AppConfig = AppConfig()):
    """The FastAPI app: the page, uploads (the file is the request body, settings in the query), job status
    and result files."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request as HttpRequest
    from fastapi.responses import FileResponse, HTMLResponse
    from starlette.concurrency import run_in_threadpool

    jobs = Jobs(backend, cfg)
    limit = int(cfg.max_upload_mb * 2 ** 20)

    @asynccontextmanager
    async def lifespan(_):
        try:
            yield
        finally:
            jobs.close()

    app = FastAPI(title="mdsgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.jobs = jobs

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @app.get("/api/info")
    def info():
        return {"model": backend.model(), "concurrency": cfg.concurrency, "max_upload_mb": cfg.max_upload_mb,
                "max_variations": cfg.max_variations, "max_steps": cfg.max_steps}

    async def refuse(http: HttpRequest, status: int, detail: str) -> NoReturn:
        """Answer only after reading what the client still sends (up to DRAIN_BYTES): a server that answers
        and closes mid-upload makes the client see a reset connection instead of the reason."""
        drained = 0
        async for chunk in http.stream():
            drained += len(chunk)
            if drained > DRAIN_BYTES:
                break
        raise HTTPException(status, detail)

    @app.post("/api/jobs")
    async def upload(http: HttpRequest):
        try:
            request = parse_request(dict(http.query_params), cfg)
        except ValueError as err:
            await refuse(http, 422, str(err))
        declared = int(http.headers.get("content-length") or 0)
        if declared > limit:
            await refuse(http, 413, f"{request.name}: {declared / 2 ** 20:.1f} MB is over the upload limit of "
                                    f"{cfg.max_upload_mb:g} MB")
        job_id, folder = jobs.new_folder()
        suffix = Path(request.name).suffix.lower()
        path = folder / f"upload{suffix if suffix[1:].isalnum() and len(suffix) <= 6 else ''}"
        size = 0
        try:
            with open(path, "wb") as out:
                async for chunk in http.stream():
                    size += len(chunk)
                    if size > limit:
                        await refuse(http, 413, f"{request.name}: over the upload limit of {cfg.max_upload_mb:g} MB")
                    await run_in_threadpool(out.write, chunk)
            if size == 0:
                raise HTTPException(422, f"{request.name}: the upload is empty")
            job = jobs.submit(job_id, folder, path, request)
        except OverflowError as err:
            raise HTTPException(503, str(err)) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job.view(jobs.ahead(job))

    def find(job_id: str) -> Job:
        job = jobs.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} (results are kept for the last {cfg.keep_results} uploads)")
        return job

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str):
        job = find(job_id)
        return job.view(jobs.ahead(job))

    @app.get("/api/jobs/{job_id}/files/{name}")
    def download(job_id: str, name: str):
        job = find(job_id)
        if not any(name in (r["wav"], r["video"], r["mel"]) for r in job.results):
            raise HTTPException(404, f"job {job_id} has no file {name}")
        return FileResponse(job.folder / name, filename=name)

    return app


def run_app(backend: Backend, cfg: AppConfig) -> None:
    import uvicorn

    print(f"mdsgen app on http://{cfg.host}:{cfg.port} with {backend.model()} "
          f"({cfg.concurrency} job{'s' * (cfg.concurrency > 1)} at a time, up to {cfg.max_queue} waiting)", flush=True)
    uvicorn.run(build_app(backend, cfg), host=cfg.host, port=cfg.port, log_level="warning")
