"""The demo's layout of mixed-size objects (holofusion.demo.layout): no overlaps, real gaps, tall ones at the back."""

import itertools
import random

import pytest

from holofusion.demo.layout import shelf_layout


def _boxes(foot, spots):
    return [(x - f / 2, x + f / 2, y - f / 2, y + f / 2) for f, (x, y) in zip(foot, spots)]


def test_mixed_sizes_do_not_overlap_and_keep_a_gap():
    # The shipped categories' sizes: apples ~0.08 m, donuts ~0.12, teddybears ~0.35, hydrants ~0.75 (and taller).
    rng = random.Random(0)
    foot = [rng.choice([0.08, 0.12, 0.35, 0.75]) * rng.uniform(0.9, 1.1) for _ in range(11)]
    heights = [f * rng.uniform(0.8, 1.6) for f in foot]
    gap = 0.35
    spots = shelf_layout(foot, heights, gap=gap)
    assert len(spots) == len(foot)
    for (i, a), (j, b) in itertools.combinations(enumerate(_boxes(foot, spots)), 2):
        apart_x = max(b[0] - a[1], a[0] - b[1])
        apart_y = max(b[2] - a[3], a[2] - b[3])
        # Neighbours in a row keep gap x the larger footprint; rows keep it in y.
        assert max(apart_x, apart_y) >= gap * max(foot[i], foot[j]) - 1e-9, (i, j, apart_x, apart_y)


def test_centred_and_tallest_at_the_back():
    foot = [0.08, 0.75, 0.12, 0.35, 0.08, 0.75, 0.12, 0.35]
    heights = [0.08, 1.0, 0.05, 0.4, 0.09, 0.9, 0.06, 0.38]
    spots = shelf_layout(foot, heights)
    boxes = _boxes(foot, spots)
    assert min(b[0] for b in boxes) + max(b[1] for b in boxes) == pytest.approx(0.0, abs=1e-9)
    assert min(b[2] for b in boxes) + max(b[3] for b in boxes) == pytest.approx(0.0, abs=1e-9)
    # A camera looks along +y: the two hydrants stand in the furthest row, the smallest objects in the nearest.
    ys = sorted({round(y, 9) for _, y in spots})
    assert len(ys) == 3  # rows of ceil(sqrt(8)) = 3
    back = [i for i, (_, y) in enumerate(spots) if round(y, 9) == ys[-1]]
    front = [i for i, (_, y) in enumerate(spots) if round(y, 9) == ys[0]]
    assert {1, 5} <= set(back)
    assert max(heights[i] for i in front) < min(heights[i] for i in back)


def test_one_object_at_the_origin_and_bad_input():
    assert shelf_layout([0.3], [0.5]) == [(0.0, 0.0)]
    assert shelf_layout([], []) == []
    with pytest.raises(ValueError, match="2 footprints but 1 heights"):
        shelf_layout([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="positive"):
        shelf_layout([0.1, 0.0], [0.1, 0.1])
