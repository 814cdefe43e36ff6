"""Every path-taking part also takes s3:// URIs (moto's S3 server on 127.0.0.1)."""
import pytest
import torch

from mdsgen.base import storage
from mdsgen.base.errors import CheckpointError
from mdsgen.config import Params
from mdsgen.model.checkpoint import init_checkpoint, load_checkpoint, save_checkpoint
from mdsgen.model.encoders import CAVPEncoder, build_frame_encoder
from mdsgen.model.vae import MelVAE, load_vae


def test_bytes_round_trip(s3_server, tmp_path):
    uri = f"{s3_server}/blobs/a.bin"
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    with storage.local_file(uri) as path:
        assert path.read_bytes() == b"hello"
    with pytest.raises(FileNotFoundError, match="blobs/missing"):
        storage.read_bytes(f"{s3_server}/blobs/missing")
    storage.write_bytes(tmp_path / "x" / "b.bin", b"local")
    assert storage.read_bytes(tmp_path / "x" / "b.bin") == b"local"


def test_folder_cache_refreshes_when_objects_change(s3_server, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("one")
    storage.upload_dir(tmp_path / "d", f"{s3_server}/folder")
    assert (storage.local_dir(f"{s3_server}/folder") / "f.txt").read_text() == "one"
    (tmp_path / "d" / "f.txt").write_text("two")
    storage.upload_dir(tmp_path / "d", f"{s3_server}/folder")
    assert sorted(p.name for p in storage.local_dir(f"{s3_server}/folder").iterdir()) == ["f.txt"]  # no manifest
    assert (storage.local_dir(f"{s3_server}/folder") / "f.txt").read_text() == "two"
    # a prefix written object by object (request records): read as listed (a prefix of its own: the bucket is shared)
    storage.write_bytes(f"{s3_server}/loose-objects/a.jsonl", b"1")
    storage.write_bytes(f"{s3_server}/loose-objects/b.jsonl", b"2")
    assert sorted(p.name for p in storage.local_dir(f"{s3_server}/loose-objects").iterdir()) == ["a.jsonl", "b.jsonl"]
    with pytest.raises(FileNotFoundError, match="no objects"):
        storage.local_dir(f"{s3_server}/nothing-here")


def test_a_reader_never_mixes_two_versions_of_a_folder(s3_server, tmp_path, monkeypatch):
    """The manifest is written last and lists each file's ETag: a reader that meets a file already replaced by
    the next version retries and gets one whole version; files changed behind the manifest are refused."""
    monkeypatch.setattr(storage, "READ_ATTEMPTS", 3)
    monkeypatch.setenv("MDSGEN_CACHE", str(tmp_path / "cache"))
    folder = f"{s3_server}/versioned"
    for version in ("old", "new"):
        (tmp_path / version).mkdir()
        for name in ("a.txt", "b.txt"):
            (tmp_path / version / name).write_text(f"{version} {name}")
    storage.upload_dir(tmp_path / "old", folder)
    # a writer of "new" has replaced a.txt but not yet b.txt nor the manifest, while a reader reads
    storage.write_bytes(f"{folder}/a.txt", b"new a.txt")
    reads = []
    real = storage._folder_files

    def writer_finishes_during_the_read(*args):
        reads.append(1)
        if len(reads) == 2:
            storage.upload_dir(tmp_path / "new", folder)
        return real(*args)

    monkeypatch.setattr(storage, "_folder_files", writer_finishes_during_the_read)
    got = storage.local_dir(folder)
    assert len(reads) == 2 and [(got / n).read_text() for n in ("a.txt", "b.txt")] == ["new a.txt", "new b.txt"]
    storage.write_bytes(f"{folder}/b.txt", b"edited behind the manifest")
    assert (storage.local_dir(folder) / "b.txt").read_text() == "new b.txt"  # the cached whole version
    monkeypatch.setenv("MDSGEN_CACHE", str(tmp_path / "fresh-cache"))
    with pytest.raises(RuntimeError, match="kept changing behind its manifest"):
        storage.local_dir(folder)
    assert len(reads) == 3 + 3


@pytest.mark.parametrize("key", ["//etc/passwd-copy", "../outside.txt", "a/../../outside.txt"])
def test_keys_that_leave_their_prefix_are_refused(s3_server, tmp_path, monkeypatch, key):
    monkeypatch.setenv("MDSGEN_CACHE", str(tmp_path / "cache"))
    storage.write_bytes(f"{s3_server}/hostile/records/ok.jsonl", b"{}")
    storage.s3_client().put_object(Bucket=s3_server.split("/")[2], Key=f"hostile/records/{key}", Body=b"x")
    with pytest.raises(ValueError, match="leaves its prefix"):
        storage.local_dir(f"{s3_server}/hostile/records")
    assert not (tmp_path / "outside.txt").exists() and not any((tmp_path / "cache").rglob("outside.txt"))
    assert not any(p.name == "passwd-copy" for p in (tmp_path / "cache").rglob("*"))


def test_folder_outputs_replace_their_older_version_and_refuse_other_folders(s3_server, tmp_path):
    new = tmp_path / "new"
    (new / "vae").mkdir(parents=True)
    (new / "config.json").write_text("new")
    (new / "vae" / "w").write_text("w")
    older = tmp_path / "out"
    (older / "vae").mkdir(parents=True)
    (older / "config.json").write_text("old")
    (older / "vae" / "stale").write_text("s")
    storage.upload_dir(new, str(older))
    assert (older / "config.json").read_text() == "new" and sorted(p.name for p in (older / "vae").iterdir()) == ["w"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no temporary folder left behind
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.md, which this output does not have"):
        storage.upload_dir(new, str(project))
    assert (project / "notes.md").read_text() == "mine" and len(list(project.iterdir())) == 1
    # on S3: the older version's leftovers go once the new files are there
    storage.write_bytes(f"{s3_server}/ckpt/vae/stale", b"s")
    storage.upload_dir(new, f"{s3_server}/ckpt")
    keys = sorted(o["Key"] for o in storage._list_prefix(f"{s3_server}/ckpt"))
    assert keys == [f"ckpt/{storage.MANIFEST}", "ckpt/config.json", "ckpt/vae/w"]


def test_checkpoint_on_s3(s3_server):
    ckpt = init_checkpoint(Params(), seed=3)
    uri = f"{s3_server}/checkpoints/t"
    save_checkpoint(ckpt, uri)
    loaded = load_checkpoint(uri)
    for a, b in zip(ckpt.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.model.config == ckpt.model.config
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(f"{s3_server}/checkpoints/absent")


def test_vae_and_cavp_from_s3(s3_server, tmp_path):
    torch.manual_seed(0)
    vae = MelVAE.from_config("small").eval()
    vae.save(f"{s3_server}/vae/small")
    loaded = load_vae(f"{s3_server}/vae/small")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))

    from safetensors.torch import save_file

    cavp = CAVPEncoder()
    save_file({k: v.contiguous() for k, v in cavp.state_dict().items()}, str(tmp_path / "cavp.safetensors"))
    storage.write_bytes(f"{s3_server}/weights/cavp.safetensors", (tmp_path / "cavp.safetensors").read_bytes())
    again = build_frame_encoder({"name": "cavp", "weights": f"{s3_server}/weights/cavp.safetensors"})
    frames = torch.rand(1, 2, 3, 32, 32)
    assert torch.allclose(again(frames), cavp(frames), atol=1e-6)


@pytest.mark.slow  # builds, extracts and generates through S3
def test_dataset_features_and_generation_through_s3(s3_server, tmp_path, untrained_checkpoint):
    """The CLI reads and writes datasets, feature caches and outputs at s3:// URIs."""
    import json
    import subprocess
    import sys

    import yaml

    params = yaml.safe_load(open("params.yaml"))
    params["dataset"].update(classes=["dog"], clips_per_class=3, workers=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def mdsgen(*args):
        proc = subprocess.run([sys.executable, "-m", "mdsgen", *map(str, args)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc

    mdsgen("dataset", "build", "--out", f"{s3_server}/s3data/ds", "--params", tmp_path / "params.yaml")
    assert storage.exists(f"{s3_server}/s3data/ds/clips/dog_00002.mp4")
    mdsgen("features", f"{s3_server}/s3data/ds", f"{s3_server}/s3data/feat", "--workers", "1",
           "--params", tmp_path / "params.yaml")
    index = json.loads(storage.read_bytes(f"{s3_server}/s3data/feat/index.json"))
    assert sorted(index) == ["dog_00000", "dog_00001", "dog_00002"]
    mdsgen("generate", f"{s3_server}/s3data/ds/clips/dog_00001.mp4", "-o", f"{s3_server}/s3data/gen",
           "--checkpoint", untrained_checkpoint, "--steps", "2")
    assert storage.exists(f"{s3_server}/s3data/gen/dog_00001.wav")
    assert storage.exists(f"{s3_server}/s3data/gen/dog_00001.mp4")


KILLED_SWAP = """
import os, signal, sys
from pathlib import Path
from mdsgen.base import storage

renames = []
real_replace = os.replace
def replace(src, dst):
    renames.append((src, dst))
    if {kill_at} == len(renames):
        os.kill(os.getpid(), signal.SIGKILL)  # the worst moment: {what}
    real_replace(src, dst)
os.replace = replace
storage.upload_dir(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("kill_at,what", [(1, "before the old version moves aside"),
                                          (2, "the old version moved aside, the new one not yet in")])
def test_a_writer_killed_during_the_swap_loses_nothing(tmp_path, kill_at, what):
    import signal
    import subprocess
    import sys

    old, new = tmp_path / "model", tmp_path / "new"
    for folder, text in ((old, "old"), (new, "new")):
        (folder / "vae").mkdir(parents=True)
        (folder / "config.json").write_text(text)
        (folder / "vae" / "w").write_text(text)
    proc = subprocess.run([sys.executable, "-c", KILLED_SWAP.format(kill_at=kill_at, what=what), str(new), str(old)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (kill_at == 2) == (not old.exists())  # the killed writer left the old version parked beside
    assert (storage.local_dir(old) / "config.json").read_text() == "old"  # a reader puts it back
    assert (old / "vae" / "w").read_text() == "old"
    storage.upload_dir(new, str(old))  # the next writer succeeds
    assert (old / "config.json").read_text() == "new"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model."))
    assert len(leftovers) == 1 and ".new-" in leftovers[0]  # the killed writer's half copy, removed once stale


def test_stale_half_copies_are_removed(tmp_path):
    import os
    import time

    dest = tmp_path / "model"
    dest.mkdir()
    stale, fresh = tmp_path / ".model.new-dead", tmp_path / ".model.new-live"
    for copy in (stale, fresh):
        copy.mkdir()
        (copy / "part").write_text("x")
    hours_ago = time.time() - 2 * storage.STALE_COPY_SECONDS
    os.utime(stale, (hours_ago, hours_ago))
    storage.recover_interrupted_swap(dest)
    assert not stale.exists() and fresh.exists()  # a young one may belong to a writer still copying


KILLED_UPLOAD = """
import os, signal, sys
from mdsgen.base import storage

client = storage.s3_client()
real_put = client.put_object
def put_object(**kwargs):
    if kwargs["Key"].endswith(storage.MANIFEST):
        os.kill(os.getpid(), signal.SIGKILL)  # every new file is up, the manifest not yet
    return real_put(**kwargs)
client.put_object = put_object
storage.s3_client = lambda: client
storage.upload_dir(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("versioned", [True, False])
def test_a_writer_killed_during_an_s3_upload(s3_server, tmp_path, monkeypatch, versioned):
    """On a bucket with versioning the old version stays whole for readers; without it the reader refuses
    the mix (the old files are overwritten) and says why."""
    import signal
    import subprocess
    import sys

    import boto3

    monkeypatch.setattr(storage, "READ_ATTEMPTS", 2)
    bucket = f"mdsgen-killed-{'v' if versioned else 'u'}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    if versioned:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    folder = f"s3://{bucket}/ckpt"
    for version in ("old", "new"):
        (tmp_path / version / "vae").mkdir(parents=True)
        (tmp_path / version / "config.json").write_text(version)
        (tmp_path / version / "vae" / "w").write_text(version)
    storage.upload_dir(tmp_path / "old", folder)
    proc = subprocess.run([sys.executable, "-c", KILLED_UPLOAD, str(tmp_path / "new"), folder],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert storage.read_bytes(f"{folder}/config.json") == b"new"  # the new files did land
    monkeypatch.setenv("MDSGEN_CACHE", str(tmp_path / "cache"))
    if versioned:
        got = storage.local_dir(folder)
        assert (got / "config.json").read_text() == "old" and (got / "vae" / "w").read_text() == "old"
    else:
        with pytest.raises(RuntimeError, match="kept changing behind its manifest"):
            storage.local_dir(folder)
    storage.upload_dir(tmp_path / "new", folder)  # the next writer succeeds either way
    monkeypatch.setenv("MDSGEN_CACHE", str(tmp_path / "cache-after"))
    assert (storage.local_dir(folder) / "config.json").read_text() == "new"
