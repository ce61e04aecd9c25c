"""Settings: the extension's preferences (how to reach the backend) and the per-scene generation settings
(``bpy.context.scene.holofusion``, public)."""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, EnumProperty, FloatProperty, FloatVectorProperty, IntProperty, PointerProperty,
                       StringProperty)

from .session import session

__all__ = ["HoloFusionPreferences", "HoloFusionSettings", "CLASSES", "preferences"]


def preferences(context: bpy.types.Context) -> HoloFusionPreferences:
    return context.preferences.addons[__package__].preferences


class HoloFusionPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    connection_file: StringProperty(
        name="Connection File", subtype="FILE_PATH",
        description="The backend's connection file (printed by `holofusion serve`; holds its address and key)")
    address: StringProperty(
        name="Address", default="",
        description="Instead of a connection file: tcp://HOST:PORT of the backend (the key below is then needed)")
    key: StringProperty(name="Key", subtype="PASSWORD", description="The backend's key, when connecting by address")
    start_local: BoolProperty(
        name="Start a Local Backend", default=False,
        description="Start `holofusion serve` with the Python below when connecting, and stop it when Blender exits")
    python: StringProperty(name="Python", subtype="FILE_PATH",
                           description="The Python that has holofusion installed (e.g. .venv/bin/python)")
    backend_args: StringProperty(name="Arguments", default="--device auto",
                                 description="Extra arguments for `holofusion serve`")
    store_dir: StringProperty(
        name="Store Folder", subtype="DIR_PATH", default="",
        description="Where the local backend keeps every result (GLB, preview, metadata), so any can be re-imported "
                    "later; empty: the backend's default folder in your user config")
    auto_connect: BoolProperty(
        name="Connect on Generate", default=True,
        description="Generate, Re-roll and Populate connect first (starting the local backend if set) when not "
                    "connected")
    timeout_s: FloatProperty(name="Timeout", default=1.0, min=0.2, max=30.0, unit="TIME_ABSOLUTE",
                             description="Seconds of backend silence before a retry; it is reported lost after two")

    def draw(self, context):
        col = self.layout.column()
        col.prop(self, "connection_file")
        row = col.row()
        row.prop(self, "address")
        row.prop(self, "key")
        col.prop(self, "timeout_s")
        col.prop(self, "auto_connect")
        box = col.box()
        box.prop(self, "start_local")
        sub = box.column()
        sub.active = self.start_local
        sub.prop(self, "python")
        sub.prop(self, "backend_args")
        sub.prop(self, "store_dir")
        col.label(text=f"History and previews: {session.user_dir()}")


def _models(self, context):
    models = (session.welcome or {}).get("models", [])
    return [(m["name"], m["name"], f"categories: {', '.join(m['categories'])}") for m in models] or \
        [("", "(connect first)", "Connect to a backend to list its models")]


def _categories(self, context):
    models = {m["name"]: m for m in (session.welcome or {}).get("models", [])}
    cats = models.get(self.model, {}).get("categories", [])
    return [("ANY", "Any", "Let the model choose")] + [(c, c.capitalize(), f"a {c}") for c in cats]


PRESETS = [("draft", "Draft", "Coarse HoloDiffusion grid only: seconds"),
           ("standard", "Standard", "Super-resolved and distilled: finer detail"),
           ("high", "High", "More views and iterations, and 4x super-resolution where the model has it: slowest, "
                            "sharpest")]


class HoloFusionSettings(bpy.types.PropertyGroup):
    model: EnumProperty(name="Model", items=_models, description="Model on the backend")
    category: EnumProperty(name="Category", items=_categories, description="What to generate")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1,
                      description="Seed of the next object; the seed actually used is written back here")
    last_seed: IntProperty(default=-1, options={"HIDDEN"})
    seed_mode: EnumProperty(name="Seed Mode", default="FIXED", items=[
        ("FIXED", "Fixed", "Use the seed as it is"),
        ("INCREMENT", "Increment", "Each Generate uses the next seed"),
        ("RANDOM", "Random", "Each Generate draws a random seed")])
    preset: EnumProperty(name="Preset", items=PRESETS, default="draft")
    texture_size: IntProperty(name="Texture", default=1024, min=64, max=4096, subtype="PIXEL",
                              description="Size of the baked base-colour texture")
    faces: IntProperty(name="Faces", default=20000, min=100, max=500000,
                       description="Triangles of the mesh after decimation")
    opacity_length: FloatProperty(name="Surface Depth", default=0.0, min=0.0, max=100.0,
                                  description="Where the surface sits in the density field: larger keeps fainter "
                                              "parts (the backend's opacity length). 0: the model's own level, "
                                              "measured on its training objects")
    # batch populate
    count: IntProperty(name="Count", default=6, min=1, max=1000, description="Objects to place")
    first_seed: IntProperty(name="First Seed", default=0, min=0, max=2**31 - 1)
    seed_step: IntProperty(name="Seed Step", default=1, min=1, description="Seed i is first seed + i * step")
    categories: StringProperty(name="Categories", default="",
                               description="Comma-separated categories to cycle through (empty: the one above); a "
                                           "category of another model on the backend is generated by that model")
    layout: EnumProperty(name="Layout", default="GRID", items=[
        ("GRID", "Grid at Cursor", "A square grid centred on the 3D cursor"),
        ("SURFACE", "On Active Mesh", "Scattered on the active mesh's surface"),
        ("SELECTED", "Per Selected Object", "One at each selected object")])
    spacing: FloatProperty(name="Spacing", default=0.1, min=0.0, unit="LENGTH",
                           description="Grid: at least this gap between neighbouring objects (each is given the room "
                                       "of its largest side, the size the backend gives its category, so mixed "
                                       "categories never overlap)")
    random_rotation: BoolProperty(name="Random Rotation", default=True, description="Random turn about Z")
    scale_range: FloatVectorProperty(name="Scale", size=2, default=(1.0, 1.0), min=0.01,
                                     description="Random scale between these")
    target_collection: PointerProperty(name="Collection", type=bpy.types.Collection,
                                       description="Where populated objects go (default: HoloFusion)")


CLASSES = (HoloFusionPreferences, HoloFusionSettings)
