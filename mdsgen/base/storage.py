"""Local paths and s3://bucket/key URIs behind one small API.

S3 goes through boto3 with the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION) plus AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL for S3-compatible stores.
Writes are atomic on both sides: a reader never sees half a file. A folder written to S3 ends with a
manifest (`.mdsgen-manifest.json`, written last) listing each file's ETag; readers fetch exactly those
versions, so a reader never sees an old folder's files mixed with a new one's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

S3_PREFIX = "s3://"
MANIFEST = ".mdsgen-manifest.json"  # an S3 folder's complete file list, written last
READ_ATTEMPTS = 5


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: an S3 URI needs a bucket: s3://bucket/key")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def s3_client():
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint)


def exists(uri: str | os.PathLike) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(str(uri))
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/"), MaxKeys=1)
    return listing.get("KeyCount", 0) > 0


def read_bytes(uri: str | os.PathLike) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(str(uri))
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:  # botocore raises a family of errors; name the object in all of them
        raise FileNotFoundError(f"{uri}: cannot read from S3 ({err})") from err


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)  # an S3 PUT is atomic
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder to a local path or an S3 prefix (files keep their relative paths), replacing
    an older version of the same output there. A folder holding anything the new output does not (the
    project root, say) is refused, never deleted.

    On S3 the manifest, written last, lists each file's ETag and, on a bucket with versioning, its
    version: a writer killed halfway leaves the old manifest, by which readers still get the old version
    whole (versioned bucket) or a clear refusal (unversioned: the old files are overwritten)."""
    local_dir = Path(local_dir)
    if not is_s3(uri):
        _replace_local_dir(local_dir, Path(uri))
        return
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/")
    client = s3_client()
    written = {}
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        key = "/".join([prefix, file.relative_to(local_dir).as_posix()]).lstrip("/")
        client.upload_file(str(file), bucket, key)
        head = client.head_object(Bucket=bucket, Key=key)
        written[key] = {"etag": head["ETag"], **({"version": head["VersionId"]} if head.get("VersionId") else {})}
    listed = {o["Key"] for o in _list_prefix(uri)}
    manifest_key = "/".join([prefix, MANIFEST]).lstrip("/")
    files = {key[len(prefix) + 1 if prefix else 0:]: entry for key, entry in sorted(written.items())}
    client.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps({"files": files}, indent=1).encode())
    # then the older version's leftovers: readers go by the manifest, so none of them reads these any more
    stale = [key for key in listed if key not in written and key != manifest_key]
    for start in range(0, len(stale), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[start:start + 1000]]})


STALE_COPY_SECONDS = 3600  # a `.<name>.new-*` copy untouched this long was left by a writer that died


def recover_interrupted_swap(dest: Path) -> None:
    """Undo what a writer killed inside `_replace_local_dir` left: the old version parked at `.<name>.old-*`
    while `dest` is missing goes back to `dest`, empty placeholders go; half-written copies (`.<name>.new-*`) older than
    `STALE_COPY_SECONDS` are removed (a younger one may belong to a writer still running)."""
    parked = []
    for place in dest.parent.glob(f".{dest.name}.old-*"):
        if any(place.iterdir()):
            parked.append(place)
        else:  # the placeholder of a writer killed before its first rename
            place.rmdir()
    if parked and not dest.exists():
        os.replace(max(parked, key=lambda p: p.stat().st_mtime), dest)
        print(f"{dest}: restored the version a killed writer had moved aside", file=sys.stderr)
    now = time.time()
    for copy in dest.parent.glob(f".{dest.name}.new-*"):
        if now - copy.stat().st_mtime > STALE_COPY_SECONDS:
            shutil.rmtree(copy, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (so a rename in it survives a crash), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # files before the folders naming them
        _fsync(path)
    _fsync(root)


def _replace_local_dir(source: Path, dest: Path) -> None:
    """Copy `source` beside `dest` under a unique name, then swap it in by two renames: a reader sees the
    old folder or the new one. A writer killed between the renames leaves the old one parked beside; the
    next writer or reader of `dest` (`recover_interrupted_swap`) puts it back."""
    recover_interrupted_swap(dest)
    if dest.is_dir():
        foreign = {p.name for p in dest.iterdir()} - {p.name for p in source.iterdir()}
        if foreign:
            raise FileExistsError(f"{dest}: holds {', '.join(sorted(foreign)[:5])}, which this output does not "
                                  f"have; refusing to replace it (remove it or choose another folder)")
    elif dest.exists():
        raise FileExistsError(f"{dest}: exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.new-"))
    try:
        shutil.copytree(source, tmp, copy_function=shutil.copyfile, dirs_exist_ok=True)  # fresh files, default modes
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _fsync_tree(tmp)  # the new version is on disk before any rename points at it
        if dest.is_dir():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, old)  # onto the empty placeholder
            os.replace(tmp, dest)
            _fsync(dest.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
            _fsync(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _list_prefix(uri: str) -> list[dict]:
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/"
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    objects = [obj for page in pages for obj in page.get("Contents", [])]
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects under this S3 prefix")
    return objects


def cache_dir() -> Path:
    return Path(os.environ.get("MDSGEN_CACHE", Path.home() / ".cache" / "mdsgen"))


@contextlib.contextmanager
def local_file(uri: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A local path for reading `uri`: the path itself, or a temporary download of the S3 object."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="mdsgen-") as tmp:
        path = Path(tmp, "object" + (suffix or Path(split_s3(str(uri))[1]).suffix))
        path.write_bytes(read_bytes(uri))
        yield path


def local_dir(uri: str | os.PathLike) -> Path:
    """A local folder holding `uri`: the folder itself, or a cached download of the S3 prefix.

    An S3 folder with a manifest is read as the manifest lists it, each object fetched only if it still
    has the listed ETag: while a writer replaces the folder the read is retried, and a folder whose files
    were changed behind its manifest is refused. A prefix without one (request records, a user's files)
    is read as listed. The cache key covers every ETag, so a changed object is fetched again; downloads
    go to a temporary folder renamed when complete, so an interrupted download never looks finished.
    """
    if not is_s3(uri):
        path = Path(uri)
        recover_interrupted_swap(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: no such folder")
        return path
    from botocore.exceptions import ClientError

    uri = str(uri)
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/"
    for attempt in range(READ_ATTEMPTS):
        files = _folder_files(uri, bucket, prefix)
        try:
            return _download(uri, bucket, prefix, files)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                raise
            changed = err
        if attempt < READ_ATTEMPTS - 1:
            time.sleep(0.2 * 2 ** attempt)
    raise RuntimeError(f"{uri}: its files kept changing behind its manifest ({MANIFEST}) over {READ_ATTEMPTS} reads; "
                       f"a folder must be written whole (mdsgen writes it so), not file by file") from changed


def _folder_files(uri: str, bucket: str, prefix: str) -> dict[str, dict]:
    """{key: {"etag", "version"?}} of an S3 folder: its manifest's files, else every object under the prefix."""
    from botocore.exceptions import ClientError

    try:
        body = s3_client().get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise
        return {o["Key"]: {"etag": o.get("ETag", "")} for o in _list_prefix(uri) if o["Key"] != prefix + MANIFEST}
    return {prefix + name: entry if isinstance(entry, dict) else {"etag": entry}  # older manifests: ETags only
            for name, entry in json.loads(body)["files"].items()}


def _download(uri: str, bucket: str, prefix: str, files: dict[str, dict]) -> Path:
    fingerprint = "\n".join([uri] + [f"{key} {entry['etag']} {entry.get('version', '')}"
                                     for key, entry in sorted(files.items())])
    dest = cache_dir() / "s3" / hashlib.sha256(fingerprint.encode()).hexdigest()[:20]
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".download-"))
    client = s3_client()
    try:
        for key, entry in files.items():
            target = (tmp / key[len(prefix):]).resolve()
            if tmp.resolve() not in target.parents:  # 'prefix//etc/x' or '../x' must not land outside
                raise ValueError(f"s3://{bucket}/{key}: the key leaves its prefix {uri}; refusing to download it")
            target.parent.mkdir(parents=True, exist_ok=True)
            pinned = ({"VersionId": entry["version"]} if entry.get("version") else
                      {"IfMatch": entry["etag"]} if entry["etag"] else {})
            body = client.get_object(Bucket=bucket, Key=key, **pinned)["Body"]
            with open(target, "wb") as out:
                for chunk in body.iter_chunks(1 << 20):
                    out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@contextlib.contextmanager
def staged_output(uri: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write `uri`'s content into: the folder itself, or for an S3 prefix a temporary
    copy of what is already there (so incremental steps see it), uploaded when the block succeeds."""
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="mdsgen-out-") as tmp:
        if exists(uri):
            shutil.copytree(local_dir(uri), tmp, dirs_exist_ok=True)
        yield Path(tmp)
        upload_dir(tmp, str(uri))


def local_input(uri: str | os.PathLike) -> Path:
    """A local path for an input file or folder: itself, or a cached download of the S3 object/prefix."""
    if not is_s3(uri):
        recover_interrupted_swap(Path(uri))
        return Path(uri)
    bucket, key = split_s3(str(uri))
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=2)
    keys = [o["Key"] for o in listing.get("Contents", [])]
    if keys == [key]:  # a single object
        target = cache_dir() / "s3-files" / hashlib.sha256(str(uri).encode()).hexdigest()[:20] / Path(key).name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(target, read_bytes(uri))
        return target
    return local_dir(uri)
