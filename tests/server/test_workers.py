"""Scale-out against real processes: a broker (`holofusion serve`) with local worker processes or with workers that
connected themselves (`holofusion worker --connect`), sharing one queue; workers killed mid-job (the job re-queued
once with only what was not stored yet, then failed in words, never lost or doubled); many clients at once; CURVE."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from holofusion.client import BackendError, Client
from holofusion.server.protocol import Message, Signer, encode

from serverproc import OPTIONS, Backend


@pytest.fixture(scope="module")
def models(tiny_models) -> Path:
    return tiny_models["pipeline"].parent


def start_worker(conn: Path, models: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "holofusion.cli", "worker", "--connect", str(conn),
                                 "--device", "cpu", "--models", str(models), "--threads", "1"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_workers(c: Client, n: int, timeout: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = c.status()
        if status["workers"] >= n:
            return status["worker_list"]
        time.sleep(0.2)
    raise AssertionError(f"{n} workers did not connect in {timeout} s: {c.status()}")


def runner_pid(c: Client, job: str) -> int:
    for w in c.status()["worker_list"]:
        if w["job_id"] == job:
            return int(w["pid"])
    raise AssertionError(f"no worker runs {job}")


def stored(backend: Backend, job: str) -> list[int]:
    return sorted(int(p.stem) for p in (backend.store / job).glob("*.glb"))


def test_two_local_workers_share_one_queue(models, tmp_path):
    b = Backend(models, tmp_path, args=("--workers", "2"))
    try:
        with Client(b.conn) as c:
            c.hello()
            names = {w["name"] for w in wait_workers(c, 2)}
            jobs = [c.generate(seed=s, model="pipe", preset="draft", options=OPTIONS) for s in range(4)]
            assert len(c.status()["running"]) == 2  # one job per worker at a time, the others queued
            makers = set()
            for job in jobs:
                results = [e for e in c.events(job) if e.msg_type == "result"]
                assert len(results) == 1
                makers.add(results[0].content["metadata"]["worker"])
        assert makers == names  # both workers took jobs from the one queue
        for job in jobs:
            assert stored(b, job) == [0]
    finally:
        b.stop()
    assert b.proc.returncode == 0


def test_a_remote_worker_killed_mid_job_has_its_job_requeued_without_doubling(models, tmp_path):
    b = Backend(models, tmp_path, args=("--workers", "0", "--worker-timeout", "2"))
    workers = [start_worker(b.conn, models, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        with Client(b.conn) as c:
            assert c.hello()["device"] == "none"  # no worker yet: jobs would wait in the queue
            wait_workers(c, 2)
            job = c.generate(seed=11, model="pipe", preset="draft", count=3, options=OPTIONS)
            events, killed = [], None
            for e in c.events(job):
                events.append(e)
                if killed is None and e.msg_type == "result":  # one object stored, the next one in progress
                    killed = runner_pid(c, job)
                    os.kill(killed, signal.SIGKILL)
            kinds = [e.msg_type for e in events]
            assert "requeued" in [e.content.get("stage") for e in events if e.msg_type == "progress"]
            assert kinds[-1] == "done"
            indices = [e.content["index"] for e in events if e.msg_type == "result"]
            assert sorted(indices) == [0, 1, 2] and len(set(indices)) == 3  # each object exactly once
            makers = {e.content["metadata"]["worker"] for e in events if e.msg_type == "result"}
            assert len(makers) == 2
        assert stored(b, job) == [0, 1, 2]
        record = json.loads((b.store / job / "job.json").read_text())
        assert record["state"] == "done" and record["attempts"] == 2 and record["results"] == 3
    finally:
        b.stop()
        for w in workers:
            w.kill()
            w.wait(10)


def test_a_job_whose_worker_dies_twice_fails_in_words_and_local_workers_restart(models, tmp_path):
    b = Backend(models, tmp_path, args=("--workers", "1"))
    try:
        with Client(b.conn) as c:
            c.hello()
            wait_workers(c, 1)
            job = c.generate(seed=2, model="pipe", preset="standard", options=OPTIONS)
            kills = []
            with pytest.raises(BackendError) as err:
                for e in c.events(job):
                    if e.msg_type == "progress" and e.content["stage"] == "distill" and len(kills) < 2:
                        pid = runner_pid(c, job)
                        if pid not in kills:
                            os.kill(pid, signal.SIGKILL)
                            kills.append(pid)
            assert err.value.code == "worker_lost" and "second time" in str(err.value)
            assert len(kills) == 2
            wait_workers(c, 1)  # restarted once more: the backend still serves
            again = c.generate(seed=3, model="pipe", preset="draft", options=OPTIONS)
            assert [e.msg_type for e in c.events(again)][-1] == "done"
        record = json.loads((b.store / job / "job.json").read_text())
        assert record["state"] == "failed" and "lost" in record["error"]
        assert "restarting it" in b.output()
    finally:
        b.stop()


def test_four_clients_each_get_every_result_exactly_once(models, tmp_path):
    b = Backend(models, tmp_path, args=("--workers", "2"))
    per_client = 5
    outcome: dict[int, list] = {}
    try:
        with Client(b.conn) as c:
            c.hello()
            wait_workers(c, 2)

        def client(k: int) -> None:
            with Client(b.conn, name=f"load-{k}") as c:
                c.hello()
                jobs = [c.generate(seed=100 * k + i, model="pipe", preset="draft", options=OPTIONS)
                        for i in range(per_client)]
                outcome[k] = [(job, [e.content["seed"] for e in c.events(job) if e.msg_type == "result"])
                              for job in jobs]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert sorted(outcome) == [0, 1, 2, 3]
        for k, results in outcome.items():
            assert [seeds for _, seeds in results] == [[100 * k + i] for i in range(per_client)]
            for job, _ in results:
                assert stored(b, job) == [0]
    finally:
        b.stop()


def test_curve_encrypts_and_a_plain_socket_gets_nothing(models, tmp_path):
    b = Backend(models, tmp_path, args=("--workers", "1", "--curve"))
    try:
        info = json.loads(b.conn.read_text())
        assert len(info["curve_serverkey"]) == 40  # Z85 of a 32-byte public key
        with Client(b.conn) as c:
            assert c.hello()["encrypted"] is True
            wait_workers(c, 1)  # the local worker connected with CURVE too
            job = c.generate(seed=1, model="pipe", preset="draft", options=OPTIONS)
            assert [e.msg_type for e in c.events(job)][-1] == "done"
        plain = zmq.Context.instance().socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(f"tcp://127.0.0.1:{info['port']}")
        plain.send_multipart(encode(Message("ping"), Signer(info["key"]), "plain", 1))
        assert not plain.poll(1500)  # the handshake fails: a signed message without CURVE is never even read
        plain.close(0)
    finally:
        b.stop()


def test_worker_and_serve_bad_input_gets_one_line(tmp_path):
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "holofusion.cli", *args], capture_output=True, text=True,
                              timeout=120, env=env)

    r = run("worker", "--connect", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "no connection file" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "HOLOFUSION_KEY"}
    r = run("worker", "--connect", "tcp://127.0.0.1:1", env=env)
    assert r.returncode == 2 and "HOLOFUSION_KEY" in r.stderr
    r = run("serve", "--workers", "-1", "--connection-file", str(tmp_path / "c.json"))
    assert r.returncode == 2 and "--workers -1" in r.stderr
    r = run("serve", "--worker-timeout", "0")
    assert r.returncode == 2 and "--worker-timeout" in r.stderr
