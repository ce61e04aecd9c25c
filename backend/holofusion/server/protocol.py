"""The HoloFusion wire protocol, version 2 (docs/PROTOCOL.md is the specification; this is its reference codec).

Pure standard library (no torch, no numpy, no zmq): the Blender add-on carries this very file.

A message is a list of byte frames (after any ZeroMQ routing identities):

    [DELIMITER, signature, header, content, buffer_0, ..., buffer_n-1]

- ``DELIMITER`` = b"<HOLOFUSION|2>".
- ``signature``: lowercase hex HMAC-SHA256, keyed by the connection's shared key, over every later frame's length
  (8 bytes big-endian, so frames cannot be re-cut) and SHA-256 digest; a frame over ``CHUNK`` bytes is digested as
  the SHA-256 of its chunks' SHA-256 digests, so large buffers are hashed on several cores at once (hashlib releases
  the GIL) and a 3 MB object costs half the signing time of version 1's single pass.
- ``header``: UTF-8 JSON object: ``msg_id`` (32 hex), ``msg_type``, ``version`` ("2.x"), ``client_id``, ``seq``
  (integer, strictly increasing per client_id and session), ``time`` (seconds since the epoch); optional
  ``job_id`` and ``reply_to`` (the msg_id answered).
- ``content``: UTF-8 JSON object, fields per message type (``SCHEMAS``).
- buffers: raw bytes described by ``content["buffers"]`` (a list of {"name", "kind", "dtype", "shape"} where kind is
  "array" or "png"); arrays are little-endian, C order.

Everything a peer sends is checked before it is used: frame count and sizes, the signature (constant-time compare),
a cache of recent signatures (replays are refused), the version, JSON shape, and per-type fields and ranges. Every
refusal is a ``ProtocolError`` with a stable ``code`` and a sentence a user can act on. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROTOCOL_VERSION", "DELIMITER", "Message", "ProtocolError", "Signer", "ReplayGuard", "encode", "decode",
           "SCHEMAS", "ERROR_CODES", "Limits", "CLIENT_REQUESTS", "WORKER_REPORTS", "BROKER_ORDERS", "pack_array",
           "unpack_array", "new_key", "curve_options", "frame_digest", "frame_digests",
           "from_zmq", "SIGNATURE_SCHEME"]

PROTOCOL_VERSION = "2.0"
DELIMITER = b"<HOLOFUSION|2>"
SIGNATURE_SCHEME = "hmac-sha256-digests"
CHUNK = 1 << 19
"""Frames longer than this (512 KiB) are digested chunk by chunk (see ``frame_digest``)."""

ERROR_CODES = {
    "malformed": "the message is not a HoloFusion message (frames, JSON or fields are wrong)",
    "bad_signature": "the message is unsigned or its signature does not match the connection key",
    "replayed": "the message was already received (same signature, or a sequence number not above the last)",
    "version": "the message speaks a protocol version this peer does not",
    "too_large": "the message exceeds a size limit",
    "unknown_type": "the message type is not one this peer knows",
    "invalid_request": "a request field is missing or out of range",
    "unknown_model": "no such model on this backend",
    "unknown_category": "the model does not know that category",
    "unknown_job": "no job with that id",
    "busy": "the queue is full",
    "cancelled": "the job was cancelled",
    "generation_failed": "the backend could not make the object",
    "worker_lost": "the worker running the job stopped answering",
    "shutting_down": "the backend is shutting down",
}


class ProtocolError(Exception):
    """A refused message: ``code`` (one of ``ERROR_CODES``) and a sentence."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown protocol error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Sizes a peer accepts (and sets as ZMQ_MAXMSGSIZE / checks per frame)."""

    max_frames: int = 64
    max_json_bytes: int = 1 << 20
    max_message_bytes: int = 256 << 20
    max_clock_skew_s: float = 300.0


def new_key() -> str:
    """A fresh random connection key (64 hex characters, 256 bits)."""
    return os.urandom(32).hex()


def _pieces(frame: bytes | memoryview, chunk: int = CHUNK) -> list[memoryview]:
    """The frame itself, or its ``chunk``-byte pieces (the last may be shorter) when it is longer than ``chunk``."""
    view = memoryview(frame)
    return [view] if len(view) <= chunk else [view[i:i + chunk] for i in range(0, len(view), chunk)]


def _combine(piece_digests: list[bytes]) -> bytes:
    return piece_digests[0] if len(piece_digests) == 1 else hashlib.sha256(b"".join(piece_digests)).digest()


def frame_digest(frame: bytes | memoryview, chunk: int = CHUNK) -> bytes:
    """SHA-256 of a frame up to ``chunk`` bytes; above that, SHA-256 of the concatenated SHA-256 digests of its
    ``chunk``-byte pieces (the last may be shorter). This is what the signature covers for each frame."""
    return _combine([hashlib.sha256(p).digest() for p in _pieces(frame, chunk)])


_POOL = None


def _digests(frames: Sequence[bytes | memoryview], known: Sequence[bytes | None] | None = None) -> list[bytes]:
    """frame_digest of each frame, except where ``known`` already holds it (the digest of that very frame, computed
    earlier by ``frame_digests``); the pieces of large messages are hashed on a small thread pool."""
    global _POOL
    known = list(known) if known is not None else [None] * len(frames)
    todo = [i for i, d in enumerate(known) if d is None]
    if sum(len(frames[i]) for i in todo) < 2 * CHUNK:
        return [d if d is not None else frame_digest(f) for f, d in zip(frames, known)]
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                   thread_name_prefix="holofusion-hash")
    per_frame = {i: _pieces(frames[i]) for i in todo}
    hashed = iter(_POOL.map(lambda p: hashlib.sha256(p).digest(), [p for ps in per_frame.values() for p in ps]))
    for i, ps in per_frame.items():
        known[i] = _combine([next(hashed) for _ in ps])
    return known  # type: ignore[return-value]


def frame_digests(buffers: Sequence[bytes | memoryview]) -> list[bytes]:
    """The digests the signature takes of each of ``buffers``: computed once for a message that is sent many times
    (a stored result fetched again), so that only its small header and content are hashed per send."""
    return _digests(buffers)


def from_zmq(frames: Sequence[Any]) -> list[bytes | memoryview]:
    """Frames received with ``recv_multipart(copy=False)`` as ``decode`` takes them: small ones as bytes, large ones
    as zero-copy memoryviews over ZeroMQ's own message (kept alive by the view), so a 3 MB result is not copied."""
    return [f.buffer if len(f) > 65536 else f.bytes for f in frames]


class Signer:
    """HMAC-SHA256 over length-prefixed frames."""

    def __init__(self, key: str | bytes):
        key = key.encode() if isinstance(key, str) else bytes(key)
        if not key:
            raise ValueError("the connection key is empty; messages must be signed")
        self._key = key

    def sign(self, frames: Sequence[bytes | memoryview], known: Sequence[bytes | None] | None = None) -> bytes:
        """The signature of ``frames``; ``known``: digests already computed for some of them (None elsewhere)."""
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for f, digest in zip(frames, _digests(frames, known)):
            mac.update(struct.pack(">Q", len(f)))
            mac.update(digest)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature: bytes, frames: list[bytes]) -> bool:
        return bool(signature) and hmac.compare_digest(signature, self.sign(frames))


class ReplayGuard:
    """Refuses a signature seen before (a bounded cache) and, per client, a sequence number not above the last."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._last_seq: dict[str, int] = {}

    def check(self, signature: bytes, client_id: str, seq: int) -> None:
        if signature in self._seen:
            raise ProtocolError("replayed", "this message was already received (a replay); it is ignored")
        last = self._last_seq.get(client_id)
        if last is not None and seq <= last:
            raise ProtocolError("replayed", f"sequence number {seq} from client {client_id!r} is not above the last "
                                            f"one received ({last}); the message is ignored")
        self._seen[signature] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        self._last_seq[client_id] = seq

    def forget(self, client_id: str) -> None:
        """A client that says hello again starts a new session (its sequence restarts)."""
        self._last_seq.pop(client_id, None)


# --------------------------------------------------------------------------------------------------------------------
# message types


def _int(lo: int | None = None, hi: int | None = None):
    return ("int", lo, hi)


_STR = ("str", None, None)
_OPT_STR = ("str?", None, None)
_NUM = ("num", None, None)
_BOOL = ("bool", None, None)
_OBJ = ("obj", None, None)
_LIST = ("list", None, None)

MAX_SEED = 2**31 - 1
MAX_COUNT = 1000

SCHEMAS: dict[str, dict[str, tuple]] = {
    # client -> server
    "hello": {"client": _STR},
    "generate": {"model": _OPT_STR, "category": _OPT_STR, "seed": _int(0, MAX_SEED), "preset": _STR,
                 "count": _int(1, MAX_COUNT), "options": _OBJ, "request_id": _STR},
    "cancel": {"job_id": _STR},
    "status": {},
    "fetch": {"job_id": _STR},
    "ping": {},
    "free_memory": {},
    # server -> client
    "welcome": {"server": _STR, "version": _STR, "device": _STR, "memory": _OBJ, "models": _LIST, "presets": _LIST,
                "limits": _OBJ},
    "accepted": {"job_id": _STR, "request_id": _STR, "position": _int(0), "seeds": _LIST},
    "progress": {"job_id": _STR, "index": _int(0), "stage": _STR, "step": _int(0), "total": _int(0),
                 "elapsed_s": _NUM, "eta_s": _NUM},
    "preview": {"job_id": _STR, "index": _int(0), "stage": _STR},
    "result": {"job_id": _STR, "index": _int(0), "seed": _int(0, MAX_SEED), "metadata": _OBJ},
    "done": {"job_id": _STR, "results": _int(0)},
    "error": {"code": _STR, "message": _STR},
    "cancelled": {"job_id": _STR},
    "status_reply": {"queue": _LIST, "running": _LIST, "workers": _int(0)},
    "pong": {},
    "memory_freed": {"memory": _OBJ},
    # worker channel (docs/PROTOCOL.md, "Workers"): a worker and the broker, on the broker's worker port
    "ready": {"worker": _STR, "device": _STR, "pid": _int(0), "host": _STR, "memory": _OBJ},
    "heartbeat": {},
    "job": {"job_id": _STR, "request": _OBJ, "seeds": _LIST, "indices": _LIST},
    "object": {"job_id": _STR, "index": _int(0), "seed": _int(0, MAX_SEED), "metadata": _OBJ},
    "shutdown": {},
}

CLIENT_REQUESTS = frozenset({"hello", "generate", "cancel", "status", "fetch", "ping", "free_memory"})
"""What a client may send to the backend's client port."""
WORKER_REPORTS = frozenset({"ready", "heartbeat", "progress", "preview", "object", "done", "cancelled", "error",
                            "memory_freed"})
"""What a worker may send to the broker's worker port."""
BROKER_ORDERS = frozenset({"job", "cancel", "free_memory", "heartbeat", "shutdown"})
"""What the broker sends to a worker."""


def _check_field(msg_type: str, name: str, value: Any, spec: tuple) -> None:
    kind, lo, hi = spec
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "str?": value is None or isinstance(value, str),
        "num": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "obj": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        raise ProtocolError("invalid_request", f"{msg_type}: field {name!r} must be {kind.rstrip('?')}"
                                               f"{' or null' if kind.endswith('?') else ''}; got {type(value).__name__}")
    if kind == "int" and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        raise ProtocolError("invalid_request", f"{msg_type}: field {name!r} = {value} is out of range "
                                               f"[{lo}, {hi if hi is not None else 'inf'}]")
    if kind in ("str", "str?") and value is not None and len(value) > 4096:
        raise ProtocolError("invalid_request", f"{msg_type}: field {name!r} is longer than 4096 characters")


def validate_content(msg_type: str, content: dict[str, Any]) -> None:
    """Raises ``ProtocolError`` unless ``content`` has every field of ``msg_type`` with the right type and range."""
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError("unknown_type", f"message type {msg_type!r} is not part of protocol {PROTOCOL_VERSION}; "
                                            f"known: {', '.join(sorted(SCHEMAS))}")
    for name, spec in schema.items():
        if name not in content:
            raise ProtocolError("invalid_request", f"{msg_type}: field {name!r} is missing")
        _check_field(msg_type, name, content[name], spec)


# --------------------------------------------------------------------------------------------------------------------
# messages and buffers


@dataclass
class Message:
    """A decoded (or to-be-encoded) message."""

    msg_type: str
    content: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes | memoryview] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)
    digests: list[bytes] | None = field(default=None, repr=False, compare=False)
    """``frame_digests(buffers)`` when computed ahead (a message sent more than once); the buffers must not change."""

    @property
    def msg_id(self) -> str:
        return self.header.get("msg_id", "")

    @property
    def job_id(self) -> str | None:
        return self.content.get("job_id") or self.header.get("job_id")

    def buffer(self, name: str) -> tuple[dict[str, Any], bytes]:
        """(description, bytes) of the buffer called ``name``."""
        for desc, data in zip(self.content.get("buffers", []), self.buffers):
            if desc.get("name") == name:
                return desc, data
        raise KeyError(name)


_DTYPES = {"float32": ("f", 4), "uint32": ("I", 4), "int32": ("i", 4), "uint8": ("B", 1)}


def pack_array(name: str, data: bytes | memoryview, dtype: str,
               shape: list[int]) -> tuple[dict[str, Any], bytes | memoryview]:
    """A buffer description + the bytes for little-endian C-order array data (``numpy_array.tobytes()``, or
    ``numpy_array.data`` of a contiguous array: a view, not a copy)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    raw = data if isinstance(data, bytes) else memoryview(data).cast("B")
    n = 1
    for s in shape:
        n *= int(s)
    if len(raw) != n * _DTYPES[dtype][1]:
        raise ValueError(f"{name}: {len(raw)} bytes do not hold a {dtype} array of shape {shape}")
    return {"name": name, "kind": "array", "dtype": dtype, "shape": [int(s) for s in shape]}, raw


def unpack_array(desc: dict[str, Any], data: bytes) -> tuple[Sequence, list[int]]:
    """(flat sequence of numbers, shape) of an array buffer, checked against its description (no numpy needed).

    On a little-endian machine the sequence is a typed ``memoryview`` over ``data``: no copy, indexable like a list,
    and accepted as is by ``numpy.frombuffer`` and Blender's ``foreach_set`` (a 50,000-face mesh in microseconds
    instead of the ~15 ms of a Python list). Elsewhere it is a list, byte-swapped."""
    dtype, shape = desc.get("dtype"), desc.get("shape")
    if dtype not in _DTYPES or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ProtocolError("malformed", f"buffer {desc.get('name')!r}: bad dtype or shape")
    code, size = _DTYPES[dtype]
    n = 1
    for s in shape:
        n *= s
    if len(data) != n * size:
        raise ProtocolError("malformed", f"buffer {desc.get('name')!r}: {len(data)} bytes for {n} {dtype} values")
    if sys.byteorder == "little" and struct.calcsize(code) == size:
        return memoryview(data).cast("B").cast(code), shape
    return list(struct.unpack(f"<{n}{code}", data)), shape


def encode(msg: Message, signer: Signer, client_id: str, seq: int, job_id: str | None = None,
           reply_to: str | None = None) -> list[bytes]:
    """The frames of ``msg`` (header filled in here; its ``msg_id`` and ``time`` are fresh)."""
    validate_content(msg.msg_type, msg.content)
    descs = msg.content.get("buffers", [])
    if len(descs) != len(msg.buffers):
        raise ValueError(f"{len(msg.buffers)} buffers but {len(descs)} buffer descriptions")
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg.msg_type, "version": PROTOCOL_VERSION,
              "client_id": client_id, "seq": int(seq), "time": time.time()}
    if job_id is not None:
        header["job_id"] = job_id
    if reply_to is not None:
        header["reply_to"] = reply_to
    msg.header = header
    body = [json.dumps(header, separators=(",", ":")).encode(), json.dumps(msg.content, separators=(",", ":"),
                                                                             allow_nan=False).encode()]
    # Buffers go out as they are (bytes or memoryviews; send them with copy=False): no copy of a 3 MB mesh here.
    body += [b if isinstance(b, (bytes, memoryview)) else memoryview(b) for b in msg.buffers]
    known = [None, None] + list(msg.digests) if msg.digests is not None else None
    return [DELIMITER, signer.sign(body, known)] + body


def _json_object(frame: bytes, what: str, limits: Limits) -> dict[str, Any]:
    if len(frame) > limits.max_json_bytes:
        raise ProtocolError("too_large", f"the {what} is {len(frame)} bytes; at most {limits.max_json_bytes}")
    try:
        value = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError("malformed", f"the {what} is not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ProtocolError("malformed", f"the {what} must be a JSON object")
    return value


def decode(frames: list[bytes | memoryview], signer: Signer, replay: ReplayGuard | None = None,
           limits: Limits = Limits(), now: float | None = None) -> Message:
    """Checks and decodes frames (routing identities already removed). Raises ``ProtocolError``.

    Buffers that arrive as memoryviews (``from_zmq``) stay memoryviews in the message: no copy."""
    if not isinstance(frames, list) or not all(isinstance(f, (bytes, bytearray, memoryview)) for f in frames):
        raise ProtocolError("malformed", "a message is a list of byte frames")
    frames = [f if isinstance(f, memoryview) and i >= 4 else bytes(f) for i, f in enumerate(frames)]
    if len(frames) < 4 or frames[0] != DELIMITER:
        if frames and frames[0].startswith(b"<HOLOFUSION|") and frames[0] != DELIMITER:
            raise ProtocolError("version", f"the peer speaks {frames[0][1:-1].decode('latin-1')!r}; this one speaks "
                                           f"protocol {PROTOCOL_VERSION}")
        raise ProtocolError("malformed", f"expected frames [{DELIMITER.decode()}, signature, header, content, "
                                         "buffers...]")
    if len(frames) > limits.max_frames:
        raise ProtocolError("too_large", f"{len(frames)} frames; at most {limits.max_frames}")
    total = sum(len(f) for f in frames)
    if total > limits.max_message_bytes:
        raise ProtocolError("too_large", f"the message is {total} bytes; at most {limits.max_message_bytes}")
    signature, body = frames[1], frames[2:]
    if not signer.verify(signature, body):
        raise ProtocolError("bad_signature", "the message is unsigned or signed with another key; check that the "
                                             "client uses this backend's connection file")
    header = _json_object(body[0], "header", limits)
    content = _json_object(body[1], "content", limits)
    version = header.get("version")
    if not isinstance(version, str) or version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise ProtocolError("version", f"the peer speaks protocol {version!r}; this one speaks {PROTOCOL_VERSION}")
    for name, kind in (("msg_id", str), ("msg_type", str), ("client_id", str), ("seq", int), ("time", (int, float))):
        value = header.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError("malformed", f"header field {name!r} is missing or of the wrong type")
    t = now if now is not None else time.time()
    if abs(float(header["time"]) - t) > limits.max_clock_skew_s:
        raise ProtocolError("replayed", f"the message is stamped {float(header['time']) - t:+.0f} s from now (more "
                                        f"than {limits.max_clock_skew_s:.0f} s): a replay or a wrong clock")
    msg_type = header["msg_type"]
    validate_content(msg_type, content)
    descs = content.get("buffers", [])
    if not isinstance(descs, list) or len(descs) != len(body) - 2 or not all(isinstance(d, dict) for d in descs):
        raise ProtocolError("malformed", f"{len(body) - 2} buffers but the content describes "
                                         f"{len(descs) if isinstance(descs, list) else 'none'}")
    if replay is not None:
        if msg_type in ("hello", "ready"):
            replay.forget(header["client_id"])
        replay.check(signature, header["client_id"], header["seq"])
    return Message(msg_type, content, body[2:], header)


def curve_options(info: dict[str, Any]) -> dict[int, bytes] | None:
    """Socket options for a client or worker of a backend whose connection file names a CURVE server key (a backend
    listening beyond loopback): a fresh key pair of our own and the server's public key. ``None`` without one.
    Needs pyzmq; imported here lazily so that this module stays standard-library only."""
    server_key = info.get("curve_serverkey")
    if not server_key:
        return None
    import zmq

    if not zmq.has("curve"):
        raise ProtocolError("version", "the backend encrypts with CURVE but this pyzmq was built without it")
    public, secret = zmq.curve_keypair()
    return {zmq.CURVE_SERVERKEY: server_key.encode("ascii"), zmq.CURVE_PUBLICKEY: public,
            zmq.CURVE_SECRETKEY: secret}


def error_message(code: str, message: str) -> Message:
    """An ``error`` reply."""
    return Message("error", {"code": code, "message": message})
