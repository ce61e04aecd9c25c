"""`holofusion.client` (public): talk to a HoloFusion backend from plain Python: pyzmq and the standard library
only (no torch, no numpy), so the Blender extension carries it as is.

    from holofusion.client import Client
    with Client("~/.config/holofusion/backend-1234.json") as c:      # a connection file (or a dict of one)
        print(c.hello()["models"])
        job = c.generate(seed=7, preset="draft")
        for event in c.events(job):                                   # progress, preview, result, ... done
            if event.msg_type == "result":
                mesh = result_mesh(event)                             # positions, normals, uvs, faces, texture

Requests are retried the Lazy-Pirate way (poll with a timeout; on silence close the socket, reopen, resend; give up
after ``retries``): every request is safe to resend, a generate carries a request id that the backend
deduplicates, so a retry never runs a job twice. While a job streams, silence longer than ``timeout_s`` is met with
a ping; an unanswered ping means the backend is gone, reported as ``BackendLost`` about ``2 * timeout_s`` seconds
after its last message (2 s by default).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from .server.protocol import (Limits, Message, ProtocolError, ReplayGuard, Signer, curve_options, decode, encode,
                              from_zmq, unpack_array)

__all__ = ["Client", "BackendError", "BackendLost", "result_mesh", "read_connection_file"]

TERMINAL = ("done", "cancelled", "error")


class BackendError(RuntimeError):
    """The backend answered with an error: ``code`` (docs/PROTOCOL.md) and its sentence."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class BackendLost(ConnectionError):
    """The backend stopped answering."""


def read_connection_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(os.path.expanduser(str(path)))
    try:
        info = json.loads(p.read_text())
    except FileNotFoundError:
        raise BackendLost(f"no connection file at {str(p)!r}: is the backend running (holofusion serve)?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BackendError("malformed", f"{str(p)!r} is not a connection file ({e})") from None
    for key in ("ip", "port", "key"):
        if key not in info:
            raise BackendError("malformed", f"{str(p)!r} has no {key!r}: not a HoloFusion connection file")
    return info


class Client:
    def __init__(self, connection: str | os.PathLike | dict[str, Any], timeout_s: float = 1.0, retries: int = 3,
                 name: str = "holofusion-client"):
        info = connection if isinstance(connection, dict) else read_connection_file(connection)
        self.address = f"tcp://{info['ip']}:{info['port']}"
        self.info = info
        self.signer = Signer(info["key"])
        self.timeout_s, self.retries, self.name = timeout_s, retries, name
        self.client_id = uuid.uuid4().hex
        self.seq = 0
        self.replay = ReplayGuard()
        self.limits = Limits()
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.backlog: list[Message] = []
        self._open()

    # ------------------------------------------------------------------ socket
    def _open(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        self.sock.setsockopt(zmq.RCVHWM, 10000)
        try:
            curve = curve_options(self.info)  # a backend beyond loopback encrypts: a fresh key pair per socket
        except ProtocolError as e:
            raise BackendError(e.code, e.message) from None
        for opt, value in (curve or {}).items():
            self.sock.setsockopt(opt, value)
        self.sock.connect(self.address)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, msg: Message) -> str:
        self.seq += 1
        self.sock.send_multipart(encode(msg, self.signer, self.client_id, self.seq))
        return msg.header["msg_id"]

    def _recv(self, timeout_s: float) -> Message | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = from_zmq(self.sock.recv_multipart(copy=False))
        try:
            return decode(frames, self.signer, self.replay, self.limits)
        except ProtocolError as e:
            raise BackendError(e.code, f"the backend sent a message that fails checks: {e.message}") from None

    def request(self, msg: Message, expect: tuple[str, ...]) -> Message:
        """Sends ``msg`` and waits for its answer (one of ``expect``, or an error), retrying on silence."""
        for attempt in range(self.retries):
            msg_id = self._send(Message(msg.msg_type, dict(msg.content), list(msg.buffers)))
            deadline = time.monotonic() + self.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                reply = self._recv(left)
                if reply is None:
                    break
                if reply.header.get("reply_to") == msg_id or (reply.msg_type in expect and
                                                               reply.header.get("reply_to") is None):
                    if reply.msg_type == "error":
                        raise BackendError(reply.content["code"], reply.content["message"])
                    if reply.msg_type in expect:
                        return reply
                self.backlog.append(reply)  # job events that arrived meanwhile
            self._open()  # Lazy Pirate: a fresh socket, then resend
            if msg.msg_type == "hello" or attempt:
                self.replay = ReplayGuard()
        raise BackendLost(f"the backend at {self.address} did not answer {msg.msg_type!r} within "
                          f"{self.timeout_s * self.retries:.0f} s")

    # ------------------------------------------------------------------ API
    def hello(self) -> dict[str, Any]:
        return self.request(Message("hello", {"client": self.name}), ("welcome",)).content

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.request(Message("ping"), ("pong",))
        return time.perf_counter() - t0

    def status(self) -> dict[str, Any]:
        return self.request(Message("status"), ("status_reply",)).content

    def generate(self, seed: int = 0, model: str | None = None, category: str | None = None,
                 preset: str = "standard", count: int = 1, options: dict[str, Any] | None = None,
                 request_id: str | None = None) -> str:
        """Submits a job and returns its id once the backend accepted it."""
        content = {"model": model, "category": category, "seed": int(seed), "preset": preset, "count": int(count),
                   "options": options or {}, "request_id": request_id or uuid.uuid4().hex}
        return self.request(Message("generate", content), ("accepted",)).content["job_id"]

    def cancel(self, job_id: str) -> None:
        """Asks the backend to stop a job; its event stream ends with ``cancelled``."""
        self.seq += 1
        self.sock.send_multipart(encode(Message("cancel", {"job_id": job_id}), self.signer, self.client_id,
                                        self.seq))

    def fetch(self, job_id: str) -> list[Message]:
        """The stored results of a job (after a reconnect, or from another client)."""
        self.seq += 1
        self.sock.send_multipart(encode(Message("fetch", {"job_id": job_id}), self.signer, self.client_id,
                                        self.seq))
        return [m for m in self.events(job_id) if m.msg_type == "result"]

    def events(self, job_id: str) -> Iterator[Message]:
        """The job's messages as they arrive, ending with its terminal one (done / cancelled); an ``error`` for the
        job raises ``BackendError``; a backend that stops answering raises ``BackendLost``."""
        while True:
            m = self.next_event(job_id, self.timeout_s)
            if m is None:
                self.check_alive()
                continue
            yield from self._event(m)
            if m.msg_type in TERMINAL:
                return

    def next_event(self, job_id: str, timeout_s: float = 0.0) -> Message | None:
        """The job's next message if one arrives within ``timeout_s`` (0: only what is already here), else ``None``.
        Messages of other jobs are kept for their own readers. Errors are returned, not raised, and the backend's
        liveness is not checked: a caller that polls (a UI timer) pings after a silence of its choosing."""
        for i, m in enumerate(self.backlog):
            if m.header.get("job_id") == job_id or m.content.get("job_id") == job_id:
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout_s
        while True:
            m = self._recv(max(0.0, deadline - time.monotonic()))
            if m is None:
                return None
            if m.header.get("job_id") == job_id or m.content.get("job_id") == job_id:
                return m
            self.backlog.append(m)

    def check_alive(self) -> None:
        """After silence on a job stream: two pings of half the timeout each (the second on a fresh socket), so a
        dead backend is reported within about twice ``timeout_s`` of its last message."""
        saved = self.timeout_s, self.retries
        self.timeout_s, self.retries = saved[0] / 2, 2
        try:
            self.request(Message("ping"), ("pong",))
        finally:
            self.timeout_s, self.retries = saved

    @staticmethod
    def _event(m: Message) -> Iterator[Message]:
        if m.msg_type == "error":
            raise BackendError(m.content["code"], m.content["message"])
        yield m


def result_mesh(msg: Message) -> dict[str, Any]:
    """The arrays of a ``result`` message as flat number sequences with shapes (typed memoryviews over the message's
    frames: ``numpy.frombuffer(seq, dtype).reshape(shape)`` or Blender's ``foreach_set`` take them without a copy),
    and the texture PNG bytes: {"positions": (seq, [V, 3]), "normals", "uvs", "faces", "texture": bytes,
    "metadata": {...}}."""
    out: dict[str, Any] = {"metadata": msg.content.get("metadata", {})}
    for name in ("positions", "normals", "uvs", "faces"):
        out[name] = unpack_array(*msg.buffer(name))
    out["texture"] = bytes(msg.buffer("texture")[1])
    return out
