"""Where the demo puts its objects: rows packed by each object's own footprint, largest at the back.

A grid spaced by the largest object suits objects of one size; the shipped categories are not (an apple is 8 cm
across, a hydrant 75 cm), and in such a grid the small ones shrink to specks. Packing rows by footprint keeps every
object at its real size with a gap proportional to its neighbours, and the tall ones behind the short ones keep the
camera's view of all of them. Plain Python (no bpy), so it is tested without Blender."""

from __future__ import annotations

import math

__all__ = ["shelf_layout"]


def shelf_layout(footprints: list[float], heights: list[float], gap: float = 0.35) -> list[tuple[float, float]]:
    """Centres (x, y) on the ground for objects of the given footprints (the side of a square that holds the object
    however it is turned about Z) and heights. ``gap`` is the space between neighbours as a fraction of the larger
    one's footprint. Rows of ceil(sqrt(n)) objects, tallest first; the first row is the furthest from a camera
    looking along +y, and the whole layout is centred on the origin."""
    n = len(footprints)
    if n != len(heights):
        raise ValueError(f"{n} footprints but {len(heights)} heights")
    if any(not (f > 0) for f in footprints):
        raise ValueError("every footprint must be positive")
    if n == 0:
        return []
    per_row = math.ceil(math.sqrt(n))
    order = sorted(range(n), key=lambda i: (-heights[i], i))
    rows = [order[k:k + per_row] for k in range(0, n, per_row)]
    out: list[tuple[float, float] | None] = [None] * n
    y = 0.0
    prev_depth = None
    for row in rows:
        depth = max(footprints[i] for i in row)
        if prev_depth is not None:
            y -= (prev_depth + depth) / 2 + gap * max(prev_depth, depth)
        xs = [0.0]
        for a, b in zip(row, row[1:]):
            xs.append(xs[-1] + (footprints[a] + footprints[b]) / 2 + gap * max(footprints[a], footprints[b]))
        left = xs[0] - footprints[row[0]] / 2
        right = xs[-1] + footprints[row[-1]] / 2
        for i, x in zip(row, xs):
            out[i] = (x - (left + right) / 2, y)
        prev_depth = depth
    # Centre in y: the first row's back edge and the last row's front edge.
    back = max(footprints[i] for i in rows[0]) / 2
    front = y - prev_depth / 2
    shift = (back + front) / 2
    return [(x, yy - shift) for x, yy in out]
