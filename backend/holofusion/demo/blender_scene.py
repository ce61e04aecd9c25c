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
cats = args.get("categories") or []
if cats:
    # Say which categories the backend knows before a single object is made, not one failure per item after.
    known = sorted({c for m in welcome["models"] for c in m.get("categories", [])})
    unknown = [c for c in cats if c not in known]
    if unknown:
        raise SystemExit(f"--categories: {', '.join(unknown)} not served by the backend; it knows: {', '.join(known)}")
    s.categories = ",".join(cats)

t0 = time.perf_counter()
what = f"categories {s.categories}" if cats else f"model {model!r}"
say(f"populating {s.count} objects ({what}), preset {s.preset!r} on {welcome['device']} ...")
bpy.ops.holofusion.populate()
objs = sorted((o for o in bpy.data.objects if "holofusion_seed" in o.keys()), key=lambda o: int(o["holofusion_seed"]))
if not objs:
    raise SystemExit(f"no object was made: {session.status.message or session.status.line}")
say(f"{session.status.line} in {time.perf_counter() - t0:.1f} s")

# The extension's own grid rule, rows packed by each object's footprint (real sizes differ tenfold between
# categories), here tallest first and mirrored so that row 0 stands at the back and the camera sees every object.
pack_rows = sys.modules[module + ".layout"].pack_rows
order = sorted(objs, key=lambda o: (-o.dimensions.z, int(o["holofusion_seed"])))
foot = [max(o.dimensions.x, o.dimensions.y) for o in order]
for o, (x, y) in zip(order, [(x, -y) for x, y in pack_rows(foot, relative_gap=0.35)]):
    corners = [o.matrix_world @ Vector(c) for c in o.bound_box]
    centre = sum(corners, Vector()) / 8
    o.location += Vector((x - centre.x, y - centre.y, -min(c.z for c in corners)))
bpy.context.view_layer.update()
corners = [o.matrix_world @ Vector(c) for o in objs for c in o.bound_box]
extent = max(max(c.x for c in corners) - min(c.x for c in corners),
             max(c.y for c in corners) - min(c.y for c in corners), max(c.z for c in corners))
bpy.ops.mesh.primitive_plane_add(size=extent * 30, location=(0, 0, 0))  # past the horizon of the view
ground = bpy.context.active_object
ground.name = "Ground"
mat = bpy.data.materials.new("Ground")
mat.use_nodes = True
mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.8, 0.78, 0.74, 1)
ground.data.materials.append(mat)
scene = bpy.context.scene
scene.render.resolution_x = args["resolution"]
scene.render.resolution_y = int(args["resolution"] * 9 / 16)
cam_data = bpy.data.cameras.new("Camera")
cam_data.lens = 50
cam = bpy.data.objects.new("Camera", cam_data)
scene.collection.objects.link(cam)
scene.camera = cam
# Looking along +y and 30 degrees down; Blender moves the camera until every object's box is in the frame (for
# this aspect ratio), then it steps back 8 % of the distance so nothing touches the border.
cam.rotation_euler = (math.radians(60), 0.0, 0.0)
bpy.context.view_layer.update()
fit, _ = cam.camera_fit_coords(bpy.context.evaluated_depsgraph_get(), [v for c in corners for v in c])
centre = sum(corners, Vector()) / len(corners)
cam.location = fit + (fit - centre) * 0.08
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

scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = args["samples"]
scene.cycles.use_denoising = False
scene.render.filepath = str(out / "preview.png")
say(f"rendering {scene.render.resolution_x}x{scene.render.resolution_y} with Cycles ({scene.cycles.samples} samples) ...")
bpy.ops.render.render(write_still=True)
facts = {"scene": str(blend), "glb": str(glb), "preview": str(out / "preview.png"), "objects": len(objs),
         "seeds": [int(o["holofusion_seed"]) for o in objs], "status": session.status.line}
bpy.ops.preferences.addon_disable(module=module)
print("DEMO " + json.dumps(facts), flush=True)
