"""`holofusion demo`: the quick start's main job, end to end on this machine. It builds the Blender extension from this
checkout, starts a backend on the shipped model, and runs the real Blender (the bpy module) headless in its own
process: the extension is installed from its zip into a private user folder, connects, populates a small scene
through its own operators, and the scene is saved (out/scene.blend), the first object exported (out/<name>.glb) and
the scene rendered with Cycles on the CPU (out/preview.png)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

__all__ = ["DemoConfig", "run_demo"]

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class DemoConfig:
    out: str = "out"
    count: int = 6
    seed: int = 0
    preset: str = "draft"
    model: str | None = None
    samples: int = 32
    resolution: int = 640
    device: str = "auto"


def _platform() -> str:
    machine = platform.machine().lower()
    if sys.platform.startswith("linux") and machine in ("x86_64", "amd64"):
        return "linux-x64"
    if sys.platform == "darwin":
        return "macos-arm64" if machine == "arm64" else "macos-x64"
    if sys.platform == "win32":
        return "windows-x64"
    raise UserError(f"no extension build for {sys.platform} / {machine}")


def run_demo(cfg: DemoConfig) -> dict:
    try:
        import bpy  # noqa: F401  (only to say clearly when it is missing)
    except ImportError:
        raise UserError("the demo runs the real Blender as a Python module: pip install bpy==5.0.1 "
                        "(or pip install -e '.[blender]')") from None
    if not (ROOT / "build_addon.py").is_file():
        raise UserError(f"build_addon.py is not beside this installation ({ROOT}); run the demo from a checkout "
                        "installed with pip install -e .")
    if cfg.count < 1:
        raise UserError(f"--count {cfg.count}: at least 1")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="holofusion-demo-"))
    print("building the Blender extension ...", flush=True)
    r = subprocess.run([sys.executable, str(ROOT / "build_addon.py"), "--platforms", _platform(), "--lines", "py311",
                        "--out", str(work / "dist")], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"build_addon.py failed: {r.stderr.strip()}")
    [zip_path] = (work / "dist").glob("*.zip")
    conn = work / "backend.json"
    log = open(work / "backend.log", "wb")
    backend = subprocess.Popen([sys.executable, "-m", "holofusion.cli", "serve", "--connection-file", str(conn),
                                "--store", str(work / "store"), "--device", cfg.device],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not conn.is_file():
            if backend.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the backend did not start: {(work / 'backend.log').read_text()[-1500:]}")
            time.sleep(0.1)
        print(f"backend up ({conn}); running Blender headless ...", flush=True)
        env = dict(os.environ, BLENDER_USER_RESOURCES=str(work / "blender-user"))
        args = {"zip": str(zip_path), "connection": str(conn), "out": str(out), "count": cfg.count,
                "seed": cfg.seed, "preset": cfg.preset, "model": cfg.model, "samples": cfg.samples,
                "resolution": cfg.resolution}
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("blender_scene.py")), json.dumps(args)],
                           env=env, text=True, capture_output=True)
        facts = [ln for ln in r.stdout.splitlines() if ln.startswith("DEMO ")]
        for ln in r.stdout.splitlines():
            if ln.startswith("demo: "):
                print(ln[6:], flush=True)
        if r.returncode != 0 or not facts:
            raise UserError(f"the Blender session failed: {(r.stderr or r.stdout).strip()[-1500:]}")
        return json.loads(facts[-1][5:])
    finally:
        backend.terminate()
        try:
            backend.wait(30)
        except subprocess.TimeoutExpired:
            backend.kill()
        log.close()
