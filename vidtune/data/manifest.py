"""Parquet manifests: one row per video (or per trimmed segment), with what sampling needs.

Columns: ``path`` (absolute), ``label`` (int index into the class names), ``label_name``,
``split`` (train/val/test), ``num_frames``, ``fps``, ``width``, ``height``, ``start``/``end``
(seconds, null for the whole video). The class names travel in the file's schema metadata, so the
number of classes and their names always come from the data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vidtune.data.video import VideoError, probe

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
SPLITS = ("train", "val", "test")
META_KEY = b"vidtune.class_names"

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("start", pa.float64()),
        ("end", pa.float64()),
    ]
)


class DataError(ValueError):
    """Bad data input; the message names the file, row or label at fault."""


@dataclass
class Manifest:
    table: pa.Table
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def split(self, name: str) -> Manifest:
        mask = pa.compute.equal(self.table.column("split"), name)
        return Manifest(self.table.filter(mask), self.class_names)

    def class_counts(self, split: str | None = None) -> np.ndarray:
        part = self.split(split) if split else self
        return np.bincount(part.column("label"), minlength=self.num_classes)

    def fingerprint(self) -> str:
        """Content hash of the rows and class names (keys caches and preflight results)."""
        h = hashlib.sha256(json.dumps(self.class_names).encode())
        for col in ("path", "label", "split", "num_frames", "start", "end"):
            h.update(repr(self.table.column(col).to_pylist()).encode())
        return h.hexdigest()[:16]

    def save(self, path: str) -> str:
        write_manifest(self.table.replace_schema_metadata({META_KEY: json.dumps(self.class_names).encode()}), path)
        return path


def write_manifest(table: pa.Table, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # readers never see a half-written manifest


def read_manifest(path: str) -> Manifest:
    """Load and check a manifest written by vidtune."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet manifest ({e})") from None
    meta = table.schema.metadata or {}
    if META_KEY not in meta:
        raise DataError(f"{path}: not a vidtune manifest (no class names); build one with `vidtune data index`")
    class_names = json.loads(meta[META_KEY])
    missing = [c for c in SCHEMA.names if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: manifest lacks columns {missing}")
    labels = table.column("label").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{path}: row {row} ({table.column('path')[row]}) has label {int(labels[row])}, "
            f"outside the {len(class_names)} classes {class_names}"
        )
    return Manifest(table.select(SCHEMA.names).cast(SCHEMA), class_names)


def build_manifest(
    paths: list[str],
    labels: list,
    splits: list[str | None] | None = None,
    starts: list[float | None] | None = None,
    ends: list[float | None] | None = None,
    class_names: list[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    threads: int = 4,
    progress: bool = False,
) -> Manifest:
    """Probe every video and build a manifest; unreadable ones are left out and listed in ``skipped``.

    ``labels`` are class names or integer indices. Without ``class_names`` they are the sorted
    distinct labels. Rows without a split get one by a stable hash of their path, stratified per
    class, so re-indexing gives the same split.
    """
    n = len(paths)
    splits = list(splits) if splits is not None else [None] * n
    starts = list(starts) if starts is not None else [None] * n
    ends = list(ends) if ends is not None else [None] * n
    skipped: list[tuple[str, str]] = []

    if class_names is None:
        if all(_is_int(v) for v in labels):
            class_names = [str(i) for i in range(max(int(v) for v in labels) + 1)] if labels else []
        else:
            class_names = sorted({str(v) for v in labels})
    index_of = {name: i for i, name in enumerate(class_names)}
    label_ids: list[int | None] = []
    for path, value in zip(paths, labels):
        i = index_of.get(str(value), -1)
        if i < 0 and _is_int(value) and 0 <= int(value) < len(class_names):
            i = int(value)  # an integer label indexes the class list
        if i < 0:
            skipped.append((path, f"label {value!r} is not in the class list {class_names}"))
        label_ids.append(i if i >= 0 else None)

    keep = [k for k in range(n) if label_ids[k] is not None]
    infos: dict[int, object] = {}

    def _probe(k: int):
        try:
            return k, probe(paths[k]), None
        except VideoError as e:
            return k, None, str(e)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for done, (k, info, err) in enumerate(pool.map(_probe, keep), 1):
            if err:
                skipped.append((paths[k], err.split(": ", 1)[-1]))
            else:
                infos[k] = info
            if progress and (done == len(keep) or done % 50 == 0):
                print(f"\rindexing videos {done}/{len(keep)}", end="\n" if done == len(keep) else "", file=sys.stderr, flush=True)
    rows = [k for k in keep if k in infos]
    for k in rows:
        if splits[k] is not None and splits[k] not in SPLITS:
            raise DataError(f"{paths[k]}: split {splits[k]!r} is not one of {list(SPLITS)}")
    assigned = _assign_splits([paths[k] for k in rows], [label_ids[k] for k in rows], val_fraction, seed)
    table = pa.table(
        {
            "path": [os.path.abspath(paths[k]) for k in rows],
            "label": [label_ids[k] for k in rows],
            "label_name": [class_names[label_ids[k]] for k in rows],
            "split": [splits[k] or assigned[j] for j, k in enumerate(rows)],
            "num_frames": [infos[k].num_frames for k in rows],
            "fps": [infos[k].fps for k in rows],
            "width": [infos[k].width for k in rows],
            "height": [infos[k].height for k in rows],
            "start": [_float_or_none(starts[k]) for k in rows],
            "end": [_float_or_none(ends[k]) for k in rows],
        },
        schema=SCHEMA,
    )
    table = table.replace_schema_metadata({META_KEY: json.dumps(class_names).encode()})
    return Manifest(table, list(class_names), skipped)


def _assign_splits(paths: list[str], labels: list[int], val_fraction: float, seed: int) -> list[str]:
    out = ["train"] * len(paths)
    by_class: dict[int, list[int]] = {}
    first_row: dict[str, int] = {}
    for j, label in enumerate(labels):
        # Rows of one video (the segments of an untrimmed video) share a split, decided with its first row.
        if first_row.setdefault(paths[j], j) == j:
            by_class.setdefault(label, []).append(j)
    for members in by_class.values():
        ranked = sorted(members, key=lambda j: hashlib.sha1(f"{seed}:{os.path.basename(paths[j])}:{paths[j]}".encode()).hexdigest())
        num_val = round(len(ranked) * val_fraction) if len(ranked) > 1 else 0
        num_val = max(1, num_val) if len(ranked) > 1 and val_fraction > 0 else num_val
        for j in ranked[:num_val]:
            out[j] = "val"
    return [out[first_row[p]] for p in paths]


def index_source(source: str, val_fraction: float = 0.2, seed: int = 0, progress: bool = False) -> Manifest:
    """Index a folder-per-class tree (optionally under train/ val/ test/), an mmaction2-style list
    file (``relative/path label``) or a CSV (``path,label[,split,start,end]``)."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    if os.path.isdir(source):
        return _index_folder(source, val_fraction, seed, progress)
    if source.endswith(".parquet"):
        return read_manifest(source)
    if source.lower().endswith(".csv"):
        return _index_csv(source, val_fraction, seed, progress)
    return _index_list(source, val_fraction, seed, progress)


def _index_folder(root: str, val_fraction: float, seed: int, progress: bool) -> Manifest:
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    split_layout = bool(subdirs) and set(subdirs) <= set(SPLITS)
    paths, labels, splits = [], [], []
    for split in subdirs if split_layout else [None]:
        base = os.path.join(root, split) if split else root
        for cls in sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))):
            for dirpath, _, files in os.walk(os.path.join(base, cls)):
                for f in sorted(files):
                    if f.lower().endswith(VIDEO_EXTS):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(cls)
                        splits.append(split)
    if not paths:
        raise DataError(f"{root}: no videos ({', '.join(VIDEO_EXTS)}) in class sub-folders")
    class_names = _class_file(root) or sorted(set(labels))
    return _finish(build_manifest(paths, labels, splits, class_names=class_names, val_fraction=val_fraction, seed=seed, progress=progress), root)


def _index_list(path: str, val_fraction: float, seed: int, progress: bool) -> Manifest:
    base = os.path.dirname(os.path.abspath(path))
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
            paths.append(os.path.join(base, parts[0]))
            labels.append(parts[1])
    if not paths:
        raise DataError(f"{path}: no entries")
    labels = [int(v) if v.lstrip("-").isdigit() else v for v in labels]
    return _finish(build_manifest(paths, labels, class_names=_class_file(base), val_fraction=val_fraction, seed=seed, progress=progress), path)


def _index_csv(path: str, val_fraction: float, seed: int, progress: bool) -> Manifest:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns or "label" not in columns:
            raise DataError(f"{path}: CSV needs columns 'path' and 'label' (found {columns})")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise DataError(f"{path}: no rows")
    labels = [int(r["label"]) if r["label"].lstrip("-").isdigit() else r["label"] for r in rows]
    return _finish(
        build_manifest(
            [os.path.join(base, r["path"]) for r in rows],
            labels,
            splits=[r.get("split") or None for r in rows],
            starts=[r.get("start") or None for r in rows],
            ends=[r.get("end") or None for r in rows],
            class_names=_class_file(base),
            val_fraction=val_fraction,
            seed=seed,
            progress=progress,
        ),
        path,
    )


def _finish(manifest: Manifest, source: str) -> Manifest:
    if len(manifest) == 0:
        reasons = "; ".join(f"{p}: {r}" for p, r in manifest.skipped[:3])
        raise DataError(f"{source}: no readable videos ({len(manifest.skipped)} left out: {reasons})")
    return manifest


def _class_file(folder: str) -> list[str] | None:
    """``classes.txt`` beside the data fixes the class list and order (one name a line)."""
    path = os.path.join(folder, "classes.txt")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_data(path: str, progress: bool = False) -> Manifest:
    """``--data``: a manifest, a folder-per-class folder, a list file or a CSV."""
    if path.endswith(".parquet"):
        return read_manifest(path)
    return index_source(path, progress=progress)


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, str) and v.lstrip("-").isdigit()


def _float_or_none(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise DataError(f"start/end: expected seconds, got {v!r}") from None
