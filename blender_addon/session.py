"""The extension's state on the main thread: the connection, the job running now, the populate queue, the history.

The UI path never blocks: operators submit and return; a timer (``pump``) drains the connection's events within a
time budget and applies them (progress fields, the preview image, imports). In ``blender -b`` timers never fire, so
the same operators call ``wait``, which drains the same events blocking until their job ends.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bpy

from .connection import Connection, thumbnail_name

__all__ = ["Session", "session", "Task"]

PREVIEW_IMAGE = "HoloFusion Preview"
HISTORY_SIZE = 24


@dataclass
class Task:
    tag: int
    spec: dict[str, Any] | None
    on_result: Callable[[Any], None]
    on_end: Callable[[str, str | None], None]
    """(state: done / cancelled / failed, error sentence or None)"""
    job_id: str | None = None
    fetch: str | None = None


@dataclass
class Status:
    stage: str = ""
    step: int = 0
    total: int = 0
    eta_s: float = 0.0
    line: str = ""
    """Per-item progress of a populate run."""
    message: str = ""
    """The last error or notice, in words."""


@dataclass
class Populate:
    items: list[dict[str, Any]]
    target: Any
    index: int = 0
    made: list[Any] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stop_after_current: bool = False


class Session:
    def __init__(self):
        self.conn: Connection | None = None
        self.welcome: dict[str, Any] | None = None
        self.state = "disconnected"  # connecting / connected / lost
        self.tasks: dict[int, Task] = {}
        self.current: Task | None = None
        self.queue: list[Task] = []
        self.status = Status()
        self.populate: Populate | None = None
        self.local_backend: subprocess.Popen | None = None
        self._tag = 0

    # ------------------------------------------------------------------ connection
    def user_dir(self) -> Path:
        try:
            return Path(bpy.utils.extension_path_user(__package__, create=True))
        except (ValueError, AttributeError):  # not installed as an extension (e.g. a legacy add-on)
            path = Path(tempfile.gettempdir()) / "holofusion-blender"
            path.mkdir(exist_ok=True)
            return path

    def connect(self, connection: str | dict, timeout_s: float = 1.0) -> None:
        self.disconnect()
        self.conn = Connection(connection, timeout_s, str(self.user_dir() / "preview.png"),
                               str(self.thumb_dir()))
        self.state = "connecting"
        self.status.message = ""
        self.conn.start()

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.state == "connecting" and time.monotonic() < deadline:
            self._apply_one(timeout=0.05)
        return self.state == "connected"

    def disconnect(self) -> None:
        if self.conn is not None:
            self.conn.stop()
            self.conn = None
        for task in [t for t in [self.current, *self.queue] if t is not None]:
            task.on_end("failed", "disconnected from the backend")
        self.current, self.queue, self.tasks = None, [], {}
        self.populate = None
        self.state = "disconnected"

    def start_local_backend(self, python: str, args: list[str], connection_file: Path) -> None:
        """Starts ``python -m holofusion.cli serve`` writing ``connection_file``; stopped by ``stop_local_backend``."""
        self.stop_local_backend()
        if connection_file.exists():
            connection_file.unlink()
        log = open(self.user_dir() / "backend.log", "wb")
        self.local_backend = subprocess.Popen([python, "-m", "holofusion.cli", "serve", "--connection-file",
                                               str(connection_file), *args], stdout=log, stderr=subprocess.STDOUT)

    def stop_local_backend(self) -> None:
        proc, self.local_backend = self.local_backend, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ------------------------------------------------------------------ jobs
    def busy(self) -> bool:
        return self.current is not None or bool(self.queue)

    def submit(self, spec: dict[str, Any] | None, on_result: Callable[[Any], None],
               on_end: Callable[[str, str | None], None], fetch: str | None = None) -> Task:
        if self.conn is None or self.state != "connected":
            raise RuntimeError("not connected to a HoloFusion backend: press Connect first")
        self._tag += 1
        task = Task(self._tag, spec, on_result, on_end, fetch=fetch)
        self.tasks[task.tag] = task
        if fetch is not None:
            self.conn.fetch(task.tag, fetch)
        else:
            self.conn.generate(task.tag, spec)
        if self.current is None:
            self.current = task
        else:
            self.queue.append(task)
        return task

    def cancel(self) -> None:
        if self.populate is not None:
            self.populate.stop_after_current = True
        if self.current is not None and self.conn is not None:
            self.conn.cancel(self.current.job_id)

    def wait(self, task: Task, timeout_s: float = 3600.0) -> None:
        """Blocks until ``task`` ended (the ``blender -b`` path), applying every event on the way."""
        deadline = time.monotonic() + timeout_s
        while task.tag in self.tasks and time.monotonic() < deadline:
            self._apply_one(timeout=0.1)
        if task.tag in self.tasks:
            raise TimeoutError(f"the backend did not finish in {timeout_s:.0f} s")

    # ------------------------------------------------------------------ events
    def pump(self, budget_s: float = 0.008) -> bool:
        """Applies queued events for at most ``budget_s`` (imports run to completion); True if any was applied."""
        t0, any_ = time.perf_counter(), False
        while time.perf_counter() - t0 < budget_s:
            if not self._apply_one(timeout=0):
                break
            any_ = True
        return any_

    def _apply_one(self, timeout: float) -> bool:
        if self.conn is None:
            if timeout:
                time.sleep(timeout)
            return False
        try:
            kind, tag, payload = self.conn.events.get(timeout=timeout) if timeout else self.conn.events.get_nowait()
        except queue.Empty:
            return False
        task = self.tasks.get(tag) if tag is not None else None
        if kind == "welcome":
            self.welcome, self.state = payload, "connected"
        elif kind == "lost":
            self.state = "lost"
            self.status.message = f"Backend lost: {payload}"
            for t in [t for t in [self.current, *self.queue] if t is not None]:
                self._end(t, "failed", self.status.message)
            self.conn = None
        elif kind == "accepted" and task is not None:
            task.job_id = payload
        elif kind == "error" and task is not None:
            code, sentence = payload
            self.status.message = sentence
            self._end(task, "failed", sentence)
        elif kind == "preview" and task is not None:
            self._preview(payload)
        elif kind == "message" and task is not None:
            self._message(task, payload)
        return True

    def _message(self, task: Task, m) -> None:
        t, c = m.msg_type, m.content
        if t == "progress":
            self.status.stage, self.status.step, self.status.total = c["stage"], c["step"], c["total"]
            self.status.eta_s = c["eta_s"]
        elif t == "result":
            task.on_result(m)
        elif t in ("done", "cancelled"):
            self._end(task, "done" if t == "done" else "cancelled", None)

    def _end(self, task: Task, state: str, error: str | None) -> None:
        self.tasks.pop(task.tag, None)
        if self.current is task:
            self.current = self.queue.pop(0) if self.queue else None
        elif task in self.queue:
            self.queue.remove(task)
        self.status.stage, self.status.step, self.status.total = "", 0, 0
        task.on_end(state, error)

    def _preview(self, path: str) -> None:
        # The connection thread wrote the file; reload() only marks the image stale (Blender decodes it when the
        # panel draws), so a preview costs the main thread almost nothing.
        img = bpy.data.images.get(PREVIEW_IMAGE)
        if img is None:
            img = bpy.data.images.load(path)
            img.name = PREVIEW_IMAGE
            img.preview_ensure()
        else:
            img.reload()

    # ------------------------------------------------------------------ history
    def history_file(self) -> Path:
        return self.user_dir() / "history.json"

    def history(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self.history_file().read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    def thumb_dir(self) -> Path:
        return self.user_dir() / "thumbs"

    def thumbnail(self, item: dict[str, Any]) -> Path | None:
        """The history item's thumbnail file (written by the connection thread with the result), if there is one."""
        if not item.get("job_id") or item.get("seed") is None:
            return None
        p = self.thumb_dir() / thumbnail_name(item["job_id"], item["seed"])
        return p if p.is_file() else None

    def remember(self, meta: dict[str, Any]) -> None:
        items = [h for h in self.history() if (h.get("job_id"), h.get("seed")) != (meta.get("job_id"), meta.get("seed"))]
        items.insert(0, {k: meta.get(k) for k in ("job_id", "model", "category", "seed", "preset")})
        kept = {thumbnail_name(h["job_id"], h["seed"]) for h in items[:HISTORY_SIZE] if h.get("job_id")}
        if self.thumb_dir().is_dir():  # thumbnails of items that fell off the history go with them
            for p in self.thumb_dir().glob("*.png"):
                if p.name not in kept:
                    p.unlink(missing_ok=True)
        tmp = self.history_file().with_suffix(".partial")
        tmp.write_text(json.dumps(items[:HISTORY_SIZE], indent=1))
        os.replace(tmp, self.history_file())


session = Session()
