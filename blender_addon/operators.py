"""Operators (public): ``bpy.ops.holofusion.connect``, ``generate``, ``cancel``, ``reroll``, ``populate``,
``history_import``. In the UI they submit and return at once (a timer applies the results); in ``blender -b`` they
run to the end before returning, so scripts and command-line batches work the same way."""

from __future__ import annotations

import math
import random
import shlex
import uuid
from pathlib import Path

import bpy
from mathutils import Vector

from .importer import collection, import_result
from .layout import pack_rows
from .props import preferences
from .session import session

__all__ = ["CLASSES"]


def _sync() -> bool:
    return bpy.app.background  # timers never fire there


def _report_end(op_report):
    def on_end(state: str, error: str | None) -> None:
        if state == "failed" and error:
            session.status.message = error
            try:
                op_report({"ERROR"}, error)
            except ReferenceError:  # the operator is gone (UI path): the panel shows the message
                print(f"HoloFusion: {error}")
    return on_end


def _chosen_category(settings) -> str | None:
    return None if settings.category in ("ANY", "") else settings.category


def _spec(settings, seed: int, category: str | None = None) -> dict:
    cat = category if category is not None else _chosen_category(settings)
    model = settings.model or None
    known = {m["name"]: m.get("categories", []) for m in (session.welcome or {}).get("models", [])}
    if cat is not None and model in known and cat not in known[model]:
        # Populate's Categories may name categories of other models (the shipped ones hold one each): the backend
        # sends a request without a model to the model that knows its category.
        model = None
    return {"seed": int(seed), "model": model, "category": cat, "preset": settings.preset,
            "options": _options(settings), "request_id": uuid.uuid4().hex}


def _options(settings) -> dict:
    options = {"texture_size": settings.texture_size, "faces": settings.faces}
    if settings.opacity_length > 0:  # 0 leaves the level to the model (its calibrated surface)
        options["opacity_length"] = settings.opacity_length
    return options


def _next_seed(settings) -> int:
    if settings.seed_mode == "RANDOM":
        settings.seed = random.randrange(0, 2**31 - 1)
    elif settings.seed_mode == "INCREMENT" and settings.last_seed == settings.seed:
        settings.seed = min(settings.seed + 1, 2**31 - 1)
    settings.last_seed = settings.seed
    return settings.seed


def _undo_push(message: str) -> None:
    try:
        bpy.ops.ed.undo_push(message=message)
    except RuntimeError:
        pass  # no undo stack (background mode, or a timer without a window)


def _connection(prefs) -> str | dict:
    if prefs.address:
        if not prefs.address.startswith("tcp://") or not prefs.key:
            raise ValueError("an address must look like tcp://HOST:PORT and needs the backend's key")
        host, _, port = prefs.address[len("tcp://"):].rpartition(":")
        if not port.isdigit():
            raise ValueError(f"{prefs.address!r}: the port must be a number")
        if host not in ("127.0.0.1", "localhost", "::1") and not bpy.app.online_access:
            raise ValueError(f"{host} is another machine and Blender's online access is off (Preferences > System > "
                             "Network > Allow Online Access)")
        return {"ip": host, "port": int(port), "key": prefs.key}
    if not prefs.connection_file and not prefs.start_local:
        raise ValueError("set the backend's connection file (or an address and key) in the extension's preferences")
    return bpy.path.abspath(prefs.connection_file) if prefs.connection_file else ""


class HOLOFUSION_OT_connect(bpy.types.Operator):
    bl_idname = "holofusion.connect"
    bl_label = "Connect"
    bl_description = "Connect to the HoloFusion backend set in the preferences (starting a local one if asked)"

    def execute(self, context):
        prefs = preferences(context)
        try:
            target = _connection(prefs)
        except ValueError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        if prefs.start_local:
            if not prefs.python:
                self.report({"ERROR"}, "set the Python that has holofusion installed, or turn off the local backend")
                return {"CANCELLED"}
            conn_file = session.user_dir() / "local-backend.json"
            args = shlex.split(prefs.backend_args)
            if prefs.store_dir:
                args += ["--store", bpy.path.abspath(prefs.store_dir)]
            session.start_local_backend(bpy.path.abspath(prefs.python), args, conn_file)
            if not _wait_file(conn_file, 120):
                self.report({"ERROR"}, f"the local backend did not start; see {session.user_dir() / 'backend.log'}")
                return {"CANCELLED"}
            target = str(conn_file)
        session.connect(target, prefs.timeout_s)
        if _sync() or prefs.start_local:
            if not session.wait_connected(5 * prefs.timeout_s + 5):
                self.report({"ERROR"}, session.status.message or "the backend did not answer")
                return {"CANCELLED"}
        return {"FINISHED"}


def _wait_file(path: Path, timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline or (session.local_backend and session.local_backend.poll() is not None):
            return False
        time.sleep(0.1)
    return True


class _NeedsBackend:
    @classmethod
    def poll(cls, context):
        if session.state in ("connected", "connecting"):
            return True
        prefs = preferences(context)
        if prefs.auto_connect and (prefs.connection_file or prefs.address or prefs.start_local):
            return True
        cls.poll_message_set("Not connected to a HoloFusion backend")
        return False

    def ensure_connected(self, context) -> bool:
        """Connects first when not connected ("Connect on Generate"); False (reported) if that failed."""
        if session.state in ("connected", "connecting"):
            return True
        bpy.ops.holofusion.connect()
        if session.state not in ("connected", "connecting"):
            self.report({"ERROR"}, session.status.message or "not connected to a HoloFusion backend")
            return False
        return True


class HOLOFUSION_OT_generate(_NeedsBackend, bpy.types.Operator):
    bl_idname = "holofusion.generate"
    bl_label = "Generate"
    bl_description = "Generate one object with the current model, category, seed and preset, at the 3D cursor"
    bl_options = {"REGISTER"}

    def execute(self, context):
        if not self.ensure_connected(context):
            return {"CANCELLED"}
        settings = context.scene.holofusion
        seed = _next_seed(settings)
        location = context.scene.cursor.location.copy()
        made = []

        def on_result(msg):
            obj = import_result(msg, context, location=location)
            session.remember(msg.content["metadata"])
            made.append(obj)
            _undo_push("HoloFusion: import")

        task = session.submit(_spec(settings, seed), on_result, _report_end(self.report))
        if _sync():
            session.wait(task)
            if not made:
                return {"CANCELLED"}
        return {"FINISHED"}


class HOLOFUSION_OT_cancel(bpy.types.Operator):
    bl_idname = "holofusion.cancel"
    bl_label = "Cancel"
    bl_description = "Stop the running job (a populate run stops after the current object)"

    @classmethod
    def poll(cls, context):
        return session.busy() or session.populate is not None

    def execute(self, context):
        session.cancel()
        return {"FINISHED"}


def _generated(obj) -> bool:
    return obj is not None and "holofusion_seed" in obj.keys()


class HOLOFUSION_OT_reroll(_NeedsBackend, bpy.types.Operator):
    bl_idname = "holofusion.reroll"
    bl_label = "Re-roll Selected"
    bl_description = "Replace each selected generated object by the next seed's, same settings, transform and collection"

    @classmethod
    def poll(cls, context):
        if not super().poll(context):
            return False
        if not any(_generated(o) for o in context.selected_objects):
            cls.poll_message_set("Select an object made by HoloFusion")
            return False
        return True

    def execute(self, context):
        if not self.ensure_connected(context):
            return {"CANCELLED"}
        settings = context.scene.holofusion
        tasks = []
        for old in [o for o in context.selected_objects if _generated(o)]:
            seed = int(old["holofusion_seed"]) + 1
            name, matrix, colls = old.name, old.matrix_world.copy(), list(old.users_collection)
            spec = {"seed": seed, "model": old.get("holofusion_model") or None,
                    "category": old.get("holofusion_category") or None,
                    "preset": old.get("holofusion_preset") or settings.preset, "options": _options(settings),
                    "request_id": uuid.uuid4().hex}

            def on_result(msg, name=name, matrix=matrix, colls=colls):
                target = bpy.data.objects.get(name)
                obj = import_result(msg, context, target=colls[0] if colls else None)
                for c in colls[1:]:
                    c.objects.link(obj)
                obj.matrix_world = matrix
                if target is not None:
                    bpy.data.objects.remove(target, do_unlink=True)
                obj.name = name
                obj.select_set(True)
                session.remember(msg.content["metadata"])
                _undo_push("HoloFusion: re-roll")

            tasks.append(session.submit(spec, on_result, _report_end(self.report)))
            settings.seed = seed
            settings.last_seed = seed
        if _sync():
            for t in tasks:
                session.wait(t)
        return {"FINISHED"}


def item_sizes(settings, categories: list[str | None]) -> list[float]:
    """The largest side (metres) each populated object will have, before any is made: the backend scales an object
    of a category to a known size and says which in its welcome (``sizes`` of each model); 0 where it does not say
    (an older backend), which makes the grid an even one with Spacing as its pitch."""
    models = (session.welcome or {}).get("models", [])
    own = next((m for m in models if m["name"] == settings.model), None)
    out = []
    for cat in categories:
        if cat is None and own is not None and len(own.get("categories", [])) == 1:
            cat = own["categories"][0]
        # the selected model's word first, then any model that serves the category
        size = next((v for m in ([own] if own else []) + models if (v := m.get("sizes", {}).get(cat))), 0.0)
        out.append(float(size) * max(settings.scale_range))
    return out


def layout_positions(context, settings, n: int, sizes: list[float] | None = None) -> list[Vector]:
    """Where each populated object goes (the layout's rule), before any is made. ``sizes``: each object's largest
    side, for the grid (which keeps Spacing between neighbours' edges)."""
    if settings.layout == "SELECTED":
        objs = list(context.selected_objects)
        if not objs:
            raise ValueError("layout 'one per selected object' needs selected objects")
        return [objs[i % len(objs)].matrix_world.translation.copy() for i in range(n)]
    if settings.layout == "SURFACE":
        obj = context.active_object
        if obj is None or obj.type != "MESH" or not obj.data.polygons:
            raise ValueError("layout 'on active mesh' needs an active mesh object with faces")
        # Uniform over the surface: a triangle by area (in world space, so a scaled object is fair), then a
        # uniform point in it; the same first seed scatters the same way.
        rng = random.Random(settings.first_seed)
        mesh, mw = obj.data, obj.matrix_world
        mesh.calc_loop_triangles()
        tris = [[mw @ mesh.vertices[v].co for v in t.vertices] for t in mesh.loop_triangles]
        areas = [(b - a).cross(c - a).length / 2 for a, b, c in tris]
        if not sum(areas) > 0:
            raise ValueError(f"layout 'on active mesh': {obj.name!r} has no surface area")
        out = []
        for i in rng.choices(range(len(tris)), weights=areas, k=n):
            u, v = rng.random(), rng.random()
            if u + v > 1:
                u, v = 1 - u, 1 - v
            a, b, c = tris[i]
            out.append(a + (b - a) * u + (c - a) * v)
        return out
    origin = context.scene.cursor.location
    spots = pack_rows(list(sizes) if sizes is not None else [0.0] * n, gap=settings.spacing)
    return [origin + Vector((x, y, 0.0)) for x, y in spots]


class HOLOFUSION_OT_populate(_NeedsBackend, bpy.types.Operator):
    bl_idname = "holofusion.populate"
    bl_label = "Populate"
    bl_description = "Generate Count objects with seeds first + i x step and place them by the layout"

    def execute(self, context):
        if not self.ensure_connected(context):
            return {"CANCELLED"}
        s = context.scene.holofusion
        cats = [c.strip() for c in s.categories.split(",") if c.strip()]
        item_cats = [cats[i % len(cats)] if cats else _chosen_category(s) for i in range(s.count)]
        try:
            positions = layout_positions(context, s, s.count, item_sizes(s, item_cats))
        except ValueError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        rng = random.Random(s.first_seed)
        items = [{"seed": s.first_seed + i * s.seed_step, "category": cats[i % len(cats)] if cats else None,
                  "location": positions[i], "rotation": rng.uniform(0, 2 * math.pi) if s.random_rotation else 0.0,
                  "scale": rng.uniform(min(s.scale_range), max(s.scale_range))} for i in range(s.count)]
        from .session import Populate

        run = Populate(items, s.target_collection or collection(context.scene))
        session.populate = run
        report = self.report

        def next_item():
            if run.index >= len(items) or run.stop_after_current:
                session.populate = None
                done = f"populated {len(run.made)} of {len(items)}"
                session.status.line = done + (f"; failed: {'; '.join(run.failed)}" if run.failed else "")
                return None
            item = items[run.index]
            session.status.line = f"object {run.index + 1} of {len(items)} (seed {item['seed']})"

            def on_result(msg):
                obj = import_result(msg, context, location=item["location"], target=run.target)
                obj.rotation_euler.z = item["rotation"]
                obj.scale = (item["scale"],) * 3
                run.made.append(obj)
                session.remember(msg.content["metadata"])
                _undo_push("HoloFusion: populate item")

            def on_end(state, error):
                if state == "failed":
                    run.failed.append(f"seed {item['seed']}: {error}")  # reported and skipped, not fatal
                    try:
                        report({"WARNING"}, f"seed {item['seed']} failed: {error}")
                    except ReferenceError:
                        pass
                elif state == "cancelled":
                    run.stop_after_current = True
                run.index += 1
                if session.state == "connected":
                    nxt = next_item()
                    if nxt is not None and _sync():
                        pending.append(nxt)
                else:
                    session.populate = None

            spec = _spec(s, item["seed"], item["category"])
            return session.submit(spec, on_result, on_end)

        pending = [next_item()]
        if _sync():
            while pending:
                task = pending.pop(0)
                if task is not None:
                    session.wait(task)
        return {"FINISHED"}


class HOLOFUSION_OT_history_import(_NeedsBackend, bpy.types.Operator):
    bl_idname = "holofusion.history_import"
    bl_label = "Import from History"
    bl_description = "Import this earlier result again, from the backend's store"

    job_id: bpy.props.StringProperty()
    seed: bpy.props.IntProperty()

    def execute(self, context):
        if not self.ensure_connected(context):
            return {"CANCELLED"}
        location = context.scene.cursor.location.copy()
        seed = self.seed

        def on_result(msg):
            if msg.content.get("seed") == seed:
                import_result(msg, context, location=location)
                _undo_push("HoloFusion: import")

        task = session.submit(None, on_result, _report_end(self.report), fetch=self.job_id)
        if _sync():
            session.wait(task)
        return {"FINISHED"}


CLASSES = (HOLOFUSION_OT_connect, HOLOFUSION_OT_generate, HOLOFUSION_OT_cancel, HOLOFUSION_OT_reroll,
           HOLOFUSION_OT_populate, HOLOFUSION_OT_history_import)
