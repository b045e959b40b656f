"""Where a dataset or a features directory lives: a local path or any filesystem's URI.

    loc = resolve("s3://bucket/feat")      # pyarrow's S3FileSystem, path "bucket/feat"
    loc = resolve("gs://bucket/feat")      # pyarrow's GcsFileSystem
    loc = resolve("memory://feat")         # any other fsspec protocol, via FSSpecHandler
    loc = resolve("/data/feat")            # a local path (and file:// URIs)
    loc.join("manifest.json").read_text()

`s3://` and `gs://` use pyarrow's own filesystems, with their usual credentials (the
environment, `~/.aws`, the machine's service account); query parameters of the URI
(`?region=...`, `?endpoint_override=...`) are theirs. Any other scheme that fsspec knows
(`memory://`, `abfs://`, `hf://`, ...) is wrapped with `pyarrow.fs.FSSpecHandler`, so the
Parquet reader and writer see one interface.

An object store has no atomic rename of a directory. What is written there is made
visible by a completion marker written last (the directory's manifest, as Spark and
Hadoop write `_SUCCESS`): `upload_tree` copies every other file first, and readers refuse
a directory without its manifest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs as pafs

from funnelrec.errors import FunnelrecError

# Schemes pyarrow resolves itself (`FileSystem.from_uri`); others go through fsspec.
_PYARROW_SCHEMES = {"file", "s3", "gs", "gcs", "hdfs", "viewfs"}
# Files uploaded side by side.
UPLOAD_THREADS = 8


@dataclass(frozen=True)
class Location:
    """A path on a filesystem: `fs` (a pyarrow filesystem), `path` inside it, and the
    `uri` it was given as (for messages and manifests)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local(self) -> Path:
        """The local path (only for a local location)."""
        if not self.is_local:
            raise FunnelrecError(f"{self.uri}: not on a local filesystem")
        return Path(self.path)

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri)

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return bool(self.info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        return bool(self.info().type == pafs.FileType.File)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return bytes(f.read())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def files(self, pattern: Callable[[str], bool] = lambda name: True) -> list[Location]:
        """The files directly in this folder whose names pass `pattern`, sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
        return [self.join(n) for n in names if pattern(n)]

    def delete(self) -> None:
        """Remove this folder and everything under it (nothing if it is not there)."""
        if self.exists():
            self.fs.delete_dir(self.path)


def resolve(uri: str | Path) -> Location:
    """The filesystem and path of a local path or a URI (see the module docstring)."""
    if isinstance(uri, Path) or "://" not in uri:
        return Location(pafs.LocalFileSystem(), str(Path(uri).absolute()), str(uri))
    scheme = urlparse(uri).scheme
    if not scheme:
        raise FunnelrecError(f"{uri}: a URI needs a scheme (s3://, gs://, file://, ...)")
    if scheme in _PYARROW_SCHEMES:
        try:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError, ImportError) as e:
            raise FunnelrecError(f"{uri}: cannot open its filesystem ({e})") from None
        return Location(filesystem, path, uri)
    import fsspec.core  # type: ignore[import-untyped]

    try:
        fsspec_fs, path = fsspec.core.url_to_fs(uri)
    except ValueError as e:
        raise FunnelrecError(
            f"{uri}: unknown filesystem scheme '{scheme}://' ({e}); funnelrec reads and "
            "writes local paths, file://, s3://, gs:// and any scheme fsspec knows"
        ) from None
    except ImportError as e:
        raise FunnelrecError(
            f"{uri}: the '{scheme}://' filesystem needs a package that is not installed ({e})"
        ) from None
    return Location(pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs)), path, uri)


def require_empty(loc: Location, *, force: bool, marker: str) -> None:
    """Raise unless `loc` is free to write to; with `force`, clear what is there.

    The marker of a finished directory goes first, so that a reader never takes the
    half-deleted directory for a finished one."""
    if not loc.exists():
        return
    if not force:
        raise FunnelrecError(f"{loc.uri} already exists (use --force to overwrite)")
    for file in loc.files(lambda n: n == marker):
        loc.fs.delete_file(file.path)
    loc.delete()


def upload_tree(local: Path, dest: Location, *, marker: str) -> None:
    """Copy the folder `local` to `dest`, the file `marker` last: until it is there, a
    reader sees an unfinished directory and refuses it."""
    if not (local / marker).is_file():
        raise FunnelrecError(f"{local}: no {marker} to mark the upload finished")
    dest.fs.create_dir(dest.path, recursive=True)
    here = pafs.LocalFileSystem()

    def put(rel: str) -> None:
        target = dest.join(rel)
        dest.fs.create_dir(target.path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(
            str(local / rel), target.path, source_filesystem=here, destination_filesystem=dest.fs
        )

    rels = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    # several files at once: an object store's latency, not its bandwidth, bounds one
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        list(pool.map(put, [r for r in rels if r != marker]))
    put(marker)


def download_tree(
    src: Location, local: Path, *, skip: Callable[[str], bool] = lambda rel: False
) -> None:
    """Copy the folder `src` into the local folder `local`, but the files whose relative
    path `skip` names."""
    infos = src.fs.get_file_info(pafs.FileSelector(src.path, recursive=True))
    root = src.path.rstrip("/") + "/"
    here = pafs.LocalFileSystem()
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path.removeprefix(root).lstrip("/")
        if skip(rel):
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            info.path, str(target), source_filesystem=src.fs, destination_filesystem=here
        )


class LocalCopy:
    """A local temporary folder holding a copy of (part of) a remote folder; removed
    when this object is collected or `close`d, by the process that made it only (a copy
    of this object sent to a worker process must not remove the folder under it)."""

    def __init__(self, src: Location, *, skip: Callable[[str], bool] = lambda rel: False) -> None:
        self.owner: int | None = os.getpid()
        self.path = Path(tempfile.mkdtemp(prefix="funnelrec-"))
        try:
            download_tree(src, self.path, skip=skip)
        except BaseException:
            self.close()
            raise

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "owner": None}  # a copy never removes the folder

    def close(self) -> None:
        if os.getpid() == self.owner:
            shutil.rmtree(self.path, ignore_errors=True)

    def __del__(self) -> None:
        self.close()
