"""The extension in the real Blender (the bpy module, in its own process with a temporary user folder): built with
build_addon.py, installed from its zip as an extension, enabled, and driven against a real backend with a tiny
model: generate, re-roll in place, populate a grid, the main thread's longest step while a job streams, cancel,
the backend killed mid-job, disable (no thread left). Also: build_addon.py's manifest checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from serverproc import Backend  # tests/ is on sys.path under pytest (its conftest.py)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import build_addon  # noqa: E402  (the repository root's build script)


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, str(ROOT / "build_addon.py"), "--platforms", "linux-x64", "--lines",
                        "py311", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    [zip_path] = out.glob("*.zip")
    return zip_path


def test_zip_carries_the_manifest_wheel_and_wire_client(addon_zip):
    with zipfile.ZipFile(addon_zip) as z:
        names = set(z.namelist())
        manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
        wheel = z.read(manifest["wheels"][0][2:])
    assert {"__init__.py", "wire/client.py", "wire/server/protocol.py"} <= names
    assert manifest["platforms"] == ["linux-x64"] and manifest["blender_version_max"] == "5.1.0"
    assert manifest["wheels"][0].startswith("./wheels/pyzmq-") and "cp311" in manifest["wheels"][0]
    cached = ROOT / "dist" / "wheels" / Path(manifest["wheels"][0]).name
    if cached.is_file():
        assert wheel == cached.read_bytes()  # unmodified from the registry
    assert (ROOT / "backend/holofusion/client.py").read_bytes() == z_read(addon_zip, "wire/client.py")


def z_read(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(name)


def test_manifest_rules_are_checked_in_words():
    good = tomllib.loads((ROOT / "blender_addon/blender_manifest.toml").read_text())
    assert build_addon.check_manifest(good) == []
    bad = dict(good, tagline="x" * 70 + ".", blender_version_min="4.1.0", id="Holo-Fusion", version="1.0")
    bad.pop("maintainer")
    bad["permissions"] = {"files": "reads files."}
    problems = "\n".join(build_addon.check_manifest(bad))
    for words in ("'maintainer' is required", "at most 64", "ends in punctuation", "4.2.0 or newer", "id 'Holo-Fusion'",
                  "version '1.0'", "'network' must be declared", "without a final full stop"):
        assert words in problems


def test_extension_in_blender_against_a_live_backend(addon_zip, tiny_models, tmp_path):
    backend = Backend(tiny_models["pipeline"].parent, tmp_path)
    try:
        env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "blender-user"), OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("blender_session.py")), str(addon_zip),
                            str(backend.conn), str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    finally:
        backend.stop()
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FACTS ")]
    assert lines, f"the Blender session failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    f = json.loads(lines[0][len("FACTS "):])
    assert f["enabled"] and f["user_dir_in_extension_folder"] and f["connect"] == ["FINISHED"]
    assert f["welcome_models"] == ["pipe"]
    o = f["object"]
    assert f["generate"] == ["FINISHED"] and o["faces"] > 100 and o["uv_layers"] == 1 and o["smooth"]
    assert o["has_custom_normals"] and o["image_packed"] and o["linked_to_bsdf"]
    assert o["props"]["model"] == "pipe" and o["props"]["seed"] == 3 and o["props"]["preset"] == "draft"
    assert len(o["props"]["job_id"]) == 32 and o["props"]["backend_version"]
    assert o["collection"] == "HoloFusion" and o["location"] == [0.5, 0.0, 0.0]  # at the 3D cursor
    assert f["seed_written_back"] == 3 and f["second_generate_seed"] == 4 and f["seeds_after_two"] == [3, 4]
    assert f["rerolled"] == {"seed": 4, "location": [1.0, 2.0, 3.0], "rotation_z": 0.7, "count": 2}
    assert f["populated"] == {"count": 6, "seeds": [40, 42, 44, 46, 48, 50], "distinct_positions": 6}
    g = f["grid"]  # rows of 3, 0.08 m objects 0.3 m apart edge to edge: a pitch of 0.38 m, centred on the cursor
    assert g["welcome_sizes"] == [{"apple": 0.08}] and g["largest_side"] <= 0.08 + 1e-4
    assert g["xs"] == [-0.38, 0.0, 0.38] and g["ys"] == [-0.19, 0.19]
    assert f["history"] >= 9
    assert f["thumbnail"] == {"file": True, "preview_size": [128, 128], "all": True}
    assert f["history_import"] == ["FINISHED"] and f["history_imported"]
    assert f["surface"] == ["FINISHED"]
    assert f["surface_objects"] == {"count": 4, "on_plane": True, "distinct_positions": 4}
    assert f["selected"] == ["FINISHED"] and f["selected_positions"] == [[-5.0, -1.0, 0.5], [-5.0, 1.0, 0.0]]
    # a category the selected model does not know goes out without a model; no model knows "teapot": said in words
    assert f["spec_models"] == ["pipe", None]
    assert f["mixed"] == ["FINISHED"] and f["mixed_objects"]["made"] == [[80, "apple"]]
    assert "populated 1 of 2" in f["mixed_objects"]["status"]
    assert "seed 82" in f["mixed_objects"]["status"] and "'teapot'" in f["mixed_objects"]["status"]
    assert "known: apple" in f["mixed_objects"]["status"]
    assert f["main_thread"]["longest_step_ms"] < 20.0 and f["main_thread"]["steps"] > 10
    assert f["cancel"] == {"ended": ["cancelled"], "new_objects": 0}
    k = f["killed"]
    assert k["ended"] == ["failed"] and "Backend lost" in k["error"] and k["state"] == "lost"
    assert k["panel_message"] == k["error"] and k["new_objects"] == 0 and k["seconds_to_notice"] < 5
    assert f["thread_alive_before_disable"] and f["threads_after_disable"] == [] and f["disabled"]
    assert (tmp_path / "scene.blend").is_file()
