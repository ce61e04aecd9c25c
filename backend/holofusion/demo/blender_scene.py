"""Runs inside the real Blender (bpy) for `holofusion demo`: install and enable the extension from its zip, connect
to the backend, populate a grid of objects with the extension's own operator, light and frame them, save the scene,
export the first object as .glb and render a Cycles preview on the CPU."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import bpy
from mathutils import Vector

args = json.loads(sys.argv[1])
out = Path(args["out"])


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.context.preferences.filepaths.save_version = 0  # no scene.blend1 beside the scene
bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
module = "bl_ext.user_default.holofusion"
prefs = bpy.context.preferences.addons[module].preferences
prefs.connection_file = args["connection"]
prefs.timeout_s = 5.0
bpy.ops.holofusion.connect()
session = sys.modules[module + ".session"].session
welcome = session.welcome
model = args["model"] or welcome["models"][0]["name"]
s = bpy.context.scene.holofusion
s.model, s.preset = model, args["preset"]
s.count, s.first_seed, s.seed_step, s.layout = args["count"], args["seed"], 1, "GRID"

t0 = time.perf_counter()
say(f"populating {s.count} objects with model {model!r}, preset {s.preset!r} on {welcome['device']} ...")
bpy.ops.holofusion.populate()
objs = sorted((o for o in bpy.data.objects if "holofusion_seed" in o.keys()), key=lambda o: int(o["holofusion_seed"]))
if not objs:
    raise SystemExit(f"no object was made: {session.status.message or session.status.line}")
say(f"{session.status.line} in {time.perf_counter() - t0:.1f} s")

# Space the grid by the objects' own size, then frame it.
size = max(max(o.dimensions) for o in objs)
side = math.ceil(math.sqrt(len(objs)))
for i, o in enumerate(objs):
    o.location = Vector(((i % side - (side - 1) / 2) * 1.5 * size, (i // side - (side - 1) / 2) * 1.5 * size, 0.0))
    lowest = min((o.matrix_world @ Vector(c)).z for c in o.bound_box)
    o.location.z -= lowest
extent = side * 1.5 * size
bpy.ops.mesh.primitive_plane_add(size=extent * 4, location=(0, 0, 0))
ground = bpy.context.active_object
ground.name = "Ground"
mat = bpy.data.materials.new("Ground")
mat.use_nodes = True
mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.8, 0.78, 0.74, 1)
ground.data.materials.append(mat)
cam_data = bpy.data.cameras.new("Camera")
cam = bpy.data.objects.new("Camera", cam_data)
bpy.context.scene.collection.objects.link(cam)
cam.location = Vector((0.0, -1.6 * extent, 1.1 * extent))
cam.rotation_euler = (Vector((0, 0, size * 0.3)) - cam.location).to_track_quat("-Z", "Y").to_euler()
cam_data.lens = 50
bpy.context.scene.camera = cam
sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
sun.data.energy = 3.0
sun.rotation_euler = (math.radians(45), math.radians(10), math.radians(30))
bpy.context.scene.collection.objects.link(sun)
world = bpy.data.worlds.new("World")
world.use_nodes = True
world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.55, 0.6, 0.7, 1)
world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.6
bpy.context.scene.world = world

blend = out / "scene.blend"
bpy.ops.wm.save_as_mainfile(filepath=str(blend))
first = objs[0]
for o in bpy.context.view_layer.objects:
    o.select_set(o == first)
glb = out / f"{first.name}.glb"
bpy.ops.export_scene.gltf(filepath=str(glb), export_format="GLB", use_selection=True)

scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = args["samples"]
scene.cycles.use_denoising = False
scene.render.resolution_x = args["resolution"]
scene.render.resolution_y = int(args["resolution"] * 9 / 16)
scene.render.filepath = str(out / "preview.png")
say(f"rendering {scene.render.resolution_x}x{scene.render.resolution_y} with Cycles ({scene.cycles.samples} samples) ...")
bpy.ops.render.render(write_still=True)
facts = {"scene": str(blend), "glb": str(glb), "preview": str(out / "preview.png"), "objects": len(objs),
         "seeds": [int(o["holofusion_seed"]) for o in objs], "status": session.status.line}
bpy.ops.preferences.addon_disable(module=module)
print("DEMO " + json.dumps(facts), flush=True)
