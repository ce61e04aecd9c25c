"""The result store: every finished object on disk before it is announced, so nothing is lost to a dropped
connection or a crashed server.

Layout: ``<store>/<job_id>/job.json`` (the request and its state) and, per object, ``<index>.glb`` (mesh, UVs,
normals and texture: everything the result message carries), ``<index>.png`` (preview) and ``<index>.json``
(metadata). Each file is written beside its final name and renamed, so a reader never sees half a file; an object
counts as stored once its metadata file exists (written last).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["ResultStore"]

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id or ""):
            raise KeyError(job_id)  # never a path from the wire
        return self.root / job_id

    def save_job(self, job_id: str, record: dict[str, Any]) -> None:
        d = self._dir(job_id)
        d.mkdir(exist_ok=True)
        _atomic_write(d / "job.json", json.dumps(record, indent=1).encode())

    def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            p = self._dir(job_id) / "job.json"
        except KeyError:
            return None
        return json.loads(p.read_text()) if p.is_file() else None

    def save_result(self, job_id: str, index: int, glb: bytes, preview: bytes, metadata: dict[str, Any]) -> Path:
        d = self._dir(job_id)
        d.mkdir(exist_ok=True)
        _atomic_write(d / f"{index}.glb", glb)
        _atomic_write(d / f"{index}.png", preview)
        _atomic_write(d / f"{index}.json", json.dumps(metadata, indent=1).encode())  # last: marks it complete
        return d / f"{index}.glb"

    def indices(self, job_id: str) -> list[int]:
        """The indices of the stored objects of a job (complete ones only: their metadata file exists), in order."""
        try:
            d = self._dir(job_id)
        except KeyError:
            return []
        return sorted(int(p.stem) for p in d.glob("[0-9]*.json")) if d.is_dir() else []

    def result(self, job_id: str, index: int) -> tuple[dict[str, Any], bytes, bytes | None]:
        """(metadata, glb bytes, preview png bytes or None) of one stored object."""
        d = self._dir(job_id)
        png = d / f"{index}.png"
        return (json.loads((d / f"{index}.json").read_text()), (d / f"{index}.glb").read_bytes(),
                png.read_bytes() if png.is_file() else None)

    def jobs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _JOB_ID.match(p.name))
