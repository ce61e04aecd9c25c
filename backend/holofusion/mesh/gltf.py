"""Binary glTF 2.0 (.glb) writer and reader for one textured mesh (Khronos glTF 2.0 specification).

Written from the specification with ``json`` and ``struct``: one buffer holding positions, normals, UVs (float32),
indices (uint32) and the PNG base-colour texture; one mesh primitive; one PBR metallic-roughness material (metallic
0, roughness ``roughness``) whose ``baseColorTexture`` is the baked image (sRGB, as glTF requires: the albedo is in the
photographs' display colours); a linear, mip-mapped, clamped sampler. Every bufferView is 4-byte aligned, positions
carry the min / max the specification requires, and the file's ``asset.extras`` / node ``extras`` carry free-form
metadata (how the object was made), which Blender's importer turns into custom properties.

Units and axes are the caller's: ``asset.py`` converts to glTF's metres and +Y up.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_glb", "read_glb", "glb_bytes"]

_GLB_MAGIC = 0x46546C67  # "glTF"
_JSON = 0x4E4F534A
_BIN = 0x004E4942
_FLOAT, _UINT = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963


def _pad(data: bytes, fill: bytes = b"\x00") -> bytes:
    return data + fill * ((-len(data)) % 4)


def glb_bytes(positions: np.ndarray, normals: np.ndarray, uvs: np.ndarray, faces: np.ndarray, png: bytes,
              name: str = "object", extras: dict[str, Any] | None = None, roughness: float = 0.8) -> bytes:
    """The .glb file of one mesh: positions, normals (V, 3), uvs (V, 2) (glTF convention, v down the image), faces
    (F, 3) counter-clockwise from outside, png the base-colour texture."""
    positions = np.ascontiguousarray(positions, np.float32)
    normals = np.ascontiguousarray(normals, np.float32)
    uvs = np.ascontiguousarray(uvs, np.float32)
    indices = np.ascontiguousarray(faces, np.uint32).reshape(-1)
    n = positions.shape[0]
    if positions.shape != (n, 3) or normals.shape != (n, 3) or uvs.shape != (n, 2):
        raise ValueError(f"positions (V, 3), normals (V, 3), uvs (V, 2) with one V; got {positions.shape}, "
                         f"{normals.shape}, {uvs.shape}")
    if indices.size == 0 or int(indices.max()) >= n:
        raise ValueError("faces must be non-empty and index existing vertices")
    blobs = [positions.tobytes(), normals.tobytes(), uvs.tobytes(), indices.tobytes(), png]
    views, offset, body = [], 0, b""
    targets = [_ARRAY_BUFFER, _ARRAY_BUFFER, _ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER, None]
    for blob, target in zip(blobs, targets):
        view = {"buffer": 0, "byteOffset": offset, "byteLength": len(blob)}
        if target is not None:
            view["target"] = target
        views.append(view)
        padded = _pad(blob)
        body += padded
        offset += len(padded)
    accessors = [
        {"bufferView": 0, "componentType": _FLOAT, "count": n, "type": "VEC3",
         "min": [float(x) for x in positions.min(0)], "max": [float(x) for x in positions.max(0)]},
        {"bufferView": 1, "componentType": _FLOAT, "count": n, "type": "VEC3"},
        {"bufferView": 2, "componentType": _FLOAT, "count": n, "type": "VEC2"},
        {"bufferView": 3, "componentType": _UINT, "count": int(indices.size), "type": "SCALAR"},
    ]
    doc: dict[str, Any] = {
        "asset": {"version": "2.0", "generator": "HoloFusion for Blender"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [{"name": name, "primitives": [{
            "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2}, "indices": 3, "material": 0, "mode": 4}]}],
        "materials": [{"name": f"{name}_material", "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0}, "metallicFactor": 0.0, "roughnessFactor": float(roughness)}}],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}],
        "images": [{"bufferView": 4, "mimeType": "image/png", "name": f"{name}_basecolor"}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(body)}],
    }
    if extras:
        doc["nodes"][0]["extras"] = extras
        doc["asset"]["extras"] = extras
    js = _pad(json.dumps(doc, separators=(",", ":")).encode("utf-8"), b" ")
    total = 12 + 8 + len(js) + 8 + len(body)
    return b"".join([struct.pack("<III", _GLB_MAGIC, 2, total), struct.pack("<II", len(js), _JSON), js,
                     struct.pack("<II", len(body), _BIN), body])


def write_glb(path: str | os.PathLike, data: bytes) -> Path:
    """Writes .glb bytes atomically (beside the target, then renamed): a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def read_glb(data: bytes | memoryview) -> dict[str, Any]:
    """Parses a .glb written by ``glb_bytes`` (or any single-buffer GLB): {"json", "positions", "normals", "uvs",
    "faces", "png"} (missing parts None). The arrays are read-only views into ``data`` (no copy)."""
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != _GLB_MAGIC or version != 2 or length != len(data):
        raise ValueError("not a glTF 2.0 binary file (bad header)")
    jlen, jtype = struct.unpack_from("<II", data, 12)
    doc = json.loads(bytes(data[20:20 + jlen]))
    blen, btype = struct.unpack_from("<II", data, 20 + jlen)
    body = memoryview(data)[28 + jlen:28 + jlen + blen]  # views, not copies: the arrays are read in place
    if jtype != _JSON or btype != _BIN:
        raise ValueError("not a glTF 2.0 binary file (bad chunks)")

    def view(i: int) -> memoryview:
        v = doc["bufferViews"][i]
        return body[v.get("byteOffset", 0):v.get("byteOffset", 0) + v["byteLength"]]

    def accessor(i: int, dtype, width: int) -> np.ndarray:
        a = doc["accessors"][i]
        return np.frombuffer(view(a["bufferView"]), dtype).reshape(-1, width)[:a["count"]] if width > 1 else \
            np.frombuffer(view(a["bufferView"]), dtype)[:a["count"]]

    prim = doc["meshes"][0]["primitives"][0]
    att = prim["attributes"]
    out: dict[str, Any] = {"json": doc}
    out["positions"] = accessor(att["POSITION"], np.float32, 3)
    out["normals"] = accessor(att["NORMAL"], np.float32, 3) if "NORMAL" in att else None
    out["uvs"] = accessor(att["TEXCOORD_0"], np.float32, 2) if "TEXCOORD_0" in att else None
    out["faces"] = accessor(prim["indices"], np.uint32, 1).reshape(-1, 3)
    images = doc.get("images") or []
    out["png"] = bytes(view(images[0]["bufferView"])) if images else None
    return out
