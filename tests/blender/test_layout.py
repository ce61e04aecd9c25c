"""The extension's grid rule for objects of different sizes (blender_addon/layout.py, plain Python): no overlaps, the
asked-for gap between neighbours' edges, centred, and the even grid it always was when sizes are unknown."""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "holofusion_addon_layout", Path(__file__).resolve().parents[2] / "blender_addon" / "layout.py")
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)
pack_rows = layout.pack_rows


def _boxes(foot, spots):
    return [(x - f / 2, x + f / 2, y - f / 2, y + f / 2) for f, (x, y) in zip(foot, spots)]


@pytest.mark.parametrize("gap,relative", [(0.1, 0.0), (0.0, 0.35), (0.05, 0.2)])
def test_mixed_sizes_keep_the_gap_and_never_overlap(gap, relative):
    # The shipped categories' largest sides: apple 0.08 m, donut 0.10, teddybear 0.35, hydrant 0.75.
    rng = random.Random(0)
    foot = [rng.choice([0.08, 0.10, 0.35, 0.75]) for _ in range(11)]
    spots = pack_rows(foot, gap=gap, relative_gap=relative)
    boxes = _boxes(foot, spots)
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        apart = max(b[0] - a[1], a[0] - b[1], b[2] - a[3], a[2] - b[3])
        assert apart >= gap + relative * max(foot[i], foot[j]) - 1e-9, (i, j, apart)
    # Neighbours in a row sit exactly that far apart (packed, not spread on the largest object's pitch).
    assert boxes[1][0] - boxes[0][1] == pytest.approx(gap + relative * max(foot[0], foot[1]))
    # Centred on the origin, rows of ceil(sqrt(11)) = 4 in the given order, row 0 in front (-y).
    assert min(b[0] for b in boxes) + max(b[1] for b in boxes) == pytest.approx(0.0, abs=1e-9)
    assert min(b[2] for b in boxes) + max(b[3] for b in boxes) == pytest.approx(0.0, abs=1e-9)
    rows = [spots[k:k + 4] for k in range(0, 11, 4)]
    assert all(len({round(y, 9) for _, y in row}) == 1 for row in rows)
    assert rows[0][0][1] < rows[1][0][1] < rows[2][0][1]


def test_unknown_sizes_give_the_even_grid_with_spacing_as_pitch():
    spots = pack_rows([0.0] * 9, gap=0.3)
    expect = [((i % 3 - 1) * 0.3, (i // 3 - 1) * 0.3) for i in range(9)]
    assert spots == [pytest.approx(e) for e in expect]
    assert pack_rows([0.2], gap=0.1) == [(0.0, 0.0)]
    assert pack_rows([]) == []


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="footprints must be zero or positive"):
        pack_rows([0.1, -0.2])
    with pytest.raises(ValueError, match="gaps must be zero or positive; got -0.1 and 0.0"):
        pack_rows([0.1], gap=-0.1)
