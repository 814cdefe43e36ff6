import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(4, torch.get_num_threads())))


@pytest.fixture(scope="session")
def bigbuckbunny():
    from mdsgen.samples import bigbuckbunny

    return bigbuckbunny()


@pytest.fixture(scope="session")
def badger():
    from mdsgen.samples import tuxpaint_stamp

    return tuxpaint_stamp("animals/mammals/badger")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def video_20s(media_dir):
    from media import make_video

    return make_video(media_dir / "twenty.mp4", seconds=20.0, fps=10)


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory):
    """A T-size generator with untrained denoiser and VAE, saved as the library saves checkpoints."""
    from mdsgen.checkpoint import init_checkpoint, save_checkpoint
    from mdsgen.config import Params

    path = tmp_path_factory.mktemp("ckpt") / "untrained"
    save_checkpoint(init_checkpoint(Params(), seed=0), str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with a bucket, and the environment boto3 needs to reach it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    patch = pytest.MonkeyPatch()
    for k, v in env.items():
        patch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="mdsgen-test")
    yield "s3://mdsgen-test"
    patch.undo()
    server.stop()


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """S3 downloads land in a temporary cache, not the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MDSGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()
