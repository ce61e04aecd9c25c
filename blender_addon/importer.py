"""A ``result`` message into the scene: mesh with UVs and normals, smooth shading, a Principled BSDF material with the
baked base-colour image packed into the .blend, in the "HoloFusion" collection, tagged with how it was made.

The wire speaks glTF's conventions (metres, +Y up, v down the texture); Blender is +Z up with v up, so positions and
normals are turned (x, y, z) -> (x, -z, y) and v -> 1 - v here, once.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import bpy
import numpy as np

from .wire.client import result_mesh

__all__ = ["import_result", "COLLECTION", "PROPS"]

COLLECTION = "HoloFusion"
PROPS = ("model", "category", "seed", "preset", "job_id", "backend_version")
"""Custom properties on every imported object, as ``holofusion_<name>``."""


def _array(seq, shape, dtype) -> np.ndarray:
    return np.frombuffer(seq, dtype).reshape(shape) if isinstance(seq, memoryview) else \
        np.asarray(seq, dtype).reshape(shape)


def _z_up(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.stack([a[:, 0], -a[:, 2], a[:, 1]], 1), np.float32)


def collection(scene: bpy.types.Scene, name: str = COLLECTION) -> bpy.types.Collection:
    coll = bpy.data.collections.get(name)
    if coll is None:
        coll = bpy.data.collections.new(name)
    if coll.name not in scene.collection.children and coll != scene.collection:
        scene.collection.children.link(coll)
    return coll


def _image(name: str, png: bytes) -> bpy.types.Image:
    # Blender loads images from files only: a temporary file, then packed so the .blend carries the texture.
    fd, path = tempfile.mkstemp(suffix=".png", prefix="holofusion_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        img = bpy.data.images.load(path)
        img.name = name
        img.pack()
        img.filepath = ""  # nothing points at the deleted temporary file
    finally:
        os.unlink(path)
    return img


def _material(name: str, image: bpy.types.Image) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.8
    tex = nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.location = (bsdf.location.x - 320, bsdf.location.y)
    links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def import_result(msg, context: bpy.types.Context, location=None, target: bpy.types.Collection | None = None,
                  name: str | None = None) -> bpy.types.Object:
    """Builds the object of a ``result`` message and links it into ``target`` (default: the HoloFusion collection)
    at ``location`` (default: the 3D cursor)."""
    data = result_mesh(msg)
    meta: dict[str, Any] = data["metadata"]
    pos = _z_up(_array(*data["positions"], np.float32))
    nrm = _z_up(_array(*data["normals"], np.float32))
    uvs = _array(*data["uvs"], np.float32)
    faces = _array(*data["faces"], np.uint32).astype(np.int32)
    label = name or f"{meta.get('category') or meta.get('model') or 'object'}_{meta.get('seed', 0)}"

    mesh = bpy.data.meshes.new(label)
    mesh.vertices.add(len(pos))
    mesh.vertices.foreach_set("co", pos.ravel())
    mesh.loops.add(faces.size)
    mesh.loops.foreach_set("vertex_index", faces.ravel())
    mesh.polygons.add(len(faces))
    mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    uv_layer = mesh.uv_layers.new(name="UVMap")
    loop_uv = uvs[faces.ravel()]
    uv_layer.data.foreach_set("uv", np.stack([loop_uv[:, 0], 1.0 - loop_uv[:, 1]], 1).astype(np.float32).ravel())
    mesh.update(calc_edges=True)
    mesh.validate(clean_customdata=False)
    mesh.polygons.foreach_set("use_smooth", np.ones(len(mesh.polygons), dtype=bool))
    if len(mesh.vertices) == len(nrm):
        mesh.normals_split_custom_set_from_vertices(nrm)
    image = _image(f"{label}_basecolor", data["texture"])
    mesh.materials.append(_material(label, image))

    obj = bpy.data.objects.new(label, mesh)
    for key in PROPS:
        value = meta.get(key)
        obj[f"holofusion_{key}"] = "" if value is None else value
    (target or collection(context.scene)).objects.link(obj)
    obj.location = context.scene.cursor.location if location is None else location
    return obj
