"""`holofusion serve`: the backend's broker (protocol: docs/PROTOCOL.md).

One endpoint for clients, any number of workers behind it: the ZeroMQ guide's load-balancing broker. The broker binds
two ROUTER sockets, one for clients and one for workers; a worker (``holofusion worker``, one per device, started
here by ``--workers N`` or on other machines with ``--connect``) says ``ready`` and gets one job at a time. The broker
alone owns the queue and the store: a worker's finished object comes back as GLB bytes, is written to the store, and
only then is the ``result`` sent to the client, so a client that reconnects can ``fetch`` it.

Both sides heartbeat every second. A worker silent for ``worker_timeout_s`` (or a local worker process that exited)
is dropped and its job re-queued once with only the objects not yet stored; a second loss fails the job with
``worker_lost``. Messages from a dropped worker are ignored, so no object is ever stored or sent twice. A repeated
request id from the same client returns the job it already made; every job ends in exactly one of done / cancelled /
failed, recorded in the store. Everything runs on one thread (ZeroMQ sockets are not thread-safe); the broker never
touches a model, so it stays responsive however busy the workers are.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from .. import __version__
from ..errors import UserError
from .protocol import (CLIENT_REQUESTS, PROTOCOL_VERSION, SIGNATURE_SCHEME, WORKER_REPORTS, Limits, Message,
                       ProtocolError, ReplayGuard, Signer, decode, encode, error_message, frame_digests, from_zmq,
                       new_key, pack_array)
from .store import ResultStore
from .worker import HEARTBEAT_S, WORKER_MESSAGE_BYTES, memory, resolve_device

RESULT_CACHE_BYTES = 128 << 20
"""At most this many bytes of result messages are kept ready to send again (about 40 objects of 50k faces)."""

__all__ = ["Server", "ServeConfig", "default_connection_file", "write_connection_file", "result_message"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_ATTEMPTS = 2
"""A job whose worker is lost is re-queued once; the second loss fails it."""


def default_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "holofusion"


def default_connection_file() -> Path:
    return default_config_dir() / f"backend-{os.getpid()}.json"


def write_connection_file(path: Path, info: dict[str, Any]) -> Path:
    """Writes the connection file readable by its owner only (mode 0600), created so from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


@dataclass
class ServeConfig:
    """How the server runs."""

    host: str = "127.0.0.1"
    port: int = 0
    """0: a free port chosen by the system (written to the connection file)."""
    connection_file: str | None = None
    device: str = "auto"
    store: str | None = None
    models: str | None = None
    """Folder of model folders (default: the shipped models/)."""
    max_queue: int = 100
    limits: Limits = field(default_factory=Limits)
    workers: int = 1
    """Local worker processes (one per device); 0: only remote ones (holofusion worker --connect)."""
    worker_port: int = 0
    worker_timeout_s: float = 5.0
    """A worker silent this long is considered dead."""
    curve: bool = False
    """Encrypt with CURVE even on loopback (always on when listening beyond loopback)."""
    threads: int | None = None
    """torch CPU threads per local worker (default: the CPU cores shared among them)."""


@dataclass
class Job:
    job_id: str
    identity: bytes
    client_id: str
    request_id: str
    request: dict[str, Any]
    seeds: list[int]
    state: str = "queued"
    done: set[int] = field(default_factory=set)
    """Indices of the objects already stored."""
    worker: bytes | None = None
    attempts: int = 0
    cancel: bool = False
    created: float = field(default_factory=time.time)

    def summary(self, workers: dict[bytes, WorkerInfo]) -> dict[str, Any]:
        w = workers.get(self.worker) if self.worker is not None else None
        return {"job_id": self.job_id, "state": self.state, "seeds": self.seeds, "results": len(self.done),
                "model": self.request.get("model"), "preset": self.request.get("preset"),
                "worker": w.name if w else None}


@dataclass
class WorkerInfo:
    identity: bytes
    name: str
    device: str
    pid: int
    host: str
    memory: dict[str, Any]
    last_seen: float = field(default_factory=time.monotonic)
    job: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "host": self.host, "pid": self.pid,
                "state": "busy" if self.job else "idle", "job_id": self.job}


class Server:
    """Bind, write the connection file, start the local workers, serve until ``stop()``."""

    def __init__(self, config: ServeConfig):
        self.cfg = config
        if config.workers < 0:
            raise UserError(f"--workers {config.workers}: choose 0 (remote workers only) or more")
        self.encrypted = config.curve or config.host not in LOOPBACK
        if self.encrypted and not zmq.has("curve"):
            raise UserError(f"--host {config.host}: listening beyond loopback needs CURVE encryption, which this "
                            "pyzmq build lacks; listen on 127.0.0.1 and tunnel (ssh -L) instead")
        self.local_devices = self._local_devices(config)
        self.key = new_key()
        self.signer = Signer(self.key)
        self.replay = ReplayGuard()
        self.worker_replay = ReplayGuard()
        self.worker_limits = Limits(max_message_bytes=WORKER_MESSAGE_BYTES)
        self.store = ResultStore(config.store or default_config_dir() / "store")
        self.models_dir = Path(config.models) if config.models else None
        # Listed once (it reads every model file's header): hello and generate answer from this; workers load the
        # weights themselves when a job needs them.
        self.models = self._list_models()
        self.ctx = zmq.Context.instance()
        self.curve_public = None
        if self.encrypted:
            self.curve_public, self._curve_secret = zmq.curve_keypair()
        self.sock, self.port = self._bind(config.port, config.limits.max_message_bytes)
        self.wsock, self.worker_port = self._bind(config.worker_port, WORKER_MESSAGE_BYTES)
        self.connection_file = Path(config.connection_file) if config.connection_file else default_connection_file()
        info = {"transport": "tcp", "ip": self._advertised_ip(), "port": self.port, "worker_port": self.worker_port,
                "key": self.key, "signature_scheme": SIGNATURE_SCHEME, "protocol_version": PROTOCOL_VERSION,
                "pid": os.getpid()}
        if self.curve_public is not None:
            info["curve_serverkey"] = self.curve_public.decode("ascii")
        write_connection_file(self.connection_file, info)
        self.seq = 0
        self.jobs: dict[str, Job] = {}
        self.by_request: dict[tuple[str, str], str] = {}
        self.pending: collections.deque[Job] = collections.deque()
        self.workers: dict[bytes, WorkerInfo] = {}
        self.idle: collections.deque[bytes] = collections.deque()
        self.local: list[dict[str, Any]] = []  # {"device", "proc", "restarts"}
        self._stop = False
        self._last_beat = 0.0
        # Result messages ready to send again (a fetch after a reconnect, History in the add-on): built and their
        # buffers digested once, so a repeat costs only the small header and content (least recently used first out).
        self._results: collections.OrderedDict[tuple[str, int], Message] = collections.OrderedDict()

    # ------------------------------------------------------------------ setup
    def _bind(self, port: int, max_bytes: int) -> tuple[zmq.Socket, int]:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if self.curve_public is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve_public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve_secret)
        host = self.cfg.host if self.cfg.host != "localhost" else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        if self.cfg.host == "::1" or ":" in self.cfg.host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if port:
                sock.bind(f"tcp://{host}:{port}")
                return sock, port
            return sock, sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            sock.close(0)
            raise UserError(f"cannot listen on {self.cfg.host}:{port or 'any port'}: {e}") from None

    def _advertised_ip(self) -> str:
        if self.cfg.host in ("0.0.0.0", "::", "*"):
            return socket.gethostname()  # what other machines may reach; edit the file if it is not
        return "127.0.0.1" if self.cfg.host == "localhost" else self.cfg.host

    @staticmethod
    def _local_devices(cfg: ServeConfig) -> list[str]:
        if cfg.workers == 0:
            return []
        device = resolve_device(cfg.device)
        if device == "cuda":
            import torch

            count = torch.cuda.device_count()
            if cfg.workers > count:
                raise UserError(f"--workers {cfg.workers}: this machine has {count} CUDA device(s); one worker per "
                                "device")
            return [f"cuda:{i}" for i in range(cfg.workers)]
        return [device] * cfg.workers

    def _spawn(self, slot: dict[str, Any]) -> None:
        threads = self.cfg.threads or max(1, (os.cpu_count() or 1) // max(1, len(self.local_devices)))
        cmd = [sys.executable, "-m", "holofusion.cli", "worker", "--connect",
               f"tcp://127.0.0.1:{self.worker_port}", "--device", slot["device"], "--parent-pid", str(os.getpid()),
               "--timeout", str(self.cfg.worker_timeout_s)]
        if slot["device"] == "cpu":
            cmd += ["--threads", str(threads)]
        if self.models_dir is not None:
            cmd += ["--models", str(self.models_dir)]
        env = dict(os.environ, HOLOFUSION_KEY=self.key)  # not on the command line, where `ps` shows it
        if self.curve_public is not None:
            env["HOLOFUSION_CURVE_SERVERKEY"] = self.curve_public.decode("ascii")
        slot["proc"] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        slot["started"] = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def serve_forever(self) -> None:
        for device in self.local_devices:
            slot = {"device": device, "proc": None, "restarts": 0}
            self._spawn(slot)
            self.local.append(slot)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wsock, zmq.POLLIN)
        try:
            while not self._stop:
                self._step(poller)
        finally:
            self._shutdown(poller)

    def _step(self, poller: zmq.Poller, timeout_ms: int = 10) -> None:
        ready = dict(poller.poll(timeout_ms))
        for sock, handler in ((self.wsock, self._worker_receive), (self.sock, self._receive)):
            if sock in ready:
                for _ in range(256):  # drain what is there, but let the other socket have its turn
                    try:
                        frames = from_zmq(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                    try:
                        handler(frames)
                    except Exception:  # a bug in one message's handling must not take the backend down
                        print("holofusion: error while handling a message (the backend keeps serving):\n"
                              f"{traceback.format_exc()}", flush=True)
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self._beat(now)
        self._dispatch()

    def stop(self) -> None:
        self._stop = True

    def _shutdown(self, poller: zmq.Poller) -> None:
        # Queued jobs are cancelled (recorded and told); running ones are asked to stop at their next step and given
        # a few seconds to say so, then every worker is told to exit.
        while self.pending:
            job = self.pending.popleft()
            if job.state == "queued":
                self._finish(job, "cancelled")
                self._to_client(job, Message("cancelled", {"job_id": job.job_id}))
        for job in self.jobs.values():
            if job.state == "running" and job.worker in self.workers:
                job.cancel = True
                self._to_worker(job.worker, Message("cancel", {"job_id": job.job_id}))
        deadline = time.monotonic() + 10
        while any(j.state == "running" for j in self.jobs.values()) and time.monotonic() < deadline:
            self._step(poller, 50)
        for job in self.jobs.values():
            if job.state == "running":
                self._finish(job, "cancelled")
                self._to_client(job, error_message("shutting_down", "the backend stopped before this job ended"))
        for identity in list(self.workers):
            self._to_worker(identity, Message("shutdown"))
        for slot in self.local:
            # A registered worker exits within a second of "shutdown"; one still starting up (importing torch,
            # loading its model) never heard it, so it is terminated rather than waited for.
            proc = slot["proc"]
            for wait_s, then in ((2, proc.terminate), (5, proc.kill), (5, None)):
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    if then is not None:
                        then()
        self.sock.close(0)
        self.wsock.close(0)
        try:
            self.connection_file.unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ wire
    def _send(self, sock: zmq.Socket, identity: bytes, msg: Message, job_id: str | None = None,
              reply_to: str | None = None) -> None:
        self.seq += 1
        try:
            frames = encode(msg, self.signer, "server", self.seq, job_id=job_id, reply_to=reply_to)
            sock.send_multipart([identity] + frames, zmq.NOBLOCK, copy=not msg.buffers)  # zero-copy for arrays
        except (zmq.ZMQError, zmq.Again):
            pass  # the peer is gone (or not reading); results are in the store for a later fetch

    def _reply(self, identity: bytes, msg: Message, request: Message | None = None,
               job_id: str | None = None) -> None:
        self._send(self.sock, identity, msg, job_id, request.msg_id if request is not None else None)

    def _to_client(self, job: Job, msg: Message) -> None:
        self._send(self.sock, job.identity, msg, job.job_id)

    def _to_worker(self, identity: bytes, msg: Message) -> None:
        self._send(self.wsock, identity, msg, msg.content.get("job_id"))

    def _receive(self, frames: list[bytes]) -> None:
        # ROUTER puts the peer's identity first; a DEALER client sends nothing before the delimiter.
        identity, body = frames[0], frames[1:]
        try:
            msg = decode(body, self.signer, self.replay, self.cfg.limits)
        except ProtocolError as e:
            self._reply(identity, error_message(e.code, e.message))
            return
        try:
            if msg.msg_type not in CLIENT_REQUESTS:
                raise ProtocolError("unknown_type", f"{msg.msg_type!r} is not a request a client may send "
                                                    f"(requests: {', '.join(sorted(CLIENT_REQUESTS))})")
            self._handle(identity, msg)
        except ProtocolError as e:
            self._reply(identity, error_message(e.code, e.message), msg)

    # ------------------------------------------------------------------ client requests
    def _list_models(self) -> list[dict[str, Any]]:
        from ..generate import list_models
        from ..pipeline import MODELS_DIR

        return list_models(self.models_dir or MODELS_DIR)

    def _devices(self) -> str:
        live = sorted({w.device for w in self.workers.values()})
        return ",".join(live or sorted(set(self.local_devices))) or "none"

    def _handle(self, identity: bytes, msg: Message) -> None:
        t, c = msg.msg_type, msg.content
        if t == "hello":
            from ..pipeline import PRESETS

            self._reply(identity, Message("welcome", {
                "server": "holofusion", "version": __version__, "device": self._devices(), "memory": memory(),
                "models": self.models, "presets": list(PRESETS),
                "workers": [w.summary() for w in self.workers.values()], "encrypted": self.encrypted,
                "limits": {"max_message_bytes": self.cfg.limits.max_message_bytes, "max_count": 1000,
                           "max_seed": 2**31 - 1, "max_queue": self.cfg.max_queue}}), msg)
        elif t == "ping":
            self._reply(identity, Message("pong"), msg)
        elif t == "generate":
            self._generate(identity, msg)
        elif t == "cancel":
            job = self.jobs.get(c["job_id"])
            if job is None:
                raise ProtocolError("unknown_job", f"no job {c['job_id']!r} on this backend")
            job.cancel = True
            if job.state == "queued":
                self._finish(job, "cancelled")
                self._reply(job.identity, Message("cancelled", {"job_id": job.job_id}), msg, job.job_id)
            elif job.state == "running" and job.worker is not None:
                self._to_worker(job.worker, Message("cancel", {"job_id": job.job_id}))  # it answers `cancelled`
        elif t == "status":
            queued = [j.summary(self.workers) for j in self.pending if j.state == "queued"]
            running = [j.summary(self.workers) for j in self.jobs.values() if j.state == "running"]
            self._reply(identity, Message("status_reply", {
                "queue": queued, "running": running, "workers": len(self.workers),
                "worker_list": [w.summary() for w in self.workers.values()]}), msg)
        elif t == "fetch":
            self._fetch(identity, msg)
        elif t == "free_memory":
            for w in self.idle:
                self._to_worker(w, Message("free_memory"))
            self._reply(identity, Message("memory_freed", {
                "memory": {"broker": memory(), **{w.name: w.memory for w in self.workers.values()}}}), msg)

    def _generate(self, identity: bytes, msg: Message) -> None:
        from ..generate import known_categories, model_for
        from ..pipeline import PRESETS

        c = msg.content
        key = (msg.header["client_id"], c["request_id"])
        if key in self.by_request:  # a retried request: the same job, never a second run
            job = self.jobs[self.by_request[key]]
            job.identity = identity
            self._reply(identity, Message("accepted", {"job_id": job.job_id, "request_id": job.request_id,
                                                       "position": 0, "seeds": job.seeds}), msg, job.job_id)
            return
        if c["preset"] not in PRESETS:
            raise ProtocolError("invalid_request", f"preset {c['preset']!r} is unknown; choose from "
                                                   f"{', '.join(PRESETS)}")
        models = {m["name"]: m for m in self.models}
        model = c["model"] or model_for(c["category"], self.models)
        if model is None:
            raise ProtocolError("unknown_category", f"no model on this backend knows category {c['category']!r} "
                                                    f"(known: {known_categories(self.models)})")
        if model not in models:
            raise ProtocolError("unknown_model", f"model {model!r} is not on this backend (it has: "
                                                 f"{', '.join(models) or 'none'})")
        if c["category"] is not None and c["category"] not in models[model]["categories"]:
            raise ProtocolError("unknown_category", f"model {model!r} does not know category {c['category']!r} "
                                                    f"(it knows: {', '.join(models[model]['categories'])})")
        if c["preset"] not in models[model]["presets"]:
            raise ProtocolError("invalid_request", f"model {model!r} supports presets "
                                                   f"{', '.join(models[model]['presets'])}, not {c['preset']!r}")
        if c["seed"] + c["count"] - 1 > 2**31 - 1:
            raise ProtocolError("invalid_request", "seed + count - 1 exceeds the largest seed 2^31 - 1")
        if len(self.pending) >= self.cfg.max_queue:
            raise ProtocolError("busy", f"the queue holds {self.cfg.max_queue} jobs; try again later")
        job = Job(secrets.token_hex(16), identity, msg.header["client_id"], c["request_id"],
                  {**c, "model": model}, [c["seed"] + i for i in range(c["count"])])
        self.jobs[job.job_id] = job
        self.by_request[key] = job.job_id
        self.store.save_job(job.job_id, {"request": job.request, "state": "queued", "seeds": job.seeds,
                                         "client_id": job.client_id, "request_id": job.request_id})
        self._reply(identity, Message("accepted", {"job_id": job.job_id, "request_id": job.request_id,
                                                   "position": len(self.pending), "seeds": job.seeds}),
                    msg, job.job_id)
        self.pending.append(job)
        # Hand it to an idle worker now, after `accepted` went out: a status request drained in the same step
        # would otherwise report the job queued while a worker sits idle.
        self._dispatch()

    def _fetch(self, identity: bytes, msg: Message) -> None:
        job_id = msg.content["job_id"]
        record = self.store.job(job_id)
        if record is None:
            raise ProtocolError("unknown_job", f"no job {job_id!r} in this backend's store")
        indices = self.store.indices(job_id)
        for index in indices:
            result = self._results.get((job_id, index))
            if result is None:
                meta, glb, preview = self.store.result(job_id, index)
                result = self._remember(job_id, index, result_message(job_id, index, meta, glb, preview))
            else:
                self._results.move_to_end((job_id, index))
            self._reply(identity, result, msg, job_id)
        self._reply(identity, Message("done", {"job_id": job_id, "results": len(indices)}), msg, job_id)

    def _remember(self, job_id: str, index: int, result: Message) -> Message:
        """Keeps a result message (its buffer digests computed now) for sending again; drops the least recently
        used beyond RESULT_CACHE_BYTES."""
        result.digests = frame_digests(result.buffers)
        self._results[(job_id, index)] = result
        total = sum(len(b) for m in self._results.values() for b in m.buffers)
        while total > RESULT_CACHE_BYTES and len(self._results) > 1:
            _, old = self._results.popitem(last=False)
            total -= sum(len(b) for b in old.buffers)
        return result

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state = state
        job.worker = None
        record = self.store.job(job.job_id) or {}
        record.update({"state": state, "results": len(job.done), "error": error, "attempts": job.attempts})
        self.store.save_job(job.job_id, record)

    # ------------------------------------------------------------------ workers
    def _dispatch(self) -> None:
        while self.idle and self.pending:
            job = self.pending.popleft()
            if job.state != "queued":
                continue
            identity = self.idle.popleft()
            worker = self.workers[identity]
            job.state, job.worker = "running", identity
            job.attempts += 1
            worker.job = job.job_id
            self._to_worker(identity, Message("job", {
                "job_id": job.job_id, "request": job.request, "seeds": job.seeds,
                "indices": [i for i in range(len(job.seeds)) if i not in job.done]}))

    def _beat(self, now: float) -> None:
        for identity, w in list(self.workers.items()):
            if now - w.last_seen > self.cfg.worker_timeout_s:
                self._lose(identity, f"silent for {now - w.last_seen:.1f} s")
            else:
                self._to_worker(identity, Message("heartbeat"))
        for slot in self.local:
            code = slot["proc"].poll()
            if code is None or self._stop:
                continue
            for identity, w in list(self.workers.items()):
                if w.pid == slot["proc"].pid:
                    self._lose(identity, f"its process exited with code {code}")
            # Restart it, unless it keeps dying right after starting (a broken install or device).
            if slot["restarts"] < 5:
                slot["restarts"] += 1
                print(f"holofusion: local worker on {slot['device']} exited ({code}); restarting it", flush=True)
                self._spawn(slot)

    def _lose(self, identity: bytes, why: str) -> None:
        w = self.workers.pop(identity)
        if identity in self.idle:
            self.idle.remove(identity)
        print(f"holofusion: worker {w.name} lost ({why})", flush=True)
        job = self.jobs.get(w.job) if w.job else None
        if job is None or job.state != "running":
            return
        if job.cancel:
            self._finish(job, "cancelled")
            self._to_client(job, Message("cancelled", {"job_id": job.job_id}))
        elif job.attempts < MAX_ATTEMPTS:
            job.state, job.worker = "queued", None
            self.pending.appendleft(job)  # it waited long enough already
            first = min(set(range(len(job.seeds))) - job.done)
            self._to_client(job, Message("progress", {"job_id": job.job_id, "index": first, "stage": "requeued",
                                                      "step": 0, "total": 0, "elapsed_s": 0.0, "eta_s": 0.0}))
        else:
            made = len(job.done)
            self._finish(job, "failed", f"worker {w.name} lost ({why})")
            self._to_client(job, error_message(
                "worker_lost", f"the worker running this job ({w.name}) stopped answering, for the second time; "
                               f"{made} of {len(job.seeds)} objects were made and are in the store (fetch "
                               f"{job.job_id})"))

    def _worker_receive(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        try:
            msg = decode(body, self.signer, self.worker_replay, self.worker_limits)
        except ProtocolError as e:
            print(f"holofusion: refused a message on the worker port: {e.message}", flush=True)
            return
        t, c = msg.msg_type, msg.content
        if t not in WORKER_REPORTS:
            return
        if t == "ready":
            if identity in self.workers:  # the same socket again: a worker that reconnected to us
                self._lose(identity, "it said ready again")
            self.workers[identity] = WorkerInfo(identity, c["worker"], c["device"], c["pid"], c["host"],
                                                c["memory"])
            self.idle.append(identity)
            return
        w = self.workers.get(identity)
        if w is None:
            return  # a worker we dropped: it will time out on our silence and say ready again
        w.last_seen = time.monotonic()
        if t == "heartbeat":
            return
        if t == "memory_freed":
            w.memory = c["memory"]
            return
        job = self.jobs.get(msg.job_id or "")
        if job is None or job.worker != identity or w.job != job.job_id:
            return  # stale: the job was re-queued elsewhere or ended
        if t in ("progress", "preview"):
            self._to_client(job, Message(t, dict(c), list(msg.buffers)))
        elif t == "object":
            index = c["index"]
            if index in job.done or not 0 <= index < len(job.seeds):
                return  # never stored or sent twice
            try:
                glb = msg.buffer("glb")[1]
                preview = msg.buffer("preview")[1]
            except KeyError:
                return
            self.store.save_result(job.job_id, index, glb, preview, c["metadata"])
            job.done.add(index)
            self._to_client(job, self._remember(job.job_id, index,
                                                result_message(job.job_id, index, c["metadata"], glb, preview)))
        elif t in ("done", "cancelled", "error"):
            if t == "done":
                self._finish(job, "done")
                self._to_client(job, Message("done", {"job_id": job.job_id, "results": len(job.done)}))
            elif t == "cancelled":
                self._finish(job, "cancelled")
                self._to_client(job, Message("cancelled", {"job_id": job.job_id}))
            else:
                self._finish(job, "failed", c["message"])
                self._to_client(job, error_message(c["code"], c["message"]))
            w.job = None
            self.idle.append(identity)


def result_message(job_id: str, index: int, metadata: dict[str, Any], glb: bytes,
                   preview: bytes | None = None) -> Message:
    """A ``result`` message from a stored .glb (the arrays and texture it holds) and the object's preview PNG (a
    small render, for thumbnails), when there is one."""
    import numpy as np

    from ..mesh.gltf import read_glb

    data = read_glb(glb)
    descs, bufs = [], []
    for name, dtype in (("positions", "float32"), ("normals", "float32"), ("uvs", "float32"), ("faces", "uint32")):
        arr = data[name]
        d, b = pack_array(name, np.ascontiguousarray(arr, dtype).data, dtype, list(arr.shape))  # one copy, not two
        descs.append(d)
        bufs.append(b)
    descs.append({"name": "texture", "kind": "png", "dtype": "uint8", "shape": [len(data["png"])]})
    bufs.append(data["png"])
    if preview:
        descs.append({"name": "preview", "kind": "png", "dtype": "uint8", "shape": [len(preview)]})
        bufs.append(preview)
    return Message("result", {"job_id": job_id, "index": index, "seed": int(metadata["seed"]), "metadata": metadata,
                              "buffers": descs}, bufs)


def serve(config: ServeConfig) -> None:
    """The `holofusion serve` command: runs until SIGINT / SIGTERM."""
    server = Server(config)
    workers = (f"{len(server.local_devices)} local worker(s) on {server._devices()}" if server.local_devices
               else "no local workers")
    print(f"holofusion backend {__version__} on tcp://{config.host}:{server.port}"
          f"{' (CURVE encrypted)' if server.encrypted else ''}; {workers}, worker port {server.worker_port}; "
          f"connection file: {server.connection_file}", flush=True)

    def stop(signum, frame):
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
