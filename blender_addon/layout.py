"""Grid layout for objects of different sizes: rows packed by each object's own footprint.

A grid with one pitch suits objects of one size; the shipped categories are not (an apple's largest side is 8 cm, a
hydrant's 75 cm), and Populate may mix them. Packing each row by footprint keeps every object at its real size and
the same gap from its neighbours. Plain Python (no bpy): the extension's Populate and `holofusion demo` use it, and
the tests run it without Blender."""

from __future__ import annotations

import math

__all__ = ["pack_rows"]


def pack_rows(footprints: list[float], gap: float = 0.0, relative_gap: float = 0.0,
              per_row: int | None = None) -> list[tuple[float, float]]:
    """Centres (x, y) of objects laid out in rows, in the order given, the whole layout centred on the origin.

    ``footprints``: the side of a square that holds each object on the ground (0 for an unknown size: then the
    pitch is the gap alone, an ordinary grid). Neighbours are ``gap + relative_gap * (the larger footprint)``
    apart, edge to edge, in x within a row and in y between rows (a row is as deep as its largest object).
    ``per_row``: objects per row (default: ceil(sqrt(n)), a square-ish grid). Row 0 is at -y, the front for a
    camera looking along +y."""
    n = len(footprints)
    if any(not (f >= 0) for f in footprints):
        raise ValueError("footprints must be zero or positive")
    if not (gap >= 0 and relative_gap >= 0):
        raise ValueError(f"gaps must be zero or positive; got {gap} and {relative_gap}")
    if n == 0:
        return []
    per_row = per_row or math.ceil(math.sqrt(n))

    def apart(a: float, b: float) -> float:
        return (a + b) / 2 + gap + relative_gap * max(a, b)

    rows = [list(range(k, min(k + per_row, n))) for k in range(0, n, per_row)]
    xs: dict[int, float] = {}
    for row in rows:
        x = [0.0]
        for a, b in zip(row, row[1:]):
            x.append(x[-1] + apart(footprints[a], footprints[b]))
        # Centre the row between its outer edges.
        mid = (x[0] - footprints[row[0]] / 2 + x[-1] + footprints[row[-1]] / 2) / 2
        xs.update({i: xi - mid for i, xi in zip(row, x)})
    depth = [max(footprints[i] for i in row) for row in rows]
    y = [0.0]
    for a, b in zip(depth, depth[1:]):
        y.append(y[-1] + apart(a, b))
    mid = (y[0] - depth[0] / 2 + y[-1] + depth[-1] / 2) / 2
    return [(xs[i], y[r] - mid) for r, row in enumerate(rows) for i in row]
