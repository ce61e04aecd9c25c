"""The link to the backend: a thread that owns the ZeroMQ socket (sockets are not thread-safe, and a blocking call on
Blender's main thread freezes the UI), with a command queue in and an event queue out. Nothing here touches ``bpy``:
the main thread drains the events (a timer in the UI, a blocking wait in ``blender -b``) and applies them.

Events are plain tuples ``(kind, tag, payload)``: ``welcome`` (the backend's hello answer), ``accepted`` (job id),
``message`` (a wire ``Message``: progress, preview, result, done, cancelled), ``error`` (code, sentence) and ``lost``
(sentence: the backend stopped answering).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from .wire.client import BackendError, BackendLost, Client

__all__ = ["Connection"]

TERMINAL = ("done", "cancelled")


class Connection(threading.Thread):
    def __init__(self, connection: str | dict[str, Any], timeout_s: float = 1.0, preview_path: str | None = None,
                 thumb_dir: str | None = None):
        super().__init__(name="holofusion-connection", daemon=True)
        self.connection, self.timeout_s = connection, timeout_s
        self.preview_path = preview_path
        """Where this thread writes each live preview PNG (file work stays off Blender's main thread)."""
        self.thumb_dir = thumb_dir
        """Where this thread keeps each result's preview as ``<job_id>_<seed>.png``, the history's thumbnails."""
        self.commands: queue.Queue[tuple] = queue.Queue()
        self.events: queue.Queue[tuple] = queue.Queue()
        self.welcome: dict[str, Any] | None = None
        self._halt = threading.Event()
        self._later: list[tuple] = []

    # ------------------------------------------------------------------ main thread side
    def generate(self, tag: int, spec: dict[str, Any]) -> None:
        self.commands.put(("generate", tag, spec))

    def fetch(self, tag: int, job_id: str) -> None:
        self.commands.put(("fetch", tag, job_id))

    def cancel(self, job_id: str | None = None) -> None:
        self.commands.put(("cancel", None, job_id))

    def stop(self, join_s: float = 3.0) -> None:
        self._halt.set()
        self.commands.put(("stop", None, None))
        if self.is_alive() and threading.current_thread() is not self:
            self.join(join_s)

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        try:
            client = Client(self.connection, timeout_s=self.timeout_s, name="holofusion-blender")
        except (BackendError, BackendLost) as e:
            self.events.put(("lost", None, str(e)))
            return
        try:
            self.welcome = client.hello()
            self.events.put(("welcome", None, self.welcome))
            while not self._halt.is_set():
                cmd = self._later.pop(0) if self._later else self._next_command(0.1)
                if cmd is None:
                    continue
                kind, tag, arg = cmd
                try:
                    if kind == "generate":
                        self._run_job(client, tag, arg)
                    elif kind == "fetch":
                        for m in client.fetch(arg):
                            self._keep_thumbnail(m)
                            self.events.put(("message", tag, m))
                        self.events.put(("message", tag, _done(arg)))
                except BackendError as e:
                    self.events.put(("error", tag, (e.code, str(e))))
        except BackendLost as e:
            self.events.put(("lost", None, str(e)))
        except BackendError as e:
            self.events.put(("lost", None, f"the backend refused the connection: {e}"))
        finally:
            client.close()

    def _next_command(self, timeout: float) -> tuple | None:
        try:
            return self.commands.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run_job(self, client: Client, tag: int, spec: dict[str, Any]) -> None:
        job_id = client.generate(**spec)
        self.events.put(("accepted", tag, job_id))
        last = time.monotonic()
        while True:
            # Commands first, so a cancel is sent within one poll (50 ms) of the click.
            while (cmd := self._next_command(0)) is not None:
                if cmd[0] in ("cancel", "stop"):
                    if cmd[2] in (None, job_id):
                        client.cancel(job_id)
                    if cmd[0] == "stop":
                        return
                else:
                    self._later.append(cmd)  # one job at a time; the rest waits its turn
            m = client.next_event(job_id, 0.05)
            if m is None:
                if time.monotonic() - last > self.timeout_s:
                    client.check_alive()  # raises BackendLost within about 2 x timeout_s if the backend is gone
                    last = time.monotonic()
                continue
            last = time.monotonic()
            if m.msg_type == "error":
                self.events.put(("error", tag, (m.content["code"], m.content["message"])))
                return
            if m.msg_type == "preview" and self.preview_path:
                _write(self.preview_path, m.buffer("preview")[1])
                self.events.put(("preview", tag, self.preview_path))
                continue
            self._keep_thumbnail(m)
            self.events.put(("message", tag, m))
            if m.msg_type in TERMINAL:
                return


    def _keep_thumbnail(self, m) -> None:
        if m.msg_type != "result" or not self.thumb_dir:
            return
        try:
            png = m.buffer("preview")[1]
        except KeyError:  # the backend's store had no preview for it
            return
        os.makedirs(self.thumb_dir, exist_ok=True)
        _write(os.path.join(self.thumb_dir, thumbnail_name(m.content["job_id"], m.content["seed"])), png)


def thumbnail_name(job_id: str, seed: int) -> str:
    return f"{job_id}_{int(seed)}.png"


def _write(path: str, data) -> None:
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # a reader never sees half a file


def _done(job_id: str):
    from .wire.server.protocol import Message

    return Message("done", {"job_id": job_id, "results": -1})
