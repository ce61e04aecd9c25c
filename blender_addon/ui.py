"""View3D > Sidebar > HoloFusion: connection, model and seed, Generate / Cancel with progress and a live preview,
re-roll, batch populate, history."""

from __future__ import annotations

import bpy

from .session import PREVIEW_IMAGE, session

__all__ = ["CLASSES"]


class _Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "HoloFusion"


class HOLOFUSION_PT_main(_Panel, bpy.types.Panel):
    bl_idname = "HOLOFUSION_PT_main"
    bl_label = "HoloFusion"

    def draw(self, context):
        layout, s = self.layout, context.scene.holofusion
        w = session.welcome or {}
        row = layout.row()
        if session.state == "connected":
            row.label(text=f"{w.get('server', '?')} {w.get('version', '')} on {w.get('device', '?')}",
                      icon="LINKED")
        else:
            row.label(text={"connecting": "Connecting...", "lost": "Backend lost"}.get(session.state,
                                                                                        "Not connected"),
                      icon="UNLINKED")
        row.operator("holofusion.connect", text="", icon="FILE_REFRESH")
        if session.status.message:
            layout.label(text=session.status.message, icon="ERROR")
        col = layout.column()
        # Usable when connected, or when Generate may connect first (the "Connect on Generate" preference).
        col.enabled = session.state == "connected" or bpy.ops.holofusion.generate.poll()
        col.prop(s, "model")
        col.prop(s, "category")
        row = col.row(align=True)
        row.prop(s, "seed")
        for icon, delta in (("TRIA_LEFT", -1), ("TRIA_RIGHT", 1)):
            op = row.operator("holofusion.set_seed", text="", icon=icon)
            op.delta = delta
        row.operator("holofusion.set_seed", text="", icon="FILE_REFRESH").delta = 0
        col.prop(s, "seed_mode", expand=True)
        col.prop(s, "preset")
        row = col.row(align=True)
        row.prop(s, "texture_size")
        row.prop(s, "faces")
        col.prop(s, "opacity_length")
        if session.busy():
            st = session.status
            factor = st.step / st.total if st.total else 0.0
            col.progress(factor=factor, type="BAR",
                         text=f"{st.stage or 'queued'} {st.step}/{st.total}, {st.eta_s:.0f} s left")
            col.operator("holofusion.cancel", icon="CANCEL")
            img = bpy.data.images.get(PREVIEW_IMAGE)
            if img is not None and img.preview is not None:
                col.template_icon(icon_value=img.preview.icon_id, scale=6.0)
        else:
            col.operator("holofusion.generate", icon="PLAY")
        col.operator("holofusion.reroll", icon="FILE_REFRESH")


class HOLOFUSION_PT_populate(_Panel, bpy.types.Panel):
    bl_idname = "HOLOFUSION_PT_populate"
    bl_label = "Populate"
    bl_parent_id = "HOLOFUSION_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout, s = self.layout, context.scene.holofusion
        col = layout.column()
        for name in ("count", "first_seed", "seed_step", "categories", "layout", "spacing", "random_rotation",
                     "scale_range", "target_collection"):
            col.prop(s, name)
        if session.status.line:
            col.label(text=session.status.line)
        if session.populate is not None:
            col.operator("holofusion.cancel", text="Stop After Current", icon="CANCEL")
        else:
            col.operator("holofusion.populate", icon="OUTLINER_OB_GROUP_INSTANCE")


class HOLOFUSION_PT_history(_Panel, bpy.types.Panel):
    bl_idname = "HOLOFUSION_PT_history"
    bl_label = "History"
    bl_parent_id = "HOLOFUSION_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        col = self.layout.column(align=True)
        items = session.history()
        if not items:
            col.label(text="Nothing generated yet")
        for h in items[:12]:
            text = f"{h.get('model')} / {h.get('category') or '-'} seed {h.get('seed')} ({h.get('preset')})"
            row = col.row(align=True)
            icon = _thumbnail_icon(h)
            if icon:
                row.template_icon(icon_value=icon, scale=2.0)
            op = row.operator("holofusion.history_import", text=text, icon="IMPORT")
            op.job_id, op.seed = h.get("job_id") or "", int(h.get("seed") or 0)


_thumbs = None
"""bpy.utils.previews collection of the history's thumbnails, keyed by file name; made on first draw."""


def thumbnail_preview(item):
    """The history item's thumbnail as a loaded ``ImagePreview`` (None: no thumbnail). Each file loads once."""
    global _thumbs
    path = session.thumbnail(item)
    if path is None:
        return None
    if _thumbs is None:
        import bpy.utils.previews

        _thumbs = bpy.utils.previews.new()
    if path.name not in _thumbs:
        _thumbs.load(path.name, str(path), "IMAGE")
    return _thumbs[path.name]


def _thumbnail_icon(item) -> int:
    """The icon id of a history item's thumbnail (0: none; always 0 in ``blender -b``, which draws no icons)."""
    preview = thumbnail_preview(item)
    return preview.icon_id if preview is not None else 0


def release_thumbnails() -> None:
    """Frees the thumbnails (on unregister)."""
    global _thumbs
    if _thumbs is not None:
        import bpy.utils.previews

        bpy.utils.previews.remove(_thumbs)
        _thumbs = None


class HOLOFUSION_OT_set_seed(bpy.types.Operator):
    bl_idname = "holofusion.set_seed"
    bl_label = "Seed"
    bl_description = "Previous / next seed, or a random one (0)"
    bl_options = {"INTERNAL"}

    delta: bpy.props.IntProperty()

    def execute(self, context):
        import random

        s = context.scene.holofusion
        s.seed = random.randrange(0, 2**31 - 1) if self.delta == 0 else max(0, min(2**31 - 1, s.seed + self.delta))
        return {"FINISHED"}


CLASSES = (HOLOFUSION_OT_set_seed, HOLOFUSION_PT_main, HOLOFUSION_PT_populate, HOLOFUSION_PT_history)
