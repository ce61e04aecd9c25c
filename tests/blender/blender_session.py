"""Runs inside the real Blender (the bpy module) in its own process, with a temporary user folder: installs the built
extension zip, enables it, and drives it against a live backend. Prints one JSON line per check for the test.

    python blender_session.py ZIP CONNECTION_FILE OUT_DIR
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import bpy

zip_path, conn_file, out_dir = sys.argv[1:4]
facts: dict = {}


def objects() -> list:
    return sorted((o for o in bpy.data.objects if "holofusion_seed" in o.keys()), key=lambda o: o.name)


bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
module = "bl_ext.user_default.holofusion"
facts["enabled"] = module in bpy.context.preferences.addons
ext = sys.modules[module]
session = sys.modules[module + ".session"].session
facts["user_dir_in_extension_folder"] = str(session.user_dir()).startswith(bpy.utils.user_resource("EXTENSIONS"))

prefs = bpy.context.preferences.addons[module].preferences
prefs.connection_file = conn_file
facts["connect"] = sorted(bpy.ops.holofusion.connect())
facts["welcome_models"] = [m["name"] for m in session.welcome["models"]]
s = bpy.context.scene.holofusion
s.model, s.preset, s.seed, s.seed_mode = "pipe", "draft", 3, "INCREMENT"
s.texture_size, s.faces, s.opacity_length = 128, 2000, 20.0

# one object
bpy.context.scene.cursor.location = (0.5, 0.0, 0.0)
facts["generate"] = sorted(bpy.ops.holofusion.generate())
obj = objects()[0]
mat = obj.active_material
tex = [n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"]
facts["object"] = {
    "faces": len(obj.data.polygons), "vertices": len(obj.data.vertices), "uv_layers": len(obj.data.uv_layers),
    "smooth": all(p.use_smooth for p in obj.data.polygons), "has_custom_normals": obj.data.has_custom_normals,
    "image_packed": bool(tex and tex[0].image and tex[0].image.packed_file),
    "linked_to_bsdf": any(link.to_node.type == "BSDF_PRINCIPLED" for link in mat.node_tree.links),
    "props": {k: obj[f"holofusion_{k}"] for k in ("model", "category", "seed", "preset", "job_id",
                                                   "backend_version")},
    "collection": obj.users_collection[0].name, "location": list(obj.location)}
facts["seed_written_back"] = s.seed
facts["second_generate_seed"] = None
bpy.ops.holofusion.generate()  # INCREMENT: the next seed
facts["second_generate_seed"] = s.seed
facts["seeds_after_two"] = sorted(int(o["holofusion_seed"]) for o in objects())

# re-roll the first in place
for o in bpy.context.selected_objects:
    o.select_set(False)
obj.location = (1.0, 2.0, 3.0)
obj.rotation_euler = (0.0, 0.0, 0.7)
name = obj.name
obj.select_set(True)
bpy.context.view_layer.objects.active = obj
facts["reroll"] = sorted(bpy.ops.holofusion.reroll())
new = bpy.data.objects[name]
facts["rerolled"] = {"seed": int(new["holofusion_seed"]), "location": [round(x, 5) for x in new.location],
                     "rotation_z": round(new.rotation_euler.z, 5), "count": len(objects())}

# populate 6 on a grid
s.count, s.first_seed, s.seed_step, s.layout, s.spacing = 6, 40, 2, "GRID", 0.3
before = {o.name for o in objects()}
facts["populate"] = sorted(bpy.ops.holofusion.populate())
made = [o for o in objects() if o.name not in before]
facts["populated"] = {"count": len(made), "seeds": sorted(int(o["holofusion_seed"]) for o in made),
                      "distinct_positions": len({tuple(round(x, 4) for x in o.location) for o in made})}
# the grid's pitch: the objects' size as the backend's welcome gives it (apple: 0.08 m) plus Spacing, edge to edge
cursor = bpy.context.scene.cursor.location
facts["grid"] = {"xs": sorted({round(o.location.x - cursor.x, 4) for o in made}),
                 "ys": sorted({round(o.location.y - cursor.y, 4) for o in made}),
                 "largest_side": round(max(max(o.dimensions) for o in made), 4),
                 "welcome_sizes": [m.get("sizes") for m in session.welcome["models"]]}
facts["history"] = len(session.history())
ui = sys.modules[module + ".ui"]
ops = sys.modules[module + ".operators"]
first = session.history()[0]
thumb = session.thumbnail(first)
facts["thumbnail"] = {"file": thumb is not None and thumb.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n",
                      "preview_size": list(ui.thumbnail_preview(first).image_size),
                      "all": all(session.thumbnail(h) is not None for h in session.history())}

# re-import the newest history item from the backend's store
before = {o.name for o in objects()}
facts["history_import"] = sorted(bpy.ops.holofusion.history_import(job_id=first["job_id"], seed=first["seed"]))
again = [o for o in objects() if o.name not in before]
facts["history_imported"] = [(int(o["holofusion_seed"]), o["holofusion_job_id"]) for o in again] == \
    [(first["seed"], first["job_id"])]

# scattered on the active mesh's surface: a 4 m plane at z = 1 (one quad: the points must spread over it)
bpy.ops.mesh.primitive_plane_add(size=4.0, location=(10.0, 0.0, 1.0))
s.count, s.first_seed, s.layout = 4, 60, "SURFACE"
before = {o.name for o in objects()}
facts["surface"] = sorted(bpy.ops.holofusion.populate())
made = [o for o in objects() if o.name not in before]
facts["surface_objects"] = {
    "count": len(made), "on_plane": all(abs(o.location.z - 1.0) < 1e-5 and abs(o.location.x - 10.0) <= 2.0
                                        and abs(o.location.y) <= 2.0 for o in made),
    "distinct_positions": len({tuple(round(x, 4) for x in o.location) for o in made})}

# one per selected object: two empties
for o in bpy.context.selected_objects:
    o.select_set(False)
empties = []
for i, xyz in enumerate([(-5.0, 1.0, 0.0), (-5.0, -1.0, 0.5)]):
    e = bpy.data.objects.new(f"marker{i}", None)
    bpy.context.scene.collection.objects.link(e)
    e.location = xyz
    e.select_set(True)
    empties.append(e)
bpy.context.view_layer.update()
s.count, s.first_seed, s.layout = 2, 70, "SELECTED"
before = {o.name for o in objects()}
facts["selected"] = sorted(bpy.ops.holofusion.populate())
made = [o for o in objects() if o.name not in before]
facts["selected_positions"] = sorted([round(x, 4) for x in o.location] for o in made)
s.layout = "GRID"

# Categories naming one the selected model does not know: that item goes out without a model (the backend routes it
# by category) and, no model knowing "teapot", fails in words while the apple is made
s.count, s.first_seed, s.categories = 2, 80, "apple, teapot"  # seed step still 2: seeds 80 and 82
facts["spec_models"] = [ops._spec(s, 1, c)["model"] for c in ("apple", "teapot")]
before = {o.name for o in objects()}
facts["mixed"] = sorted(bpy.ops.holofusion.populate())
made = [o for o in objects() if o.name not in before]
facts["mixed_objects"] = {"made": [(int(o["holofusion_seed"]), o["holofusion_category"]) for o in made],
                          "status": session.status.line}
s.categories = ""

# The longest main-thread step while a standard job streams (progress of every stage, distillation previews), the
# timer's pump called as Blender would call it; then the job is cancelled mid-distillation: it ends "cancelled", no
# object appears, the backend is idle again. (One job for both: the tiny model's distillation runs all its steps.)
s.preset = "standard"
n_before = len(objects())
steps, ended = [], []
task = session.submit(ops._spec(s, 77), lambda m: None, lambda state, err: ended.append(state))
deadline = time.monotonic() + 300
while task.tag in session.tasks and time.monotonic() < deadline:
    t0 = time.perf_counter()
    if session.pump():
        steps.append(time.perf_counter() - t0)
    if session.status.stage == "distill" and session.status.step >= 30 and not getattr(task, "asked", False):
        task.asked = True
        bpy.ops.holofusion.cancel()
    time.sleep(0.01)
facts["main_thread"] = {"longest_step_ms": round(1000 * max(steps), 2), "steps": len(steps)}
facts["cancel"] = {"ended": list(ended), "new_objects": len(objects()) - n_before}

# kill the backend mid-job: the error surfaces in words, nothing half-made stays
ended.clear()
pid = json.load(open(conn_file))["pid"]
task = session.submit(ops._spec(s, 91), lambda m: None, lambda state, err: ended.append((state, err)))
n_before = len(objects())
killed = None
deadline = time.monotonic() + 300
while task.tag in session.tasks and time.monotonic() < deadline:
    session._apply_one(timeout=0.05)
    if killed is None and session.status.stage:
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
facts["killed"] = {"ended": [e[0] for e in ended], "error": ended[0][1] if ended else None,
                   "seconds_to_notice": round(time.monotonic() - killed, 2) if killed else None,
                   "state": session.state, "panel_message": session.status.message,
                   "new_objects": len(objects()) - n_before}

bpy.ops.wm.save_as_mainfile(filepath=os.path.join(out_dir, "scene.blend"))
# Disable while the connection thread is busy (knocking at a port where nothing answers): it must still end.
session.connect({"ip": "127.0.0.1", "port": 9, "key": "0" * 64}, 0.5)
time.sleep(0.2)
facts["thread_alive_before_disable"] = session.conn is not None and session.conn.is_alive()
bpy.ops.preferences.addon_disable(module=module)
time.sleep(0.3)
facts["threads_after_disable"] = [t.name for t in threading.enumerate() if t.name.startswith("holofusion")]
facts["disabled"] = module not in bpy.context.preferences.addons
print("FACTS " + json.dumps(facts))
