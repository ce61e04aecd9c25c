"""`holofusion serve`: the backend's ROUTER server (protocol: docs/PROTOCOL.md).

One thread owns the socket (ZeroMQ sockets are not thread-safe): it receives, checks and answers requests and sends
whatever the worker queued for clients. One worker thread owns the device and runs jobs one at a time: for each
object, the pipeline (its callback reports progress and honours a cancel within one step), the mesh chain, then the
result is written to the store and only then announced. A repeated request id from the same client returns the job
it already made; every job ends in exactly one of done / cancelled / failed, recorded in the store.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from .. import DEFAULT_MODEL, __version__
from ..errors import UserError
from .protocol import (PROTOCOL_VERSION, Limits, Message, ProtocolError, ReplayGuard, Signer, decode, encode,
                       error_message, new_key, pack_array)
from .store import ResultStore

__all__ = ["Server", "ServeConfig", "default_connection_file", "write_connection_file"]


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


@dataclass
class Job:
    job_id: str
    identity: bytes
    client_id: str
    request_id: str
    request: dict[str, Any]
    seeds: list[int]
    state: str = "queued"
    results: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "seeds": self.seeds, "results": self.results,
                "model": self.request.get("model"), "preset": self.request.get("preset")}


class _Cancelled(Exception):
    pass


class Server:
    """Bind, write the connection file, serve until ``stop()``."""

    def __init__(self, config: ServeConfig):
        self.cfg = config
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            raise UserError(f"--host {config.host}: only loopback is served without encryption; remote access needs "
                            "CURVE, which this version does not offer yet")
        self.key = new_key()
        self.signer = Signer(self.key)
        self.replay = ReplayGuard()
        self.store = ResultStore(config.store or default_config_dir() / "store")
        self.models_dir = Path(config.models) if config.models else None
        self.device = self._device(config.device)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.limits.max_message_bytes)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if config.port:
            self.sock.bind(f"tcp://{config.host}:{config.port}")
            self.port = config.port
        else:
            self.port = self.sock.bind_to_random_port(f"tcp://{config.host}")
        self.connection_file = Path(config.connection_file) if config.connection_file else default_connection_file()
        write_connection_file(self.connection_file, {
            "transport": "tcp", "ip": config.host, "port": self.port, "key": self.key,
            "signature_scheme": "hmac-sha256", "protocol_version": PROTOCOL_VERSION, "pid": os.getpid()})
        self.seq = 0
        self.outbox: queue.Queue[tuple[bytes, Message, str | None, str | None]] = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self.by_request: dict[tuple[str, str], str] = {}
        self.pending: queue.Queue[Job] = queue.Queue()
        self.running: Job | None = None
        self._stop = threading.Event()
        self._pipelines: dict[str, Any] = {}
        self._worker = threading.Thread(target=self._work, name="holofusion-worker", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def _device(name: str) -> str:
        import torch

        if name == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if name != "cpu" and not name.startswith("cuda"):
            raise UserError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
        return name

    def serve_forever(self) -> None:
        self._worker.start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for _ in range(64):
                    try:
                        identity, msg, job_id, reply_to = self.outbox.get_nowait()
                    except queue.Empty:
                        break
                    self._send(identity, msg, job_id, reply_to)
                if dict(poller.poll(10)).get(self.sock):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    self._receive(frames)
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        # Queued jobs are cancelled (recorded), the running one stops at its next step.
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            self._finish(job, "cancelled")
        if self.running is not None:
            self.running.cancel.set()
        self.pending.put(None)  # wakes the worker so it exits
        self._worker.join(timeout=30)
        self.sock.close(0)
        try:
            self.connection_file.unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ wire
    def _send(self, identity: bytes, msg: Message, job_id: str | None = None, reply_to: str | None = None) -> None:
        self.seq += 1
        try:
            frames = encode(msg, self.signer, "server", self.seq, job_id=job_id, reply_to=reply_to)
            self.sock.send_multipart([identity] + frames)
        except zmq.ZMQError:
            pass  # the client is gone; its results are in the store for a later fetch

    def _reply(self, identity: bytes, msg: Message, request: Message | None = None,
               job_id: str | None = None) -> None:
        self._send(identity, msg, job_id, request.msg_id if request is not None else None)

    def _receive(self, frames: list[bytes]) -> None:
        # ROUTER puts the peer's identity first; a DEALER client sends nothing before the delimiter.
        identity, body = frames[0], frames[1:]
        try:
            msg = decode(body, self.signer, self.replay, self.cfg.limits)
        except ProtocolError as e:
            self._reply(identity, error_message(e.code, e.message))
            return
        try:
            self._handle(identity, msg)
        except ProtocolError as e:
            self._reply(identity, error_message(e.code, e.message), msg)

    # ------------------------------------------------------------------ requests
    def _models(self) -> list[dict[str, Any]]:
        from ..generate import list_models
        from ..pipeline import MODELS_DIR

        return list_models(self.models_dir or MODELS_DIR)

    def _handle(self, identity: bytes, msg: Message) -> None:
        t, c = msg.msg_type, msg.content
        if t == "hello":
            from ..pipeline import PRESETS

            self._reply(identity, Message("welcome", {
                "server": "holofusion", "version": __version__, "device": self.device, "memory": _memory(),
                "models": self._models(), "presets": list(PRESETS),
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
            job.cancel.set()
            if job.state == "queued":
                self._finish(job, "cancelled")
                self._reply(job.identity, Message("cancelled", {"job_id": job.job_id}), msg, job.job_id)
        elif t == "status":
            queued = [j.summary() for j in self.jobs.values() if j.state == "queued"]
            running = [self.running.summary()] if self.running is not None else []
            self._reply(identity, Message("status_reply", {"queue": queued, "running": running, "workers": 1}), msg)
        elif t == "fetch":
            self._fetch(identity, msg)
        elif t == "free_memory":
            self.outbox.put((identity, Message("memory_freed", {"memory": self._free()}), None, msg.msg_id))
        else:
            raise ProtocolError("unknown_type", f"{t!r} is a message the server sends, not one it accepts")

    def _generate(self, identity: bytes, msg: Message) -> None:
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
        models = {m["name"]: m for m in self._models()}
        model = c["model"] or DEFAULT_MODEL
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
        if self.pending.qsize() >= self.cfg.max_queue:
            raise ProtocolError("busy", f"the queue holds {self.cfg.max_queue} jobs; try again later")
        job = Job(secrets.token_hex(16), identity, msg.header["client_id"], c["request_id"],
                  {**c, "model": model}, [c["seed"] + i for i in range(c["count"])])
        self.jobs[job.job_id] = job
        self.by_request[key] = job.job_id
        self.store.save_job(job.job_id, {"request": job.request, "state": "queued", "seeds": job.seeds,
                                         "client_id": job.client_id, "request_id": job.request_id})
        self._reply(identity, Message("accepted", {"job_id": job.job_id, "request_id": job.request_id,
                                                   "position": self.pending.qsize(), "seeds": job.seeds}),
                    msg, job.job_id)
        self.pending.put(job)

    def _fetch(self, identity: bytes, msg: Message) -> None:
        job_id = msg.content["job_id"]
        record = self.store.job(job_id)
        if record is None:
            raise ProtocolError("unknown_job", f"no job {job_id!r} in this backend's store")
        stored = self.store.results(job_id)
        for index, meta, glb in stored:
            self._reply(identity, result_message(job_id, index, meta, glb), msg, job_id)
        self._reply(identity, Message("done", {"job_id": job_id, "results": len(stored)}), msg, job_id)

    def _free(self) -> dict[str, Any]:
        import gc

        import torch

        self._pipelines.clear() if self.running is None else None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _memory()

    # ------------------------------------------------------------------ worker
    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state = state
        record = self.store.job(job.job_id) or {}
        record.update({"state": state, "results": job.results, "error": error})
        self.store.save_job(job.job_id, record)

    def _pipeline(self, name: str):
        from ..pipeline import MODELS_DIR, HoloFusionPipeline

        if name not in self._pipelines:
            root = self.models_dir or MODELS_DIR
            self._pipelines[name] = HoloFusionPipeline.from_pretrained(str(root / name), self.device)
        return self._pipelines[name]

    def _work(self) -> None:
        while True:
            job = self.pending.get()
            if job is None:
                return
            if job.state != "queued":
                continue
            self.running = job
            job.state = "running"
            try:
                self._run(job)
                self._finish(job, "done")
                self.outbox.put((job.identity, Message("done", {"job_id": job.job_id, "results": job.results}),
                                 job.job_id, None))
            except _Cancelled:
                self._finish(job, "cancelled")
                self.outbox.put((job.identity, Message("cancelled", {"job_id": job.job_id}), job.job_id, None))
            except UserError as e:
                self._finish(job, "failed", str(e))
                self.outbox.put((job.identity, error_message("generation_failed", str(e)), job.job_id, None))
            except Exception as e:  # a bug: the job fails with its reason, the server keeps serving
                traceback.print_exc()
                self._finish(job, "failed", repr(e))
                self.outbox.put((job.identity, error_message("generation_failed", f"internal error: {e!r}"),
                                 job.job_id, None))
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        from ..generate import preview_strip
        from ..mesh.asset import AssetConfig, make_asset
        from ..mesh.extract import MeshConfig
        from ..pipeline import PipelineCancelled

        req = job.request
        opts = req.get("options") or {}
        try:
            cfg = AssetConfig(texture_size=int(opts.get("texture_size", 1024)), size_m=opts.get("size_m"),
                              mesh=MeshConfig(target_faces=int(opts.get("faces", 20000)),
                                              opacity_length=float(opts.get("opacity_length", 1.0))))
        except (TypeError, ValueError) as e:
            raise UserError(f"bad options: {e}") from None
        pipe = self._pipeline(req["model"])
        for index, seed in enumerate(job.seeds):
            t0 = time.perf_counter()

            def callback(stage: str, step: int, total: int, preview) -> bool:
                if job.cancel.is_set():
                    return False
                elapsed = time.perf_counter() - t0
                eta = elapsed / max(step, 1) * (total - step)
                self.outbox.put((job.identity, Message("progress", {
                    "job_id": job.job_id, "index": index, "stage": stage, "step": step, "total": total,
                    "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 3)}), job.job_id, None))
                if preview is not None:
                    self.outbox.put((job.identity, preview_message(job.job_id, index, stage, preview), job.job_id,
                                     None))
                return True

            try:
                out = pipe(seed, req["category"], req["preset"], callback)
            except PipelineCancelled:
                raise _Cancelled() from None
            if job.cancel.is_set():
                raise _Cancelled()
            grid, field_fn = out.field()
            category = req["category"] or (pipe.categories[0] if len(pipe.categories) == 1 else None)
            asset = make_asset(grid, field_fn, cfg, category)
            metadata = {"model": req["model"], "category": req["category"], "preset": req["preset"], "seed": seed,
                        "faces": asset.mesh.n_faces, "job_id": job.job_id, "backend_version": __version__,
                        "seconds": round(time.perf_counter() - t0, 3)}
            png = asset.png()
            glb = asset.glb(name=f"{category or req['model']}_{seed}", extras={"holofusion": metadata}, png=png)
            self.store.save_result(job.job_id, index, glb, _png(preview_strip(out, views=1, size=128)), metadata)
            job.results += 1
            self.outbox.put((job.identity, result_message(job.job_id, index, metadata, glb), job.job_id, None))


def result_message(job_id: str, index: int, metadata: dict[str, Any], glb: bytes) -> Message:
    """A ``result`` message from a stored .glb (the arrays and texture it holds)."""
    from ..mesh.gltf import read_glb

    data = read_glb(glb)
    descs, bufs = [], []
    for name, dtype in (("positions", "float32"), ("normals", "float32"), ("uvs", "float32"), ("faces", "uint32")):
        arr = data[name]
        d, b = pack_array(name, arr.astype(dtype).tobytes(), dtype, list(arr.shape))
        descs.append(d)
        bufs.append(b)
    descs.append({"name": "texture", "kind": "png", "dtype": "uint8", "shape": [len(data["png"])]})
    bufs.append(bytes(data["png"]))
    return Message("result", {"job_id": job_id, "index": index, "seed": int(metadata["seed"]), "metadata": metadata,
                              "buffers": descs}, bufs)


def preview_message(job_id: str, index: int, stage: str, image) -> Message:
    import numpy as np

    png = _png((np.asarray(image.clamp(0, 1).cpu().numpy()) * 255 + 0.5).astype(np.uint8))
    return Message("preview", {"job_id": job_id, "index": index, "stage": stage,
                               "buffers": [{"name": "preview", "kind": "png", "dtype": "uint8",
                                            "shape": [len(png)]}]}, [png])


def _png(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _memory() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {}
    try:
        with open("/proc/self/statm") as f:
            info["resident_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update({"cuda_free_mb": round(free / 2**20), "cuda_total_mb": round(total / 2**20)})
    return info


def serve(config: ServeConfig) -> None:
    """The `holofusion serve` command: runs until SIGINT / SIGTERM."""
    server = Server(config)
    print(f"holofusion backend {__version__} on tcp://{config.host}:{server.port} ({server.device}); "
          f"connection file: {server.connection_file}", flush=True)

    def stop(signum, frame):
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
