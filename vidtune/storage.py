"""Where a sweep keeps its files: a folder (shared by every node on a cluster) or a cloud URI.

With a folder, trials read and write it directly. With a URI (``s3://bucket/prefix``,
``gs://...``, ``abfs://...``: whatever ``pyarrow.fs`` opens, credentials from the usual
environment), every node works in a local mirror of the URI and copies files across at fixed
points, so the rest of vidtune keeps plain file I/O:

- a trial pushes its ``last/`` (and ``best/`` when it improved) and ``history.jsonl`` before each
  report, so what Tune and MLflow have seen is always on the URI; a restarted or restored trial,
  on whatever node, pulls its work dir first;
- the sweep driver pushes the manifest and the frozen-model caches before the trials start, and
  pulls a trial's ``best/`` and history when the trial ends, to log them to MLflow;
- Ray Tune keeps its own experiment state on the URI (``storage_path``), so ``--resume`` works from
  any machine.

The decoded-clip cache stays on each node's local disk: it exists to be read through the page
cache, and a node rebuilds it from the videos faster than it would download it.

The mirror lives under ``$VIDTUNE_SCRATCH`` (default ``~/.cache/vidtune/storage``), one folder
per URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re


def is_uri(spec: str | None) -> bool:
    return bool(spec) and "://" in spec and not spec.startswith("file://")


class StorageError(ValueError):
    """``--storage`` (or the data) is not usable from every node; names the culprit."""


class SweepStorage:
    """``--storage`` as given: ``local`` is the folder vidtune reads and writes on this node."""

    def __init__(self, spec: str | None):
        spec = spec or "ray_results"
        if spec.startswith("file://"):
            spec = spec[len("file://"):]
        self.spec = spec
        self.uri = spec.rstrip("/") if is_uri(spec) else None
        if self.uri is None:
            self.local = os.path.abspath(spec)
            self._fs = None
            return
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.uri)[:60] + "-" + hashlib.sha1(self.uri.encode()).hexdigest()[:8]
        scratch = os.environ.get("VIDTUNE_SCRATCH") or os.path.join(os.path.expanduser("~"), ".cache", "vidtune", "storage")
        self.local = os.path.join(scratch, slug)
        self._fs = None  # opened on first use: the object is pickled to every trial
        self._best_pushed: dict[str, int] = {}  # work dir -> mtime of the best/ last pushed from here

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_best_pushed": {}}

    # -- the remote side
    @property
    def fs(self):
        if self._fs is None:
            import pyarrow.fs

            try:
                self._fs, self._root = pyarrow.fs.FileSystem.from_uri(self.uri)
            except Exception as e:  # unknown scheme, bad bucket name, missing credentials
                raise StorageError(f"--storage {self.uri}: cannot open it ({str(e).splitlines()[0][:200]})") from None
        return self._fs

    def remote(self, rel: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return f"{self._root.rstrip('/')}/{rel}".rstrip("/") if rel else self._root.rstrip("/")

    def path(self, *parts: str) -> str:
        """The local path of a file under the storage (the mirror's, for a URI)."""
        return os.path.join(self.local, *parts)

    def rel(self, local_path: str) -> str:
        rel = os.path.relpath(os.path.abspath(local_path), self.local)
        if rel.startswith(".."):
            raise ValueError(f"{local_path} is not under the storage folder {self.local}")
        return "" if rel == "." else rel.replace(os.sep, "/")

    def for_ray(self) -> str:
        """What Ray Tune and Ray Train get as ``storage_path``."""
        return self.uri or self.local

    def location(self, rel: str) -> str:
        """Where ``rel`` lives for Ray and for users: under the URI, else the folder."""
        return f"{self.for_ray()}/{rel}"

    def check(self) -> None:
        """Fail now, with the URI named, when this node cannot list or write it."""
        if self.uri is None:
            return
        import pyarrow.fs

        try:
            self.fs.create_dir(self.remote(""), recursive=True)
            with self.fs.open_output_stream(self.remote(".vidtune-probe")) as f:
                f.write(b"vidtune storage probe\n")
            self.fs.get_file_info(pyarrow.fs.FileSelector(self.remote(""), allow_not_found=True))
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"--storage {self.uri}: not writable from this machine ({str(e).splitlines()[0][:200]})") from None

    # -- copies between the mirror and the URI (no-ops for a folder)
    def push(self, local_path: str) -> None:
        """Copy a file or folder of the mirror to the URI (a folder's files replace the remote's;
        ``config.json`` last, as readers check it to know a checkpoint is whole)."""
        if self.uri is None or not os.path.exists(local_path):
            return
        import pyarrow.fs

        dest = self.remote(self.rel(local_path))
        if os.path.isfile(local_path):
            pyarrow.fs.copy_files(local_path, dest, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=self.fs)
            return
        files = []
        for root, _dirs, names in os.walk(local_path):
            files += [os.path.join(root, n) for n in names if not n.startswith(".")]
        files.sort(key=lambda p: os.path.basename(p) == "config.json")
        self.fs.create_dir(dest, recursive=True)
        for p in files:
            rel = os.path.relpath(p, local_path).replace(os.sep, "/")
            pyarrow.fs.copy_files(p, f"{dest}/{rel}", source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=self.fs)

    def pull(self, local_path: str, overwrite: bool = False) -> bool:
        """Copy a file or folder from the URI into the mirror; True when something came. An
        existing local copy is kept unless ``overwrite`` (this node wrote it, or got it earlier)."""
        if self.uri is None or (os.path.exists(local_path) and not overwrite):
            return False
        import pyarrow.fs

        src = self.remote(self.rel(local_path))
        info = self.fs.get_file_info(src)
        if info.type == pyarrow.fs.FileType.NotFound:
            return False
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        if info.type == pyarrow.fs.FileType.File:
            tmp = f"{local_path}.{os.getpid()}.part"
            pyarrow.fs.copy_files(src, tmp, source_filesystem=self.fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
            os.replace(tmp, local_path)
            return True
        # Into a fresh folder, then swapped in whole: a reader never sees a half-fetched checkpoint.
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local_path)}-pull-", dir=os.path.dirname(local_path) or ".")
        try:
            pyarrow.fs.copy_files(src, tmp, source_filesystem=self.fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
            if os.path.exists(local_path):
                old = f"{local_path}.old-{os.getpid()}"
                os.replace(local_path, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, local_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the storage's top-level folders starting with ``prefix``, oldest first."""
        if self.uri is None:
            import glob

            found = sorted(glob.glob(os.path.join(self.local, f"{prefix}*")), key=os.path.getmtime)
            return [os.path.basename(p) for p in found if os.path.isdir(p)]
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.remote(""), allow_not_found=True))
        # Sweep names end in a sortable timestamp; object stores give folders no mtime.
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix))

    # -- a trial's work dir
    def pull_trial(self, work_dir: str) -> None:
        """Before a trial (re)starts on this node: its checkpoints, history and failure mark."""
        if self.uri is None:
            return
        from vidtune.train import FAILED_MARK, HISTORY

        for name in ("last", "best", HISTORY, FAILED_MARK):
            self.pull(os.path.join(work_dir, name), overwrite=True)

    def push_trial(self, work_dir: str) -> None:
        """After an epoch, before Tune hears of it; ``best/`` only when it changed since the last push."""
        if self.uri is None:
            return
        from vidtune.train import HISTORY

        best = os.path.join(work_dir, "best")
        with contextlib.suppress(OSError):
            stamp = os.stat(os.path.join(best, "config.json")).st_mtime_ns
            if self._best_pushed.get(work_dir) != stamp:
                self.push(best)
                self._best_pushed[work_dir] = stamp
        self.push(os.path.join(work_dir, "last"))
        self.push(os.path.join(work_dir, HISTORY))

    def pull_finished_trial(self, work_dir: str) -> None:
        """When a trial ends, for MLflow: its best checkpoint and history, from wherever it ran."""
        if self.uri is None:
            return
        from vidtune.train import HISTORY

        with contextlib.suppress(Exception):  # a trial that never reported has nothing to fetch
            self.pull(os.path.join(work_dir, "best"), overwrite=True)
            self.pull(os.path.join(work_dir, HISTORY), overwrite=True)

    def fetch_inputs(self, manifest_rel: str, cache_files: list[str]) -> tuple[str, str]:
        """In a trial process: the sweep's manifest and the frozen-model caches it computed once,
        fetched to this node when missing; returns ``(manifest path, cache folder)``."""
        manifest_path = self.path(manifest_rel)
        self.pull(manifest_path)
        for rel in cache_files:
            self.pull(self.path(rel))
        return manifest_path, self.path("cache")
