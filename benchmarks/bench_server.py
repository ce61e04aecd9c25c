"""Protocol overhead and load, against real `holofusion serve` processes on loopback.

    python benchmarks/bench_server.py [--clients 4] [--jobs 25] [--workers 2] [--repeats 20]

1. Ping round trip (median of 500), against a bare ZeroMQ DEALER/ROUTER echo of the same size measured in this run.
2. Moving one object: a 50,000-face mesh with a 1,024^2 texture, stored in the backend's store, fetched and rebuilt
   into arrays by the client (`fetch` + `result_mesh`): median of ``--repeats``, warm (the broker holds the result
   message ready, as for an object it has just stored) and cold (``--repeats`` other jobs, each read from disk and
   digested on its first fetch); target under 20 ms. Baseline: the same bytes over a bare socket with no signing,
   JSON or validation (so the ratio is what the protocol costs).
3. The generation it is part of: one `draft` object from the shipped model through the same backend, request to
   result, so the transfer is read beside it.
4. Load: ``--clients`` clients at once submitting ``--jobs`` draft jobs each to a backend with ``--workers`` local
   workers: every result must arrive exactly once on the wire and be in the store; prints the throughput.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from PIL import Image

from holofusion.client import Client, result_mesh
from holofusion.mesh.gltf import glb_bytes
from holofusion.server.store import ResultStore

OPTIONS = {"texture_size": 256, "faces": 5000}


def uv_sphere(faces: int) -> tuple[np.ndarray, ...]:
    """A UV sphere with about ``faces`` triangles: positions, normals, uvs, faces."""
    nv = int(np.sqrt(faces / 4))
    nu = faces // (2 * nv)
    u, v = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1))
    theta, phi = u * 2 * np.pi, v * np.pi
    pos = np.stack([np.sin(phi) * np.cos(theta), np.cos(phi), np.sin(phi) * np.sin(theta)], -1).reshape(-1, 3)
    idx = np.arange((nu + 1) * (nv + 1)).reshape(nv + 1, nu + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tri = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    uvs = np.stack([u, v], -1).reshape(-1, 2)
    return (0.04 * pos).astype(np.float32), pos.astype(np.float32), uvs.astype(np.float32), tri.astype(np.uint32)


def texture_png(size: int, seed: int = 0) -> bytes:
    """A baked-looking texture: smooth colour fields with fine noise (compresses like a real bake, not like noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.6 + 0.3 * np.sin(6 * x), 0.3 + 0.2 * np.cos(5 * y), 0.2 + 0.1 * np.sin(9 * x * y)], -1)
    img = img + rng.normal(0, 0.02, img.shape)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Backend:
    def __init__(self, tmp: Path, *args: str):
        self.conn = tmp / f"conn-{time.monotonic_ns()}.json"
        self.store = tmp / f"store-{time.monotonic_ns()}"
        self.log = open(self.conn.with_suffix(".log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "holofusion.cli", "serve", "--store", str(self.store),
                                      "--connection-file", str(self.conn), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        while not self.conn.is_file():
            if self.proc.poll() is not None:
                raise SystemExit(f"backend failed: {self.conn.with_suffix('.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


def wait_workers(c: Client, n: int) -> None:
    deadline = time.monotonic() + 300
    while c.status()["workers"] < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"{n} workers did not start")
        time.sleep(0.2)


def bare_round_trip(frames: list[bytes], repeats: int) -> float:
    """Median seconds to send ``frames`` to a bare ROUTER that echoes them back (no protocol at all)."""
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if router.poll(50):
                router.send_multipart(router.recv_multipart())

    t = threading.Thread(target=echo)
    t.start()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dealer.send_multipart(frames)
        dealer.recv_multipart()
        times.append(time.perf_counter() - t0)
    stop.set()
    t.join()
    router.close(0)
    dealer.close(0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=25, help="draft jobs per client in the load run (0: skip it)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--faces", type=int, default=50000)
    ap.add_argument("--texture", type=int, default=1024)
    ap.add_argument("--load-models", default=None, metavar="DIR",
                    help="folder of model folders for the load run (default: the shipped models); e.g. a tiny "
                         "model, so that 100 jobs take a minute rather than the shipped model's draft time x 100")
    ap.add_argument("--load-model", default=None, help="model name in --load-models for the load run")
    ap.add_argument("--load-options", default=None, help="JSON options for the load run's jobs")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_server_"))

    # 1-2: protocol only, a backend without workers and a stored object
    b = Backend(tmp, "--workers", "0")
    pos, nrm, uvs, tri = uv_sphere(args.faces)
    png = texture_png(args.texture)
    glb = glb_bytes(pos, nrm, uvs, tri, png, name="bench")
    # ``repeats`` jobs holding the same object: each is fetched once cold (read from the store's disk files and its
    # buffers digested, as after a backend restart), then the first again and again (warm: the broker keeps result
    # messages ready, as for an object it just finished or one fetched before).
    store = ResultStore(b.store)
    jobs = [f"{i:032x}" for i in range(args.repeats)]
    for job in jobs:
        store.save_job(job, {"state": "done", "request": {}, "seeds": [0]})
        store.save_result(job, 0, glb, png[:100], {"seed": 0, "faces": int(tri.shape[0])})

    def fetch(job: str) -> float:
        t0 = time.perf_counter()
        [msg] = c.fetch(job)
        mesh = result_mesh(msg)
        dt = time.perf_counter() - t0
        assert mesh["faces"][1] == [tri.shape[0], 3] and mesh["texture"] == png
        return dt

    with Client(b.conn) as c:
        c.hello()
        for _ in range(50):
            c.ping()
        ping = statistics.median(c.ping() for _ in range(500))
        ping_bare = bare_round_trip([b"x" * 300], 500)
        cold = statistics.median(fetch(job) for job in jobs)
        move = statistics.median(fetch(jobs[0]) for _ in range(args.repeats))
        raw = [pos.tobytes(), nrm.tobytes(), uvs.tobytes(), tri.tobytes(), png]
        move_bare = bare_round_trip(raw, args.repeats)
    b.stop()
    mb = sum(len(x) for x in raw) / 2**20
    print(f"ping round trip: {ping * 1e3:.3f} ms (bare ZeroMQ echo {ping_bare * 1e3:.3f} ms, x{ping / ping_bare:.1f})")
    print(f"one object, {tri.shape[0]} faces + {args.texture}^2 texture ({mb:.1f} MiB): fetch + rebuild "
          f"{move * 1e3:.1f} ms (target < 20 ms: {'met' if move < 0.020 else 'NOT met'}), cold from the store's files "
          f"{cold * 1e3:.1f} ms ({'met' if cold < 0.020 else 'NOT met'}); bare socket round trip "
          f"{move_bare * 1e3:.1f} ms (x{move / move_bare:.1f} warm, x{cold / move_bare:.1f} cold)")

    # 3-4: generation with the shipped model
    b = Backend(tmp, "--workers", str(args.workers), "--device", "cpu")
    try:
        with Client(b.conn, timeout_s=5.0) as c:
            c.hello()
            wait_workers(c, args.workers)
            first = c.generate(seed=0, preset="draft", options=OPTIONS)  # loads the model in a worker
            list(c.events(first))
            t0 = time.perf_counter()
            one = c.generate(seed=1, preset="draft", options=OPTIONS)
            faces = [e.content["metadata"]["faces"] for e in c.events(one) if e.msg_type == "result"][0]
            gen = time.perf_counter() - t0
        print(f"one draft object from the shipped model ({faces} faces, {OPTIONS['texture_size']}^2 texture), "
              f"request to result: {gen:.2f} s; moving a 50k-face object is {move / gen * 100:.2f} % of that")
    finally:
        b.stop()
    if args.jobs:
        import json

        extra = ("--models", args.load_models) if args.load_models else ()
        opts = json.loads(args.load_options) if args.load_options else OPTIONS
        b = Backend(tmp, "--workers", str(args.workers), "--device", "cpu", *extra)
        try:
            with Client(b.conn, timeout_s=5.0) as c:
                c.hello()
                wait_workers(c, args.workers)
            seen: dict[int, list[tuple[str, list[int]]]] = {}

            def client(k: int) -> None:
                with Client(b.conn, timeout_s=5.0, name=f"load-{k}") as cc:
                    cc.hello()
                    jobs = [cc.generate(seed=1000 * k + i, preset="draft", model=args.load_model, options=opts)
                            for i in range(args.jobs)]
                    seen[k] = [(j, [e.content["seed"] for e in cc.events(j) if e.msg_type == "result"])
                               for j in jobs]

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            total = sum(len(v) for v in seen.values())
            exact = all(seeds == [1000 * k + i] for k, v in seen.items() for i, (_, seeds) in enumerate(v))
            in_store = all(len(list((b.store / j).glob("*.glb"))) == 1 for v in seen.values() for j, _ in v)
            print(f"load: {args.clients} clients x {args.jobs} jobs on {args.workers} workers: {total} results in "
                  f"{wall:.1f} s ({total / wall:.2f} objects/s, {wall / max(total, 1):.2f} s each); each exactly "
                  f"once on the wire: {exact}; all in the store: {in_store}")
        finally:
            b.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
