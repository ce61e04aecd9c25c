"""HoloFusion for Blender: generate textured 3D objects from the sidebar (View3D > Sidebar > HoloFusion).

The extension talks to a HoloFusion backend (`holofusion serve`) over ZeroMQ through the wire client it carries
(`wire/`, the same files as holofusion.client); all Blender data changes happen on the main thread, from a timer
that drains the connection thread's events, or synchronously in `blender -b`.
"""

from __future__ import annotations

import atexit

import bpy

from . import operators, props, ui
from .session import session

_CLASSES = (*props.CLASSES, *operators.CLASSES, *ui.CLASSES)
TIMER_S = 0.05


def _timer() -> float:
    if session.pump():
        for window in bpy.context.window_manager.windows:
            for area in window.screen.areas:
                if area.type == "VIEW_3D":
                    area.tag_redraw()
    return TIMER_S


def register() -> None:
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.holofusion = bpy.props.PointerProperty(type=props.HoloFusionSettings)
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=TIMER_S, persistent=True)
    atexit.register(session.stop_local_backend)  # a backend we started ends with Blender


def unregister() -> None:
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    session.disconnect()  # stops the connection thread and closes its socket
    session.stop_local_backend()
    atexit.unregister(session.stop_local_backend)
    ui.release_thumbnails()
    del bpy.types.Scene.holofusion
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
