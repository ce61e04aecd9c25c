"""`holofusion worker`: one device's worth of generation, serving a broker (`holofusion serve`).

The broker owns the clients, the queue and the store; a worker owns a device. It connects a DEALER socket to the
broker's worker port (the guide's load-balancing broker: the worker says ``ready``, the broker hands it one ``job``
at a time), and both sides send ``heartbeat`` every second so either notices the other is gone within
``timeout_s``. A worker that loses its broker cancels what it was running and says ``ready`` again on a fresh
socket (a restarted broker gets its workers back); a broker that loses a worker re-queues its job once.

Two threads, as ZeroMQ sockets are not thread-safe: the socket thread (this class's ``serve_forever``) receives
orders and sends everything the compute thread queued; the compute thread runs one job at a time: for each object
the pipeline (its callback reports progress and honours a cancel within one step), then the mesh chain; each finished
object goes to the broker as an ``object`` message (GLB and preview), which stores it before telling the client.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .. import __version__
from ..errors import UserError
from .protocol import (BROKER_ORDERS, Limits, Message, ProtocolError, ReplayGuard, Signer, curve_options, decode,
                       encode, error_message)

__all__ = ["WorkerConfig", "Worker", "run_worker", "HEARTBEAT_S"]

HEARTBEAT_S = 1.0
WORKER_MESSAGE_BYTES = 1 << 30
"""A worker's results (GLB with a 4096^2 texture) may exceed a client request's limit by far."""


@dataclass
class WorkerConfig:
    address: str
    """tcp://host:port of the broker's worker port."""
    key: str
    device: str = "auto"
    models: str | None = None
    """Folder of model folders (default: the shipped models/)."""
    name: str | None = None
    threads: int | None = None
    """torch CPU threads (default: torch's own choice)."""
    timeout_s: float = 5.0
    """Broker silence after which the worker cancels its job and reconnects."""
    parent_pid: int | None = None
    """A local worker started by ``serve --workers``: it exits when that process is gone."""
    curve_serverkey: str | None = None


class _Cancelled(Exception):
    pass


class Worker:
    def __init__(self, config: WorkerConfig):
        import torch

        self.cfg = config
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self.device = resolve_device(config.device)
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}:{self.device}"
        self.signer = Signer(config.key)
        self.limits = Limits(max_message_bytes=WORKER_MESSAGE_BYTES)
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.seq = 0
        self.outbox: queue.Queue[Message | None] = queue.Queue()
        self.jobs: queue.Queue[Message | None] = queue.Queue()
        self.current: dict[str, Any] | None = None  # {"job_id", "cancel": Event} while a job runs
        self._stop = threading.Event()
        self._pipelines: dict[str, Any] = {}
        self._compute = threading.Thread(target=self._work, name="holofusion-compute", daemon=True)

    # ------------------------------------------------------------------ socket
    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, WORKER_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        curve = curve_options({"curve_serverkey": self.cfg.curve_serverkey})
        for opt, value in (curve or {}).items():
            self.sock.setsockopt(opt, value)
        self.sock.connect(self.cfg.address)
        self.client_id = f"worker-{uuid.uuid4().hex}"  # a new session: sequence numbers restart
        self.replay = ReplayGuard()
        self.seq = 0
        self._send(Message("ready", {"worker": self.name, "device": self.device, "pid": os.getpid(),
                                     "host": socket.gethostname(), "memory": memory()}))

    def _send(self, msg: Message) -> None:
        self.seq += 1
        job_id = msg.content.get("job_id") if isinstance(msg.content, dict) else None
        try:
            self.sock.send_multipart(encode(msg, self.signer, self.client_id, self.seq, job_id=job_id),
                                     zmq.NOBLOCK, copy=not msg.buffers)  # a finished object's GLB is not copied
        except zmq.Again:
            pass  # the broker is not reading; heartbeats will tell

    def serve_forever(self) -> None:
        self._compute.start()
        self._connect()
        last_heard = last_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.cfg.parent_pid is not None and os.getppid() != self.cfg.parent_pid:
                    break  # the serve process that started us is gone
                for _ in range(64):
                    try:
                        msg = self.outbox.get_nowait()
                    except queue.Empty:
                        break
                    self._send(msg)
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_S:
                    self._send(Message("heartbeat"))
                    last_beat = now
                if now - last_heard > self.cfg.timeout_s:
                    # The broker is gone (or restarted): whatever runs is no longer wanted by anyone.
                    self._cancel_current()
                    self._connect()
                    last_heard = now
                    continue
                if self.sock.poll(10):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    try:
                        msg = decode(frames, self.signer, self.replay, self.limits)
                    except ProtocolError as e:
                        print(f"worker: refused a message from the broker: {e.message}", flush=True)
                        continue
                    last_heard = time.monotonic()
                    self._order(msg)
        finally:
            self._cancel_current()
            self.jobs.put(None)
            self._compute.join(timeout=30)
            if self.sock is not None:
                self.sock.close(0)

    def stop(self) -> None:
        self._stop.set()

    def _order(self, msg: Message) -> None:
        t = msg.msg_type
        if t not in BROKER_ORDERS:
            return
        if t == "job":
            self.jobs.put(msg)
        elif t == "cancel":
            cur = self.current
            if cur is not None and cur["job_id"] == msg.content["job_id"]:
                cur["cancel"].set()
        elif t == "free_memory":
            self.jobs.put(msg)  # on the compute thread, between jobs
        elif t == "shutdown":
            self.stop()

    def _cancel_current(self) -> None:
        cur = self.current
        if cur is not None:
            cur["cancel"].set()
        while True:  # jobs handed over but not started belong to the old broker session
            try:
                item = self.jobs.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.jobs.put(None)
                break

    # ------------------------------------------------------------------ compute
    def _pipeline(self, name: str):
        from ..pipeline import MODELS_DIR, HoloFusionPipeline

        if name not in self._pipelines:
            root = Path(self.cfg.models) if self.cfg.models else MODELS_DIR
            self._pipelines[name] = HoloFusionPipeline.from_pretrained(str(root / name), self.device)
        return self._pipelines[name]

    def _work(self) -> None:
        while True:
            order = self.jobs.get()
            if order is None:
                return
            if order.msg_type == "free_memory":
                self._pipelines.clear()
                self.outbox.put(Message("memory_freed", {"memory": free_memory()}))
                continue
            job_id = order.content["job_id"]
            cancel = threading.Event()
            self.current = {"job_id": job_id, "cancel": cancel}
            try:
                self._run(order.content, cancel)
                self.outbox.put(Message("done", {"job_id": job_id, "results": len(order.content["indices"])}))
            except _Cancelled:
                self.outbox.put(Message("cancelled", {"job_id": job_id}))
            except UserError as e:
                self.outbox.put(_job_error(job_id, "generation_failed", str(e)))
            except Exception as e:  # a bug: the job fails with its reason, the worker keeps serving
                traceback.print_exc()
                self.outbox.put(_job_error(job_id, "generation_failed", f"internal error: {e!r}"))
            finally:
                self.current = None

    def _run(self, order: dict[str, Any], cancel: threading.Event) -> None:
        from ..generate import preview_strip
        from ..mesh.asset import AssetConfig, make_asset
        from ..mesh.extract import MeshConfig
        from ..pipeline import PipelineCancelled

        job_id, req = order["job_id"], order["request"]
        opts = req.get("options") or {}
        pipe = self._pipeline(req["model"])
        try:
            # No opacity_length (or null): the model's calibrated surface level.
            level = opts.get("opacity_length")
            cfg = AssetConfig(texture_size=int(opts.get("texture_size", 1024)), size_m=opts.get("size_m"),
                              mesh=MeshConfig(target_faces=int(opts.get("faces", 20000)),
                                              opacity_length=pipe.opacity_length(None if level is None
                                                                                 else float(level))))
        except (TypeError, ValueError) as e:
            raise UserError(f"bad options: {e}") from None
        for index in order["indices"]:
            seed = int(order["seeds"][index])
            t0 = time.perf_counter()

            def callback(stage: str, step: int, total: int, preview) -> bool:
                if cancel.is_set():
                    return False
                elapsed = time.perf_counter() - t0
                eta = elapsed / max(step, 1) * (total - step)
                self.outbox.put(Message("progress", {
                    "job_id": job_id, "index": index, "stage": stage, "step": step, "total": total,
                    "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 3)}))
                if preview is not None:
                    self.outbox.put(preview_message(job_id, index, stage, preview))
                return True

            try:
                out = pipe(seed, req["category"], req["preset"], callback)
            except PipelineCancelled:
                raise _Cancelled() from None
            if cancel.is_set():
                raise _Cancelled()
            grid, field_fn = out.field()
            category = req["category"] or (pipe.categories[0] if len(pipe.categories) == 1 else None)
            asset = make_asset(grid, field_fn, cfg, category)
            metadata = {"model": req["model"], "category": req["category"], "preset": req["preset"], "seed": seed,
                        "faces": asset.mesh.n_faces, "job_id": job_id, "backend_version": __version__,
                        "worker": self.name, "seconds": round(time.perf_counter() - t0, 3)}
            png = asset.png()
            glb = asset.glb(name=f"{category or req['model']}_{seed}", extras={"holofusion": metadata}, png=png)
            preview = png_bytes(preview_strip(out, views=1, size=128))
            self.outbox.put(Message("object", {
                "job_id": job_id, "index": index, "seed": seed, "metadata": metadata,
                "buffers": [{"name": "glb", "kind": "array", "dtype": "uint8", "shape": [len(glb)]},
                            {"name": "preview", "kind": "png", "dtype": "uint8", "shape": [len(preview)]}]},
                [glb, preview]))


def preview_message(job_id: str, index: int, stage: str, image) -> Message:
    import numpy as np

    png = png_bytes((np.asarray(image.clamp(0, 1).cpu().numpy()) * 255 + 0.5).astype(np.uint8))
    return Message("preview", {"job_id": job_id, "index": index, "stage": stage,
                               "buffers": [{"name": "preview", "kind": "png", "dtype": "uint8",
                                            "shape": [len(png)]}]}, [png])


def png_bytes(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _job_error(job_id: str, code: str, message: str) -> Message:
    msg = error_message(code, message)
    msg.content["job_id"] = job_id
    return msg


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    return name


def memory() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        with open("/proc/self/statm") as f:
            info["resident_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        pass
    import sys

    torch = sys.modules.get("torch")  # only a process that already uses torch reports its device memory
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update({"cuda_free_mb": round(free / 2**20), "cuda_total_mb": round(total / 2**20)})
    return info


def free_memory() -> dict[str, Any]:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return memory()


def run_worker(config: WorkerConfig) -> None:
    """The `holofusion worker` command: serves the broker until SIGINT / SIGTERM or its ``shutdown``."""
    import signal

    worker = Worker(config)
    print(f"holofusion worker {worker.name} ({worker.device}) serving {config.address}", flush=True)

    def stop(signum, frame):
        worker.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    worker.serve_forever()
