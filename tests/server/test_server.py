"""End to end against a real `holofusion serve` process with a tiny model: hello, generate with progress, results that
rebuild the stored mesh exactly, fetch after a reconnect, deduplicated retries, cancel mid-stage, hostile and
unsigned frames, the server killed mid-job, and the connection file's permissions."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from holofusion.client import BackendError, BackendLost, Client, result_mesh
from holofusion.mesh.gltf import read_glb
from holofusion.server.protocol import DELIMITER, Message, Signer, decode, encode

from serverproc import OPTIONS, Backend  # tests/ is on sys.path under pytest (its conftest.py)


@pytest.fixture(scope="module")
def models(tiny_models) -> Path:
    return tiny_models["pipeline"].parent  # holds the "pipe" model folder


@pytest.fixture
def backend(models, tmp_path):
    b = Backend(models, tmp_path)
    yield b
    b.stop()


def test_generate_streams_progress_and_results_that_rebuild_the_stored_mesh(backend):
    with Client(backend.conn) as c:
        welcome = c.hello()
        assert welcome["device"] == "cpu" and [m["name"] for m in welcome["models"]] == ["pipe"]
        job = c.generate(seed=3, model="pipe", preset="draft", count=2, options=OPTIONS)
        events = list(c.events(job))
    kinds = [e.msg_type for e in events]
    assert kinds[-1] == "done" and kinds.count("result") == 2 and "progress" in kinds
    progress = [e.content for e in events if e.msg_type == "progress"]
    assert {p["stage"] for p in progress} == {"coarse"} and progress[-1]["step"] == progress[-1]["total"]
    results = [e for e in events if e.msg_type == "result"]
    assert [r.content["seed"] for r in results] == [3, 4]
    for r in results:
        mesh = result_mesh(r)
        stored = read_glb((backend.store / job / f"{r.content['index']}.glb").read_bytes())
        pos, shape = mesh["positions"]
        assert np.array_equal(np.asarray(pos, np.float32).reshape(shape), stored["positions"])
        faces, fshape = mesh["faces"]
        assert np.array_equal(np.asarray(faces, np.uint32).reshape(fshape), stored["faces"])
        assert mesh["texture"] == stored["png"]
        assert (backend.store / job / f"{r.content['index']}.png").is_file()


def test_fetch_after_reconnect_and_retried_requests_run_once(backend):
    with Client(backend.conn) as c:
        c.hello()
        job = c.generate(seed=5, model="pipe", preset="draft", options=OPTIONS, request_id="same")
        again = c.generate(seed=5, model="pipe", preset="draft", options=OPTIONS, request_id="same")
        assert again == job
        list(c.events(job))
    with Client(backend.conn) as other:  # a new connection (e.g. Blender restarted)
        other.hello()
        fetched = other.fetch(job)
    assert [m.content["seed"] for m in fetched] == [5]
    assert json.loads((backend.store / job / "job.json").read_text())["state"] == "done"
    assert len(list((backend.store / job).glob("*.glb"))) == 1  # one run, not two


def test_cancel_mid_stage(backend):
    with Client(backend.conn) as c:
        c.hello()
        job = c.generate(seed=1, model="pipe", preset="standard", options=OPTIONS)
        seen, asked_at = [], None
        for e in c.events(job):
            seen.append(e)
            if asked_at is None and e.msg_type == "preview" and e.content["stage"] == "distill":
                # a live thumbnail of the distillation: a PNG; then cancel in the middle of the stage
                assert e.buffer("preview")[1][:8] == b"\x89PNG\r\n\x1a\n"
                asked_at = max(x.content["step"] for x in seen if x.msg_type == "progress")
                c.cancel(job)
        assert asked_at is not None and seen[-1].msg_type == "cancelled"
        distill = [e.content for e in seen if e.msg_type == "progress" and e.content["stage"] == "distill"]
        assert asked_at < distill[-1]["total"]
        assert max(p["step"] for p in distill) <= asked_at + 2  # honoured within a step or two of the request
        assert c.status()["running"] == []
    assert json.loads((backend.store / job / "job.json").read_text())["state"] == "cancelled"


def test_bad_requests_get_typed_errors(backend):
    with Client(backend.conn) as c:
        c.hello()
        for kwargs, code in (({"model": "nope"}, "unknown_model"), ({"category": "donut"}, "unknown_category"),
                             ({"preset": "ultra"}, "invalid_request")):
            with pytest.raises(BackendError) as e:
                c.generate(**{"seed": 0, "model": "pipe", "preset": "draft", **kwargs})
            assert e.value.code == code


def test_a_request_without_a_model_goes_to_the_model_that_knows_its_category(backend):
    # The backend holds one model, "pipe" (apple), and not the default: a category alone finds it.
    with Client(backend.conn) as c:
        c.hello()
        job = c.generate(seed=2, model=None, category="apple", preset="draft", options=OPTIONS)
        assert list(c.events(job))[-1].msg_type == "done"
        with pytest.raises(BackendError) as e:
            c.generate(seed=0, model=None, category="teapot", preset="draft")
    assert e.value.code == "unknown_category" and "known: apple" in str(e.value)
    assert json.loads((backend.store / job / "job.json").read_text())["request"]["model"] == "pipe"


def test_hostile_frames_leave_the_server_serving(backend):
    info = json.loads(backend.conn.read_text())
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{info['port']}")
    good = Signer(info["key"])
    wrong = Signer("not the key")
    codes = []

    def answer() -> str | None:
        if not s.poll(2000):
            return None
        m = decode(s.recv_multipart(), good)
        return m.content.get("code") if m.msg_type == "error" else m.msg_type

    s.send_multipart(encode(Message("ping"), wrong, "x", 1))
    codes.append(answer())
    ping = encode(Message("ping"), good, "x", 1)
    s.send_multipart([DELIMITER, b""] + ping[2:])  # unsigned
    codes.append(answer())
    s.send_multipart(ping)
    codes.append(answer())
    s.send_multipart(ping)  # replayed
    codes.append(answer())
    s.send_multipart(ping[:3])  # truncated
    codes.append(answer())
    assert codes == ["bad_signature", "bad_signature", "pong", "replayed", "malformed"]
    s.close(0)
    with Client(backend.conn) as c:  # still serving
        assert c.ping() < 1.0


# One valid signed message to mutate, and ways to break it: every one must meet a typed error or silence.


def _mutations(valid: list[bytes]):
    frame = st.binary(max_size=96)
    return st.one_of(
        st.lists(frame, min_size=1, max_size=8),  # random frames
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255), st.integers(0, 255)).map(
            lambda t: [f if i != t[0] else (f[:t[1] % max(len(f), 1)] + bytes([t[2]]) + f[t[1] % max(len(f), 1) + 1:])
                       for i, f in enumerate(valid)]),  # one byte of one frame changed
        st.integers(0, len(valid)).map(lambda n: valid[:n]),  # truncated
        st.lists(frame, max_size=3).map(lambda extra: valid + extra),  # unannounced buffers
        st.permutations(valid),  # frames reordered
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ten_thousand_hostile_frames_on_the_live_socket(backend, data):
    info = json.loads(backend.conn.read_text())
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{info['port']}")
    valid = encode(Message("generate", {"model": "pipe", "category": None, "seed": 1, "preset": "draft",
                                        "count": 1, "options": {}, "request_id": "x"}), Signer(info["key"]),
                   "fuzz", 1)
    for frames in data.draw(st.lists(_mutations(valid), min_size=100, max_size=100)):
        s.send_multipart(list(frames) or [b""])
    s.close(0)
    with Client(backend.conn) as c:  # every 100 frames: the server still answers at once
        assert c.ping() < 1.0


def test_connection_file_is_owner_only(backend):
    mode = stat.S_IMODE(os.stat(backend.conn).st_mode)
    assert mode == 0o600
    info = json.loads(backend.conn.read_text())
    assert info["ip"] == "127.0.0.1" and len(info["key"]) == 64


def test_server_killed_mid_job_is_reported_and_a_restart_serves_with_the_store_intact(models, tmp_path):
    first = Backend(models, tmp_path)
    with Client(first.conn) as c:  # the default timeouts
        c.hello()
        done_job = c.generate(seed=2, model="pipe", preset="draft", options=OPTIONS)
        list(c.events(done_job))
        job = c.generate(seed=1, model="pipe", preset="standard", options=OPTIONS)
        t_kill = None
        with pytest.raises(BackendLost):
            for e in c.events(job):
                if t_kill is None and e.msg_type == "progress" and e.content["stage"] == "distill":
                    first.kill()
                    t_kill = time.monotonic()
        assert time.monotonic() - t_kill < 3.0
    second = Backend(models, tmp_path, store=first.store)
    try:
        with Client(second.conn) as c:
            c.hello()
            assert [m.content["seed"] for m in c.fetch(done_job)] == [2]
            job3 = c.generate(seed=9, model="pipe", preset="draft", options=OPTIONS)
            assert [e.msg_type for e in c.events(job3)][-1] == "done"
    finally:
        second.stop()


def test_generate_cli_through_the_backend(backend, tmp_path):
    out = tmp_path / "remote.glb"
    r = subprocess.run([sys.executable, "-m", "holofusion.cli", "generate", "--server", str(backend.conn),
                        "--model", "pipe", "--preset", "draft", "--seed", "4", "--opacity-length", "20",
                        "--texture-size", "128", "--faces", "2000", "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = read_glb(out.read_bytes())
    assert data["json"]["nodes"][0]["extras"]["holofusion"]["seed"] == 4 and 0 < data["faces"].shape[0] <= 2000
    bad = subprocess.run([sys.executable, "-m", "holofusion.cli", "generate", "--server", str(tmp_path / "no.json"),
                          "--out", str(tmp_path / "x.glb")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no connection file" in bad.stderr
