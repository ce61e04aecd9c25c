"""A real `holofusion serve` process for the server tests, and the tiny model's generation options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The tiny model's coarse grids are faint: a long opacity length puts their surface in fainter density.
OPTIONS = {"opacity_length": 20.0, "texture_size": 128, "faces": 2000}


class Backend:
    """A real `holofusion serve` process (its workers are processes too); output in a log file beside it."""

    def __init__(self, models: Path, tmp: Path, store: Path | None = None, args: tuple[str, ...] = ()):
        self.conn = tmp / f"conn-{time.monotonic_ns()}.json"
        self.store = store or tmp / "store"
        self.log = self.conn.with_suffix(".log")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "holofusion.cli", "serve", "--models", str(models),
                                          "--store", str(self.store), "--connection-file", str(self.conn),
                                          "--device", "cpu", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not self.conn.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"backend did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
