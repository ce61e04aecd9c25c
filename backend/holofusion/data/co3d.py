"""Read and write datasets in the CO3Dv2 on-disk format.

One format serves real CO3Dv2, the procedural categories and Blender renders, so one loader trains on all three.

Layout of a dataset root (every path stored inside a file is relative to the root and starts with the category)::

    category_to_subset_name_list.json          {category: [subset, ...]}
    <cat>/frame_annotations.jgz                 gzip of a JSON list of frame records
    <cat>/sequence_annotations.jgz              gzip of a JSON list of sequence records
    <cat>/set_lists/set_lists_<subset>.json     {"train"|"val"|"test": [[sequence_name, frame_number, image_path], ...]}
    <cat>/eval_batches/eval_batches_<subset>.json   (optional) list of batches of the same triplets
    <cat>/<seq>/images/frameNNNNNN.jpg          RGB, size image.size = [H, W]
    <cat>/<seq>/masks/frameNNNNNN.png           8-bit grey, P(foreground) * 255
    <cat>/<seq>/depths/frameNNNNNN.jpg.geometric.png   16-bit PNG holding float16 bit patterns, times scale_adjustment
    <cat>/<seq>/depth_masks/frameNNNNNN.png     1-bit validity mask
    <cat>/<seq>/pointcloud.ply                  points (x, y, z float) with optional red, green, blue uchar

Reading: :class:`Co3dDataset` indexes frames per sequence (filtered by a subset's set list or by ``meta.frame_type``),
loads, crops and resizes frames with their cameras corrected, and yields source/target batches of one sequence.
Writing: :class:`Co3dWriter` writes frames and sequences of one category and the annotation files on ``close()``.

Malformed or missing files raise :class:`holofusion.errors.DataError` naming the file and the field.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..cameras import PerspectiveCamera
from ..errors import DataError, UserError

__all__ = [
    "SPLITS",
    "FRAME_TYPE_FOR_SPLIT",
    "FrameRecord",
    "SequenceRecord",
    "Frame",
    "Views",
    "Batch",
    "Co3dDataset",
    "Co3dWriter",
    "write_frame",
    "write_category_to_subset",
    "read_category_to_subset",
    "load_frame_annotations",
    "load_sequence_annotations",
    "load_set_list",
    "load_eval_batches",
    "split_sequences",
    "set_lists_from_frame_types",
    "split_of_frame_type",
    "mask_crop_box",
    "load_depth_png",
    "encode_depth",
    "decode_depth",
    "read_ply",
    "write_ply",
]

SPLITS = ("train", "val", "test")
INTRINSICS_FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")
# What the writer stores in meta.frame_type for a frame of a sequence in each split. Val and test sequences are
# held-out objects, hence "unseen".
FRAME_TYPE_FOR_SPLIT = {"train": "train_known", "val": "dev_unseen", "test": "test_unseen"}
_SPLIT_OF_PREFIX = {"train": "train", "dev": "val", "val": "val", "test": "test"}

FRAME_ANNOTATIONS = "frame_annotations.jgz"
SEQUENCE_ANNOTATIONS = "sequence_annotations.jgz"
CATEGORY_TO_SUBSET = "category_to_subset_name_list.json"


# ====================================================================== small file helpers
def _read_jgz(root: Path, rel: str) -> Any:
    path = root / rel
    if not path.is_file():
        raise DataError(f"{rel}: file is missing (looked in {root})")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{rel}: not a readable gzip file ({e})") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{rel}: gzip content is not JSON ({e})") from None


def _read_json(root: Path, rel: str) -> Any:
    path = root / rel
    if not path.is_file():
        raise DataError(f"{rel}: file is missing (looked in {root})")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{rel}: not JSON ({e})") from None


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_jgz(path: Path, obj: Any) -> None:
    # Level 6: annotation files of tens of thousands of frames compress well at a fraction of level 9's time.
    _write_bytes(path, gzip.compress(json.dumps(obj).encode("utf-8"), compresslevel=6, mtime=0))


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, indent=1).encode("utf-8"))


def _frame_file_stem(frame_number: int) -> str:
    return f"frame{int(frame_number):06d}"


# ====================================================================== records
@dataclass(frozen=True)
class FrameRecord:
    """One parsed frame annotation. Paths are relative to the dataset root; ``image_size`` is (H, W)."""

    category: str
    sequence_name: str
    frame_number: int
    image_path: str
    image_size: tuple[int, int]
    mask_path: str | None
    mask_mass: float | None
    depth_path: str | None
    depth_scale: float
    depth_mask_path: str | None
    viewpoint: dict | None
    frame_type: str | None
    frame_timestamp: float | None = None

    @property
    def where(self) -> str:
        """Where this record came from, for error messages."""
        return (f"{self.category}/{FRAME_ANNOTATIONS}: frame {self.frame_number} of sequence "
                f"{self.sequence_name!r}")


@dataclass(frozen=True)
class SequenceRecord:
    """One parsed sequence annotation."""

    category: str
    sequence_name: str
    point_cloud_path: str | None
    point_cloud_n_points: int | None = None
    point_cloud_quality_score: float | None = None
    viewpoint_quality_score: float | None = None


def _get(d: Mapping, key: str, where: str, field_name: str, *, required: bool = True) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{where}: {field_name.rsplit('.', 1)[0]} is {type(d).__name__}; expected an object")
    if key not in d:
        if required:
            raise DataError(f"{where}: {field_name} is missing")
        return None
    return d[key]


def _as_str(v: Any, where: str, field_name: str) -> str:
    if not isinstance(v, str) or not v:
        raise DataError(f"{where}: {field_name} is {v!r}; expected a non-empty string")
    return v


def _as_int(v: Any, where: str, field_name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise DataError(f"{where}: {field_name} is {v!r}; expected an integer")
    return int(v)


def _as_float(v: Any, where: str, field_name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DataError(f"{where}: {field_name} is {v!r}; expected a finite number")
    return float(v)


def _as_array(v: Any, shapes: Sequence[tuple[int, ...]], where: str, field_name: str) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {field_name} is not an array of numbers") from None
    if a.shape not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise DataError(f"{where}: {field_name} has shape {list(a.shape)}; expected {want}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{where}: {field_name} holds non-finite values")
    return a


def _is_number(x: Any) -> bool:
    t = type(x)
    return (t is float or t is int) and math.isfinite(x)


def _vector(v: Any, n: int) -> bool:
    return type(v) is list and len(v) == n and all(map(_is_number, v))


def _parse_viewpoint(vp: Any, where: str) -> dict | None:
    if vp is None:
        return None
    if not isinstance(vp, dict):
        raise DataError(f"{where}: viewpoint is {type(vp).__name__}; expected an object or null")
    fmt = vp.get("intrinsics_format", "ndc_norm_image_bounds")  # CO3D v1 files omit it; v1's default applies
    if fmt not in INTRINSICS_FORMATS:
        raise DataError(f"{where}: viewpoint.intrinsics_format is {fmt!r}; expected 'ndc_isotropic' or "
                        "'ndc_norm_image_bounds'")
    R = _get(vp, "R", where, "viewpoint.R")
    T = _get(vp, "T", where, "viewpoint.T")
    f = _get(vp, "focal_length", where, "viewpoint.focal_length")
    p = _get(vp, "principal_point", where, "viewpoint.principal_point")
    # Pure-Python checks first: a category holds up to ~100k frames, and numpy per field costs ~50 us each.
    if not (type(R) is list and len(R) == 3 and all(_vector(r, 3) for r in R)):
        R = _as_array(R, [(3, 3)], where, "viewpoint.R").tolist()
    if not _vector(T, 3):
        T = _as_array(T, [(3,)], where, "viewpoint.T").tolist()
    if not _vector(f, 2):
        f = np.broadcast_to(_as_array(f, [(2,), (1,), ()], where, "viewpoint.focal_length").reshape(-1),
                            (2,)).tolist()
    if not _vector(p, 2):
        p = _as_array(p, [(2,)], where, "viewpoint.principal_point").tolist()
    return {"R": R, "T": T, "focal_length": f, "principal_point": p, "intrinsics_format": fmt}


def _parse_frame(d: Any, category: str, i: int) -> FrameRecord:
    ann = f"{category}/{FRAME_ANNOTATIONS}"
    if not isinstance(d, dict):
        raise DataError(f"{ann}: entry {i} is {type(d).__name__}; expected an object")
    where0 = f"{ann}: entry {i}"
    seq = _as_str(_get(d, "sequence_name", where0, "sequence_name"), where0, "sequence_name")
    num = _as_int(_get(d, "frame_number", where0, "frame_number"), where0, "frame_number")
    where = f"{ann}: frame {num} of sequence {seq!r}"

    image = _get(d, "image", where, "image")
    image_path = _as_str(_get(image, "path", where, "image.path"), where, "image.path")
    size = _get(image, "size", where, "image.size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise DataError(f"{where}: image.size is {size!r}; expected [H, W]")
    h, w = (_as_int(s, where, "image.size") for s in size)
    if h <= 0 or w <= 0:
        raise DataError(f"{where}: image.size is {size!r}; expected positive [H, W]")

    mask_path = mask_mass = None
    mask = d.get("mask")
    if mask is not None:
        mask_path = _as_str(_get(mask, "path", where, "mask.path"), where, "mask.path")
        mass = mask.get("mass")
        mask_mass = None if mass is None else _as_float(mass, where, "mask.mass")

    depth_path = depth_mask_path = None
    depth_scale = 1.0
    depth = d.get("depth")
    if depth is not None:
        depth_path = _as_str(_get(depth, "path", where, "depth.path"), where, "depth.path")
        scale = depth.get("scale_adjustment")
        depth_scale = 1.0 if scale is None else _as_float(scale, where, "depth.scale_adjustment")
        mp = depth.get("mask_path")
        depth_mask_path = None if mp is None else _as_str(mp, where, "depth.mask_path")

    viewpoint = _parse_viewpoint(d.get("viewpoint"), where)
    meta = d.get("meta")
    frame_type = meta.get("frame_type") if isinstance(meta, dict) else None
    if frame_type is not None and not isinstance(frame_type, str):
        raise DataError(f"{where}: meta.frame_type is {frame_type!r}; expected a string like 'train_known'")
    ts = d.get("frame_timestamp")
    ts = None if ts is None else _as_float(ts, where, "frame_timestamp")
    return FrameRecord(category, seq, num, image_path, (h, w), mask_path, mask_mass, depth_path, depth_scale,
                       depth_mask_path, viewpoint, frame_type, ts)


def load_frame_annotations(root: str | os.PathLike, category: str) -> list[FrameRecord]:
    """All frame records of ``<root>/<category>/frame_annotations.jgz``, validated, in file order."""
    raw = _read_jgz(Path(root), f"{category}/{FRAME_ANNOTATIONS}")
    if not isinstance(raw, list):
        raise DataError(f"{category}/{FRAME_ANNOTATIONS}: top level is {type(raw).__name__}; expected a list of "
                        "frame records")
    records = [_parse_frame(d, category, i) for i, d in enumerate(raw)]
    seen: set[tuple[str, int]] = set()
    for r in records:
        key = (r.sequence_name, r.frame_number)
        if key in seen:
            raise DataError(f"{r.where}: frame_number appears twice in this sequence")
        seen.add(key)
    return records


def load_sequence_annotations(root: str | os.PathLike, category: str) -> dict[str, SequenceRecord]:
    """Sequence records of ``<root>/<category>/sequence_annotations.jgz`` keyed by sequence name."""
    rel = f"{category}/{SEQUENCE_ANNOTATIONS}"
    raw = _read_jgz(Path(root), rel)
    if not isinstance(raw, list):
        raise DataError(f"{rel}: top level is {type(raw).__name__}; expected a list of sequence records")
    out: dict[str, SequenceRecord] = {}
    for i, d in enumerate(raw):
        where0 = f"{rel}: entry {i}"
        if not isinstance(d, dict):
            raise DataError(f"{where0} is {type(d).__name__}; expected an object")
        name = _as_str(_get(d, "sequence_name", where0, "sequence_name"), where0, "sequence_name")
        where = f"{rel}: sequence {name!r}"
        pc = d.get("point_cloud")
        pc_path = n_points = quality = None
        if pc is not None:
            pc_path = _as_str(_get(pc, "path", where, "point_cloud.path"), where, "point_cloud.path")
            if pc.get("n_points") is not None:
                n_points = _as_int(pc["n_points"], where, "point_cloud.n_points")
            if pc.get("quality_score") is not None:
                quality = _as_float(pc["quality_score"], where, "point_cloud.quality_score")
        vq = d.get("viewpoint_quality_score")
        vq = None if vq is None else _as_float(vq, where, "viewpoint_quality_score")
        cat = d.get("category", category)
        out[name] = SequenceRecord(cat if isinstance(cat, str) else category, name, pc_path, n_points, quality, vq)
    return out


def _parse_triplets(raw: Any, rel: str, what: str) -> list[tuple[str, int, str | None]]:
    if not isinstance(raw, list):
        raise DataError(f"{rel}: {what} is {type(raw).__name__}; expected a list of [sequence_name, frame_number, "
                        "image_path]")
    out = []
    for j, e in enumerate(raw):
        if not isinstance(e, (list, tuple)) or len(e) < 2:
            raise DataError(f"{rel}: {what}[{j}] is {e!r}; expected [sequence_name, frame_number, image_path]")
        seq = _as_str(e[0], f"{rel}: {what}[{j}]", "sequence_name")
        num = _as_int(e[1], f"{rel}: {what}[{j}]", "frame_number")
        out.append((seq, num, e[2] if len(e) > 2 and isinstance(e[2], str) else None))
    return out


def load_set_list(root: str | os.PathLike, category: str, subset: str) -> dict[str, list[tuple[str, int, str | None]]]:
    """``{"train"|"val"|"test": [(sequence_name, frame_number, image_path), ...]}`` of one subset."""
    root = Path(root)
    rel = f"{category}/set_lists/set_lists_{subset}.json"
    if not (root / rel).is_file():
        have = sorted(p.name[len("set_lists_"):-len(".json")]
                      for p in (root / category / "set_lists").glob("set_lists_*.json"))
        raise DataError(f"{rel}: file is missing; subset {subset!r} of category {category!r} is not in this "
                        f"dataset (available: {', '.join(have) or 'none'})")
    raw = _read_json(root, rel)
    if not isinstance(raw, dict):
        raise DataError(f"{rel}: top level is {type(raw).__name__}; expected an object with train, val and test")
    return {k: _parse_triplets(v, rel, k) for k, v in raw.items() if k in SPLITS}


def load_eval_batches(root: str | os.PathLike, category: str, subset: str) -> list[list[tuple[str, int, str | None]]]:
    """Evaluation batches of a subset; the first frame of each batch is the target."""
    rel = f"{category}/eval_batches/eval_batches_{subset}.json"
    raw = _read_json(Path(root), rel)
    if not isinstance(raw, list):
        raise DataError(f"{rel}: top level is {type(raw).__name__}; expected a list of batches")
    return [_parse_triplets(b, rel, f"batch {i}") for i, b in enumerate(raw)]


def read_category_to_subset(root: str | os.PathLike) -> dict[str, list[str]]:
    """``category_to_subset_name_list.json`` as a dict (empty when the file is absent)."""
    root = Path(root)
    if not (root / CATEGORY_TO_SUBSET).is_file():
        return {}
    raw = _read_json(root, CATEGORY_TO_SUBSET)
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise DataError(f"{CATEGORY_TO_SUBSET}: expected an object mapping each category to a list of subset names")
    return {str(k): [str(s) for s in v] for k, v in raw.items()}


def split_of_frame_type(frame_type: str | None) -> str | None:
    """``train_known`` -> ``train``, ``dev_unseen`` -> ``val``, ``test_*`` -> ``test``; None for anything else."""
    if not frame_type:
        return None
    return _SPLIT_OF_PREFIX.get(frame_type.split("_", 1)[0])


# ====================================================================== pixels
def decode_depth(bits: np.ndarray, scale_adjustment: float = 1.0) -> np.ndarray:
    """uint16 array holding float16 bit patterns -> float32 depth; invalid (0, negative, non-finite) becomes 0."""
    d = np.ascontiguousarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)
    d *= np.float32(scale_adjustment)
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return d


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """float depth -> uint16 float16 bit patterns (0 for invalid: 0, negative or non-finite; clipped to 65504)."""
    d = np.asarray(depth, dtype=np.float32)
    invalid = ~np.isfinite(d) | (d <= 0)
    bits = np.minimum(np.where(invalid, 0, d), 65504.0).astype(np.float16).view(np.uint16)
    bits[invalid] = 0
    return bits


def _open_image(root: Path, rel: str, rec: FrameRecord, field_name: str) -> Image.Image:
    path = root / rel
    if not path.is_file():
        raise DataError(f"{rel}: file is missing ({rec.where}, {field_name})")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{rel}: cannot be decoded as an image ({rec.where}, {field_name}): {e}") from None
    return im


def load_depth_png(path: str | os.PathLike, scale_adjustment: float = 1.0) -> np.ndarray:
    """Reads a CO3D depth PNG (16-bit, float16 bit patterns) into float32 (H, W) depth, 0 = invalid."""
    im = Image.open(path)
    if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"{path}: depth PNG has mode {im.mode}; expected a 16-bit greyscale PNG")
    return decode_depth(np.asarray(im).astype(np.uint16), scale_adjustment)


def mask_crop_box(mask: np.ndarray, threshold: float = 0.4, context: float = 0.3) -> tuple[int, int, int, int] | None:
    """Square pixel box (x0, y0, x1, y1) around the mask's foreground, or None when nothing exceeds ``threshold``.

    The box is centred on the bounding box of ``mask > threshold``; its side is the bounding box's longer side times
    ``1 + context`` (HoloDiffusion's 30 % context), rounded up. It may reach outside the image.
    """
    fg = np.asarray(mask) > threshold
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg.any(axis=0))
    bx0, bx1, by0, by1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    side = max(1, int(math.ceil(max(bx1 - bx0, by1 - by0) * (1.0 + context) - 1e-9)))
    x0 = int(math.floor((bx0 + bx1 - side) / 2.0))
    y0 = int(math.floor((by0 + by1 - side) / 2.0))
    return x0, y0, x0 + side, y0 + side


def _full_square_box(h: int, w: int) -> tuple[int, int, int, int]:
    side = max(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return x0, y0, x0 + side, y0 + side


def _crop_pad(arr: np.ndarray, box: tuple[int, int, int, int], fill) -> np.ndarray:
    """arr[y0:y1, x0:x1] with ``fill`` wherever the box leaves the array."""
    x0, y0, x1, y1 = box
    h, w = arr.shape[:2]
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return arr
    out = np.full((y1 - y0, x1 - x0) + arr.shape[2:], fill, dtype=arr.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def _resize(arr: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    if arr.shape[:2] == tuple(hw):
        return arr
    im = Image.fromarray(arr)
    return np.asarray(im.resize((hw[1], hw[0]), resample=resample))


def _scaled_box(box, src_hw, dst_hw) -> tuple[int, int, int, int]:
    """A pixel box of an image of size src_hw expressed in the pixels of a (differently sized) map of size dst_hw."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    x0, y0, x1, y1 = box
    return (int(round(x0 * sx)), int(round(y0 * sy)), max(int(round(x1 * sx)), int(round(x0 * sx)) + 1),
            max(int(round(y1 * sy)), int(round(y0 * sy)) + 1))


# ====================================================================== PLY
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def read_ply(path: str | os.PathLike, name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads the vertices of a PLY file (ascii or binary): points (N,3) float32, colours (N,3) uint8 or None.

    Colours come from ``red``, ``green``, ``blue`` (uchar as is; float in [0,1] scaled by 255; ushort divided by 257).
    Other vertex properties and elements after the vertices are ignored. ``name`` is used in error messages.
    """
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise DataError(f"{name}: file is missing")
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise DataError(f"{name}: not a PLY file (header must start with 'ply' and close with 'end_header')")
    nl = data.find(b"\n", end)
    body = data[nl + 1:] if nl >= 0 else b""
    fmt = None
    elements: list[tuple[str, int, list[tuple]]] = []
    for line in data[:end].decode("ascii", "replace").splitlines():
        tok = line.split()
        if not tok or tok[0] in ("ply", "comment", "obj_info"):
            continue
        if tok[0] == "format" and len(tok) >= 2:
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) == 3:
            try:
                elements.append((tok[1], int(tok[2]), []))
            except ValueError:
                raise DataError(f"{name}: header line {line!r}: element count is not an integer") from None
        elif tok[0] == "property" and elements:
            if len(tok) == 5 and tok[1] == "list":
                elements[-1][2].append(("list", tok[2], tok[3], tok[4]))
            elif len(tok) == 3 and tok[1] in _PLY_TYPES:
                elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]]))
            else:
                raise DataError(f"{name}: header line {line!r}: unsupported property type")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise DataError(f"{name}: header format is {fmt!r}; expected ascii, binary_little_endian or "
                        "binary_big_endian")
    vi = next((i for i, e in enumerate(elements) if e[0] == "vertex"), None)
    if vi is None:
        raise DataError(f"{name}: header has no 'element vertex'")
    _, n, props = elements[vi]
    if any(p[0] == "list" for p in props):
        raise DataError(f"{name}: vertex element has a list property; expected scalar properties")
    names = [p[0] for p in props]
    for axis in "xyz":
        if axis not in names:
            raise DataError(f"{name}: vertex property {axis!r} is missing")

    if fmt == "ascii":
        lines = body.splitlines()
        skip = 0
        for e in elements[:vi]:
            skip += e[1]
        rows = lines[skip:skip + n]
        if len(rows) < n:
            raise DataError(f"{name}: file ends after {len(rows)} of {n} vertices")
        try:
            flat = np.array(b" ".join(rows).split(), dtype=np.float64)
            table = flat.reshape(n, len(props))
        except ValueError:
            raise DataError(f"{name}: vertex lines do not hold {len(props)} numbers each") from None
        cols = {p[0]: table[:, j].astype(p[1]) for j, p in enumerate(props)}
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        offset = 0
        for e in elements[:vi]:
            if any(p[0] == "list" for p in e[2]):
                raise DataError(f"{name}: element {e[0]!r} before the vertices has list properties; unsupported")
            offset += e[1] * sum(np.dtype(p[1]).itemsize for p in e[2])
        dtype = np.dtype([(p[0], order + p[1]) for p in props])
        need = offset + n * dtype.itemsize
        if len(body) < need:
            raise DataError(f"{name}: file is truncated: {len(body)} bytes of vertex data, {need} needed")
        table = np.frombuffer(body, dtype=dtype, count=n, offset=offset)
        cols = {p[0]: table[p[0]] for p in props}

    points = np.stack([cols["x"], cols["y"], cols["z"]], axis=-1).astype(np.float32)
    colours = None
    if all(c in cols for c in ("red", "green", "blue")):
        c = np.stack([cols["red"], cols["green"], cols["blue"]], axis=-1)
        if c.dtype.kind == "f":
            c = np.clip(np.rint(c * 255.0), 0, 255)
        elif c.dtype.itemsize == 2:
            c = np.rint(c / 257.0)
        colours = c.astype(np.uint8)
    return points, colours


def write_ply(path: str | os.PathLike, points: np.ndarray | Tensor, colours: np.ndarray | Tensor | None = None) -> None:
    """Writes a binary little-endian PLY: x, y, z float and, with ``colours``, red, green, blue uchar.

    ``colours`` (N,3) are uint8, or floats in [0, 1].
    """
    pts = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3); got {pts.shape}")
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    col = None
    if colours is not None:
        col = np.asarray(colours.detach().cpu() if isinstance(colours, Tensor) else colours)
        if col.shape != pts.shape:
            raise ValueError(f"colours must be (N, 3) like points {pts.shape}; got {col.shape}")
        if col.dtype.kind == "f":
            col = np.clip(np.rint(col * 255.0), 0, 255)
        col = col.astype(np.uint8)
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    table = np.empty(len(pts), dtype=np.dtype(fields))
    table["x"], table["y"], table["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(pts)}",
              "property float x", "property float y", "property float z"]
    if col is not None:
        table["red"], table["green"], table["blue"] = col[:, 0], col[:, 1], col[:, 2]
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    _write_bytes(Path(path), ("\n".join(header) + "\n").encode("ascii") + table.tobytes())


# ====================================================================== loaded data
@dataclass
class Frame:
    """One loaded frame, cropped and resized, with its camera corrected to match.

    Attributes:
        image: (3, H, W) float32 in [0, 1]; composited onto white with ``mask`` when the dataset masks images.
        mask: (1, H, W) float32 P(foreground) in [0, 1] (all ones when the frame has no mask).
        depth: (1, H, W) float32 z-depth, 0 where invalid, or None (depth not loaded or not annotated).
        depth_mask: (1, H, W) float32 in {0, 1} from the depth mask file (or depth > 0 when there is none), or None.
        camera: PerspectiveCamera with B=1 whose image_size is (H, W).
        crop_box: (x0, y0, x1, y1) pixel box of the original image this frame shows (may reach outside it).
    """

    image: Tensor
    mask: Tensor
    depth: Tensor | None
    depth_mask: Tensor | None
    camera: PerspectiveCamera
    category: str
    sequence_name: str
    frame_number: int
    crop_box: tuple[int, int, int, int]


@dataclass
class Views:
    """N frames of one sequence stacked: images (N,3,H,W), masks (N,1,H,W), depths / depth_masks (N,1,H,W) or None,
    cameras a PerspectiveCamera batch of N, frame_numbers the N CO3D frame numbers."""

    images: Tensor
    masks: Tensor
    depths: Tensor | None
    depth_masks: Tensor | None
    cameras: PerspectiveCamera
    frame_numbers: list[int]

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def stack(frames: Sequence[Frame]) -> Views:
        if not frames:
            raise ValueError("cannot stack zero frames")
        depths = [f.depth for f in frames]
        dmasks = [f.depth_mask for f in frames]
        return Views(
            images=torch.stack([f.image for f in frames]),
            masks=torch.stack([f.mask for f in frames]),
            depths=torch.stack(depths) if all(d is not None for d in depths) else None,
            depth_masks=torch.stack(dmasks) if all(d is not None for d in dmasks) else None,
            cameras=PerspectiveCamera.stack([f.camera for f in frames]),
            frame_numbers=[f.frame_number for f in frames],
        )


@dataclass
class Batch:
    """A training example: disjoint source views (for the encoder) and target views (for the loss) of one sequence."""

    category: str
    sequence_name: str
    source: Views
    target: Views | None


# ====================================================================== reader
class Co3dDataset:
    """Frames of CO3Dv2-format categories, indexed per sequence.

    Args:
        root: dataset root (holds ``<category>/frame_annotations.jgz``).
        categories: one category, a list, or None for every category in ``category_to_subset_name_list.json``
            (or, without that file, every folder holding a frame_annotations.jgz).
        subset: set-list name (e.g. ``"fewview_dev"``) whose ``split`` selects the frames; None selects frames by
            ``meta.frame_type`` instead (``train_*`` -> train, ``dev_*`` -> val, ``test_*`` -> test; frames without a
            frame type count as train).
        split: ``"train"``, ``"val"``, ``"test"`` or None (every frame of the subset, or of the category).
        image_size: side of the square output images in pixels; None keeps the crop's own resolution.
        crop: crop a square box around the mask (see :func:`mask_crop_box`); frames without a mask, or whose mask
            has nothing above ``mask_threshold``, fall back to the whole image padded to a square. Without ``crop``
            the whole image is padded to a square (or kept as it is when ``image_size`` is None too).
            Where the box leaves the image, images are padded with white and masks / depths with 0 (the box is not
            clamped, so the object stays centred and the scale uniform).
        context: extra margin of the crop, as a fraction of the mask's longer side.
        mask_threshold: foreground threshold of the mask for the crop box.
        mask_images: composite images onto white with their (soft) masks.
        load_depth: also load depth and depth masks.
        sequences: restrict to these sequence names (None: all).
        max_sequences: keep at most this many sequences per category, the first in sorted name order
            (HoloDiffusion trained on the first 500 per category).
        min_mask_mass: drop frames whose annotated ``mask.mass`` is <= this (CO3D treats them as empty).
        camera_dtype: dtype of the returned cameras.
        cache: keep loaded frames in memory (fine for small procedural sets; real CO3D needs a lot of RAM).

    Frames without a viewpoint are left out of the index; so are sequences left with no frame.
    """

    def __init__(self, root: str | os.PathLike, categories: str | Sequence[str] | None = None,
                 subset: str | None = "fewview_dev", split: str | None = "train", image_size: int | None = 128,
                 crop: bool = True, context: float = 0.3, mask_threshold: float = 0.4, mask_images: bool = True,
                 load_depth: bool = False, sequences: Iterable[str] | None = None, max_sequences: int | None = None,
                 min_mask_mass: float = 1.0, camera_dtype: torch.dtype = torch.float32, cache: bool = False):
        self.root = Path(root)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None; got {split!r}")
        if image_size is not None and int(image_size) <= 0:
            raise ValueError(f"image_size must be positive or None; got {image_size!r}")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root is missing")
        self.subset, self.split = subset, split
        self.image_size = None if image_size is None else int(image_size)
        self.crop, self.context, self.mask_threshold = crop, float(context), float(mask_threshold)
        self.mask_images, self.load_depth = mask_images, load_depth
        self.min_mask_mass = min_mask_mass
        self.camera_dtype = camera_dtype
        self._cache: dict[tuple[str, str, int], Frame] | None = {} if cache else None
        self._sequence_records: dict[str, dict[str, SequenceRecord]] = {}

        if categories is None:
            categories = list(read_category_to_subset(self.root)) or sorted(
                p.parent.name for p in self.root.glob(f"*/{FRAME_ANNOTATIONS}"))
            if not categories:
                raise DataError(f"{self.root}: no categories ({CATEGORY_TO_SUBSET} is missing and no folder holds "
                                f"a {FRAME_ANNOTATIONS})")
        elif isinstance(categories, str):
            categories = [categories]
        self.categories = list(categories)
        wanted = None if sequences is None else set(sequences)

        self._frames: dict[tuple[str, str], list[FrameRecord]] = {}
        for cat in self.categories:
            records = load_frame_annotations(self.root, cat)
            records = self._select(cat, records)
            by_seq: dict[str, list[FrameRecord]] = {}
            for r in records:
                if r.viewpoint is None:
                    continue
                if r.mask_mass is not None and r.mask_mass <= self.min_mask_mass:
                    continue
                if wanted is not None and r.sequence_name not in wanted:
                    continue
                by_seq.setdefault(r.sequence_name, []).append(r)
            names = sorted(by_seq)
            if max_sequences is not None:
                names = names[:max_sequences]
            for name in names:
                self._frames[(cat, name)] = sorted(by_seq[name], key=lambda r: r.frame_number)
        self.sequences: list[tuple[str, str]] = list(self._frames)
        self._flat: list[FrameRecord] = [r for key in self.sequences for r in self._frames[key]]

    def _select(self, category: str, records: list[FrameRecord]) -> list[FrameRecord]:
        if self.subset is None:
            if self.split is None:
                return records
            return [r for r in records if (split_of_frame_type(r.frame_type) or "train") == self.split]
        set_list = load_set_list(self.root, category, self.subset)
        splits = SPLITS if self.split is None else (self.split,)
        rel = f"{category}/set_lists/set_lists_{self.subset}.json"
        by_key = {(r.sequence_name, r.frame_number): r for r in records}
        out: list[FrameRecord] = []
        for s in splits:
            if s not in set_list:
                if self.split is None:
                    continue
                raise DataError(f"{rel}: split {s!r} is missing; the file has {', '.join(set_list) or 'none'}")
            for j, (seq, num, _) in enumerate(set_list[s]):
                r = by_key.get((seq, num))
                if r is None:
                    raise DataError(f"{rel}: {s}[{j}] names frame {num} of sequence {seq!r}, which "
                                    f"{category}/{FRAME_ANNOTATIONS} does not hold")
                out.append(r)
        return out

    # ------------------------------------------------------------------ index
    def __len__(self) -> int:
        return len(self._flat)

    def __getitem__(self, i: int) -> Frame:
        return self.load_frame(self._flat[i])

    def frames(self, category: str, sequence_name: str) -> list[FrameRecord]:
        """The indexed frame records of one sequence, by frame number."""
        try:
            return self._frames[(category, sequence_name)]
        except KeyError:
            raise KeyError(f"sequence {sequence_name!r} of category {category!r} is not in this dataset") from None

    def record(self, category: str, sequence_name: str, frame_number: int) -> FrameRecord:
        for r in self.frames(category, sequence_name):
            if r.frame_number == frame_number:
                return r
        raise KeyError(f"frame {frame_number} of sequence {sequence_name!r} ({category}) is not in this dataset")

    # ------------------------------------------------------------------ loading
    def load_frame(self, rec: FrameRecord | tuple[str, str, int]) -> Frame:
        """Loads one frame (a record, or (category, sequence_name, frame_number)), cropped and resized."""
        if not isinstance(rec, FrameRecord):
            rec = self.record(*rec)
        key = (rec.category, rec.sequence_name, rec.frame_number)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        frame = self._load(rec)
        if self._cache is not None:
            self._cache[key] = frame
        return frame

    def _load(self, rec: FrameRecord) -> Frame:
        h, w = rec.image_size
        im = _open_image(self.root, rec.image_path, rec, "image.path")
        if im.size != (w, h):
            raise DataError(f"{rec.image_path}: image is {im.size[1]}x{im.size[0]} (HxW) but {rec.where} gives "
                            f"image.size [{h}, {w}]")
        rgb = np.asarray(im.convert("RGB"))

        if rec.mask_path is not None:
            mim = _open_image(self.root, rec.mask_path, rec, "mask.path")
            if mim.size != (w, h):
                raise DataError(f"{rec.mask_path}: mask is {mim.size[1]}x{mim.size[0]} (HxW) but {rec.where} gives "
                                f"image.size [{h}, {w}]")
            mask8 = np.asarray(mim.convert("L"))
        else:
            mask8 = np.full((h, w), 255, np.uint8)

        try:
            camera = PerspectiveCamera.from_co3d(rec.viewpoint, (h, w))
        except (UserError, ValueError, RuntimeError, TypeError) as e:
            raise DataError(f"{rec.where}: viewpoint: {e}") from None

        box = None
        if self.crop and rec.mask_path is not None:
            box = mask_crop_box(mask8, self.mask_threshold * 255.0, self.context)
        if box is None:
            box = _full_square_box(h, w) if (self.crop or self.image_size is not None) else (0, 0, w, h)
        out_hw = (box[3] - box[1], box[2] - box[0]) if self.image_size is None else (self.image_size,) * 2

        rgb = _resize(_crop_pad(rgb, box, 255), out_hw, Image.Resampling.BILINEAR)
        mask8 = _resize(_crop_pad(mask8, box, 0), out_hw, Image.Resampling.BILINEAR)
        # numpy, not torch: per-frame tensors are small and torch's threaded ops cost more than they save here
        image = rgb.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)
        mask = mask8[None].astype(np.float32) * np.float32(1 / 255)
        if self.mask_images:
            image = image * mask + (1.0 - mask)
        image, mask = torch.from_numpy(image), torch.from_numpy(mask)

        depth = depth_mask = None
        if self.load_depth and rec.depth_path is not None:
            depth, depth_mask = self._load_depth(rec, box, (h, w), out_hw)

        camera = camera.crop(*box)
        if camera.image_size != out_hw:
            camera = camera.resize(out_hw)
        camera = camera.to(dtype=self.camera_dtype)
        return Frame(image, mask, depth, depth_mask, camera, rec.category, rec.sequence_name, rec.frame_number,
                     tuple(int(v) for v in box))

    def _load_depth(self, rec: FrameRecord, box, image_hw, out_hw) -> tuple[Tensor, Tensor]:
        dim = _open_image(self.root, rec.depth_path, rec, "depth.path")
        if dim.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise DataError(f"{rec.depth_path}: depth PNG has mode {dim.mode}; expected 16-bit greyscale holding "
                            f"float16 bit patterns ({rec.where}, depth.path)")
        depth = decode_depth(np.asarray(dim).astype(np.uint16), rec.depth_scale)
        # Real CO3D depth maps may be smaller than the image: map the crop box into the depth map's pixels.
        dbox = box if depth.shape == tuple(image_hw) else _scaled_box(box, image_hw, depth.shape)
        if rec.depth_mask_path is not None:
            mim = _open_image(self.root, rec.depth_mask_path, rec, "depth.mask_path")
            dmask = np.asarray(mim.convert("L")) > 0
            if dmask.shape != depth.shape:
                raise DataError(f"{rec.depth_mask_path}: depth mask is {dmask.shape[0]}x{dmask.shape[1]} (HxW) "
                                f"but its depth map is {depth.shape[0]}x{depth.shape[1]} ({rec.where}, "
                                "depth.mask_path)")
        else:
            dmask = depth > 0
        depth = _resize(_crop_pad(depth, dbox, 0.0), out_hw, Image.Resampling.NEAREST)
        dmask = _resize(_crop_pad(dmask.astype(np.uint8) * 255, dbox, 0), out_hw, Image.Resampling.NEAREST)
        return (torch.from_numpy(np.array(depth, dtype=np.float32))[None],
                torch.from_numpy((dmask > 127).astype(np.float32))[None])

    def load_views(self, category: str, sequence_name: str, frame_numbers: Sequence[int]) -> Views:
        """The given frames of one sequence, stacked."""
        return Views.stack([self.load_frame((category, sequence_name, int(n))) for n in frame_numbers])

    def point_cloud(self, category: str, sequence_name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The sequence's point cloud: points (N,3) float32 and colours (N,3) uint8 or None.

        The path comes from sequence_annotations.jgz; a sequence it does not list falls back to
        ``<category>/<sequence>/pointcloud.ply``.
        """
        if category not in self._sequence_records:
            self._sequence_records[category] = load_sequence_annotations(self.root, category)
        rec = self._sequence_records[category].get(sequence_name)
        if rec is not None and rec.point_cloud_path is None:
            raise DataError(f"{category}/{SEQUENCE_ANNOTATIONS}: sequence {sequence_name!r}: point_cloud is null")
        rel = rec.point_cloud_path if rec is not None else f"{category}/{sequence_name}/pointcloud.ply"
        return read_ply(self.root / rel, name=rel)

    # ------------------------------------------------------------------ batches
    def batches(self, n_source: int, n_target: int, *, seed: int = 0, generator: torch.Generator | None = None,
                n_batches: int | None = None) -> Iterator[Batch]:
        """Training batches: ``n_source`` and ``n_target`` disjoint random frames of one sequence each.

        Sequences with fewer than ``n_source + n_target`` indexed frames are skipped. Each pass visits every other
        sequence once in a random order; passes repeat until ``n_batches`` batches were yielded (forever if None).
        Every draw comes from ``generator`` (default: a fresh one seeded with ``seed``), so a seed fixes the stream.
        Source and target frames are each sorted by frame number.
        """
        if n_source < 1 or n_target < 0:
            raise ValueError(f"need n_source >= 1 and n_target >= 0; got {n_source} and {n_target}")
        need = n_source + n_target
        eligible = [k for k in self.sequences if len(self._frames[k]) >= need]
        if not eligible:
            most = max((len(v) for v in self._frames.values()), default=0)
            raise UserError(f"no sequence of {self.root} ({', '.join(self.categories)}) has the {need} frames a batch "
                            f"of {n_source} source + {n_target} target views needs (the longest has {most})")
        g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        made = 0
        while n_batches is None or made < n_batches:
            for si in torch.randperm(len(eligible), generator=g).tolist():
                if n_batches is not None and made >= n_batches:
                    return
                cat, name = eligible[si]
                recs = self._frames[(cat, name)]
                pick = torch.randperm(len(recs), generator=g)[:need].tolist()
                src = sorted(pick[:n_source])
                tgt = sorted(pick[n_source:])
                source = Views.stack([self.load_frame(recs[i]) for i in src])
                target = Views.stack([self.load_frame(recs[i]) for i in tgt]) if tgt else None
                yield Batch(cat, name, source, target)
                made += 1


# ====================================================================== writer
def _image_u8(image: np.ndarray | Tensor) -> np.ndarray:
    a = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3); got {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind != "f":
            raise ValueError(f"image must be uint8 or float in [0, 1]; got {a.dtype}")
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return a


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def write_frame(root: str | os.PathLike, category: str, sequence_name: str, frame_number: int,
                image: np.ndarray | Tensor, mask: np.ndarray | Tensor | None, depth: np.ndarray | Tensor | None,
                camera: PerspectiveCamera | None, *, frame_type: str | None = "train_known",
                frame_timestamp: float | None = None, depth_mask: np.ndarray | Tensor | None = None,
                jpeg_quality: int = 95, png_compress_level: int = 1) -> dict:
    """Writes one frame's files under ``<root>/<category>/<sequence_name>/`` and returns its frame record.

    Safe to call from worker processes: it touches only this frame's files; hand the returned record to
    :meth:`Co3dWriter.add_record`.

    Args:
        image: (H, W, 3) uint8, or float in [0, 1].
        mask: (H, W) float P(foreground) in [0, 1], stored as 8-bit; None stores no mask.
        depth: (H, W) float z-depth, 0 (or non-finite) for invalid; stored as float16 bit patterns, scale 1.0.
        camera: PerspectiveCamera with B=1 and image_size (H, W); stored as an ``ndc_isotropic`` viewpoint.
        depth_mask: (H, W) bool validity; default depth > 0. Written only with a depth.
    """
    root = Path(root)
    rgb = _image_u8(image)
    h, w = rgb.shape[:2]
    stem = _frame_file_stem(frame_number)
    seq_rel = f"{category}/{sequence_name}"
    img_rel = f"{seq_rel}/images/{stem}.jpg"
    (root / seq_rel / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / img_rel, format="JPEG", quality=int(jpeg_quality))
    record: dict[str, Any] = {
        "sequence_name": sequence_name,
        "frame_number": int(frame_number),
        "frame_timestamp": float(frame_number if frame_timestamp is None else frame_timestamp),
        "image": {"path": img_rel, "size": [h, w]},
        "depth": None,
        "mask": None,
        "viewpoint": None,
        "meta": {"frame_type": frame_type} if frame_type is not None else None,
    }
    if mask is not None:
        m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
        m = m.reshape(m.shape[-2:]) if m.ndim == 3 and m.shape[0] == 1 else m
        if m.shape != (h, w):
            raise ValueError(f"mask must be (H, W) = {(h, w)} like the image; got {m.shape}")
        m8 = np.clip(np.rint(m.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        mask_rel = f"{seq_rel}/masks/{stem}.png"
        (root / seq_rel / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m8).save(root / mask_rel, format="PNG", compress_level=png_compress_level)
        record["mask"] = {"path": mask_rel, "mass": float(m8.sum(dtype=np.int64)) / 255.0}
    if depth is not None:
        d = depth.detach().cpu().numpy() if isinstance(depth, Tensor) else np.asarray(depth)
        d = d.reshape(d.shape[-2:]) if d.ndim == 3 and d.shape[0] == 1 else d
        if d.shape != (h, w):
            raise ValueError(f"depth must be (H, W) = {(h, w)} like the image; got {d.shape}")
        bits = encode_depth(d)
        if depth_mask is None:
            valid = bits != 0
        else:
            dm = depth_mask.detach().cpu().numpy() if isinstance(depth_mask, Tensor) else np.asarray(depth_mask)
            valid = dm.reshape(h, w).astype(bool)
        depth_rel = f"{seq_rel}/depths/{stem}.jpg.geometric.png"
        dmask_rel = f"{seq_rel}/depth_masks/{stem}.png"
        (root / seq_rel / "depths").mkdir(parents=True, exist_ok=True)
        (root / seq_rel / "depth_masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(bits).save(root / depth_rel, format="PNG", compress_level=png_compress_level)
        Image.fromarray(valid).save(root / dmask_rel, format="PNG", compress_level=png_compress_level)
        record["depth"] = {"path": depth_rel, "scale_adjustment": 1.0, "mask_path": dmask_rel}
    if camera is not None:
        if tuple(camera.image_size) != (h, w):
            raise ValueError(f"camera image_size {tuple(camera.image_size)} differs from the image's (H, W) {(h, w)}")
        record["viewpoint"] = _plain(camera.to_co3d())
    return record


def split_sequences(sequence_names: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0) -> dict[str, str]:
    """A reproducible per-sequence split ``{name: "train"|"val"|"test"}`` (at least one train sequence)."""
    names = list(sequence_names)
    n = len(names)
    n_test = min(int(round(n * test_fraction)), max(n - 1, 0))
    n_val = min(int(round(n * val_fraction)), max(n - 1 - n_test, 0))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    split = {}
    for rank, i in enumerate(perm):
        split[names[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def set_lists_from_frame_types(records: Iterable[Mapping]) -> dict[str, list[list]]:
    """``{"train": [...], "val": [...], "test": [...]}`` of [sequence, frame_number, image_path] from meta.frame_type.

    Frames without a frame type go to train.
    """
    out: dict[str, list[list]] = {s: [] for s in SPLITS}
    for r in records:
        meta = r.get("meta") or {}
        s = split_of_frame_type(meta.get("frame_type")) or "train"
        out[s].append([r["sequence_name"], r["frame_number"], r["image"]["path"]])
    return out


def write_category_to_subset(root: str | os.PathLike, mapping: Mapping[str, Sequence[str]],
                             merge: bool = True) -> None:
    """Writes ``category_to_subset_name_list.json``; with ``merge`` keeps other categories already in the file."""
    root = Path(root)
    out = read_category_to_subset(root) if merge else {}
    for cat, subsets in mapping.items():
        out[cat] = sorted(set(out.get(cat, [])) | set(subsets)) if merge else list(subsets)
    _write_json(root / CATEGORY_TO_SUBSET, out)


class Co3dWriter:
    """Writes one category of a CO3Dv2-format dataset under ``root``.

    Frame files are written as frames arrive; the annotation files (frame_annotations.jgz, sequence_annotations.jgz,
    set lists, eval batches) on :meth:`close`. Every stored path is relative to ``root`` and starts with the category,
    so ``root`` may be a temporary folder renamed once complete.
    """

    def __init__(self, root: str | os.PathLike, category: str, *, jpeg_quality: int = 95,
                 png_compress_level: int = 1):
        if not category or "/" in category or "\\" in category:
            raise ValueError(f"category must be a plain folder name; got {category!r}")
        self.root = Path(root)
        self.category = category
        self.jpeg_quality = jpeg_quality
        self.png_compress_level = png_compress_level
        self._frames: dict[tuple[str, int], dict] = {}
        self._sequences: dict[str, dict] = {}
        self._order: dict[str, int] = {}
        self.closed = False
        (self.root / category).mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Co3dWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.closed:
            self.close()

    @property
    def frame_records(self) -> list[dict]:
        """Frame records so far, by sequence (in order of first appearance) then frame number."""
        return [self._frames[k] for k in sorted(self._frames, key=lambda k: (self._order[k[0]], k[1]))]

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Co3dWriter is closed")

    def add_frame(self, sequence_name: str, frame_number: int, image, mask, depth, camera: PerspectiveCamera | None,
                  frame_type: str | None = "train_known", **kwargs) -> dict:
        """Writes one frame (see :func:`write_frame` for the arguments) and records its annotation."""
        self._check_open()
        rec = write_frame(self.root, self.category, sequence_name, frame_number, image, mask, depth, camera,
                          frame_type=frame_type, jpeg_quality=self.jpeg_quality,
                          png_compress_level=self.png_compress_level, **kwargs)
        self.add_record(rec)
        return rec

    def add_record(self, record: dict) -> None:
        """Records a frame annotation whose files were written by :func:`write_frame` (e.g. in a worker process)."""
        self._check_open()
        key = (record["sequence_name"], int(record["frame_number"]))
        if key in self._frames:
            raise ValueError(f"frame {key[1]} of sequence {key[0]!r} was already added")
        if not record["image"]["path"].startswith(self.category + "/"):
            raise ValueError(f"frame record path {record['image']['path']!r} is not in category {self.category!r}")
        self._order.setdefault(key[0], len(self._order))
        self._frames[key] = record

    def add_sequence(self, sequence_name: str, points=None, colours=None, *, point_cloud_quality_score: float = 1.0,
                     viewpoint_quality_score: float | None = 1.0) -> dict:
        """Writes the sequence's ``pointcloud.ply`` (when ``points`` (N,3) are given, ``colours`` (N,3) uint8 or
        float in [0, 1]) and records the sequence annotation."""
        self._check_open()
        rec: dict[str, Any] = {"sequence_name": sequence_name, "category": self.category, "video": None,
                               "point_cloud": None, "viewpoint_quality_score": viewpoint_quality_score}
        if points is not None:
            rel = f"{self.category}/{sequence_name}/pointcloud.ply"
            write_ply(self.root / rel, points, colours)
            rec["point_cloud"] = {"path": rel, "quality_score": float(point_cloud_quality_score),
                                  "n_points": int(len(points))}
        self._order.setdefault(sequence_name, len(self._order))
        self._sequences[sequence_name] = rec
        return rec

    def close(self, set_lists: Mapping[str, Mapping[str, Sequence]] | None = None,
              eval_batches: Mapping[str, Sequence[Sequence]] | None = None,
              default_subset: str = "fewview_dev") -> list[str]:
        """Writes the annotation files; returns the subset names written (for :func:`write_category_to_subset`).

        Args:
            set_lists: ``{subset: {"train"|"val"|"test": [[sequence_name, frame_number(, image_path)], ...]}}``;
                the image path is filled in when left out. None writes one subset, ``default_subset``, split by each
                frame's ``meta.frame_type`` (see :func:`set_lists_from_frame_types`).
            eval_batches: optional ``{subset: [[[sequence_name, frame_number(, image_path)], ...], ...]}``.
        """
        self._check_open()
        frames = self.frame_records
        cat_dir = self.root / self.category
        _write_jgz(cat_dir / FRAME_ANNOTATIONS, frames)
        seqs = [self._sequences.get(name) or {"sequence_name": name, "category": self.category, "video": None,
                                              "point_cloud": None, "viewpoint_quality_score": None}
                for name in sorted(self._order, key=self._order.get)]
        _write_jgz(cat_dir / SEQUENCE_ANNOTATIONS, seqs)

        if set_lists is None:
            set_lists = {default_subset: set_lists_from_frame_types(frames)}
        for subset, splits in set_lists.items():
            unknown = set(splits) - set(SPLITS)
            if unknown:
                raise ValueError(f"set list {subset!r} has splits {sorted(unknown)}; expected {SPLITS}")
            out = {s: [self._triplet(e, f"set list {subset!r} {s}") for e in splits.get(s, [])] for s in SPLITS}
            _write_json(cat_dir / "set_lists" / f"set_lists_{subset}.json", out)
        for subset, batches in (eval_batches or {}).items():
            out = [[self._triplet(e, f"eval batches {subset!r}") for e in b] for b in batches]
            _write_json(cat_dir / "eval_batches" / f"eval_batches_{subset}.json", out)
        self.closed = True
        return list(set_lists)

    def _triplet(self, entry: Sequence, what: str) -> list:
        seq, num = entry[0], int(entry[1])
        rec = self._frames.get((seq, num))
        if rec is None:
            raise ValueError(f"{what} names frame {num} of sequence {seq!r}, which was not added")
        return [seq, num, rec["image"]["path"]]
