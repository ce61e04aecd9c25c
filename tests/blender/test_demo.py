"""`holofusion demo`, the quick start's main job, as a user runs it: the real CLI, the shipped models, a real backend,
the extension built and installed into a headless Blender, a scene of two categories (each made by its own shipped
model) written to disk. Kept small (two draft objects, a 96 px preview with one Cycles sample) to stay fast."""

from __future__ import annotations

import os
import struct
import subprocess
import sys


def _demo(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "holofusion.cli", "demo", "--out", str(out), "--samples", "1",
                           "--resolution", "96", *extra], capture_output=True, text=True, timeout=600, env=env)


def test_demo_populates_two_categories_and_writes_the_three_files(tmp_path):
    out = tmp_path / "out"
    r = _demo(out, "--count", "2", "--categories", "apple,donut")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "categories apple,donut" in r.stdout and "populated 2 of 2" in r.stdout
    assert "(2 objects, seeds 0, 1)" in r.stdout
    blend, glb, png = out / "scene.blend", out / "apple_0.glb", out / "preview.png"
    # The saved scene, opened again by Blender: the two generated objects, one of each category, standing on the ground.
    check = ("import bpy, sys; bpy.ops.wm.open_mainfile(filepath=sys.argv[1]); "
             "print(sorted((o['holofusion_category'], round(min((o.matrix_world @ __import__('mathutils').Vector(c)).z "
             "for c in o.bound_box), 4)) for o in bpy.data.objects if 'holofusion_seed' in o.keys()))")
    r = subprocess.run([sys.executable, "-c", check, str(blend)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[('apple', 0.0), ('donut', 0.0)]"
    data = glb.read_bytes()
    assert data[:4] == b"glTF" and struct.unpack("<I", data[8:12])[0] == len(data)
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (96, 54)


def test_demo_names_an_unknown_category_and_what_is_served(tmp_path):
    r = _demo(tmp_path / "out", "--count", "2", "--categories", "apple,chair")
    assert r.returncode == 2
    assert "--categories: chair not served by the backend; it knows: apple, donut, hydrant, teddybear" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "scene.blend").exists()
