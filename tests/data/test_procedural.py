"""Procedural categories: every category renders a framed object on pure white, objects are reproducible from their
seed and differ between seeds, surface samples lie on the surface and inside the rendered silhouette, depth maps
un-project onto the surface, and the sphere tracer finds the same first hit as a slow fixed-step reference march."""

import math

import numpy as np
import pytest
import torch

from holofusion.cameras import PerspectiveCamera
from holofusion.data.procedural import (
    CATEGORIES,
    WORLD_UP,
    Light,
    SequenceCameraConfig,
    make_object,
    render_views,
    sequence_cameras,
)
from holofusion.errors import UserError

SIZE = 48


@pytest.fixture(scope="module")
def objects():
    return {cat: make_object(cat, 7) for cat in CATEGORIES}


@pytest.fixture(scope="module")
def renders(objects):
    out = {}
    for cat, obj in objects.items():
        cams = sequence_cameras(7, 3, (SIZE, SIZE), obj.bounding_radius)
        out[cat] = (cams, *render_views(obj, cams, light=Light()))
    return out


def test_categories_and_world_up():
    assert CATEGORIES == ("apple", "donut", "hydrant", "teddybear")
    assert WORLD_UP == (0.0, -1.0, 0.0)


@pytest.mark.parametrize("cat", CATEGORIES)
def test_each_category_renders_a_framed_object_on_white(cat, renders):
    cams, images, masks, depth = renders[cat]
    assert images.shape == (3, SIZE, SIZE, 3) and masks.shape == depth.shape == (3, SIZE, SIZE)
    assert images.dtype == masks.dtype == depth.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert 0.0 <= float(masks.min()) and float(masks.max()) <= 1.0
    for v in range(3):
        m = masks[v]
        assert float(m.mean()) > 0.03, "object too small or missing"
        # Pure white wherever the mask is empty, and the object is not cut by the frame.
        assert torch.all(images[v][m == 0] == 1.0)
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        # Depth is given exactly where the mask is, and is in front of the camera.
        assert torch.equal(depth[v] > 0, m > 0)
        # Something inside the mask is not white: the object is drawn, not just masked.
        assert float((1.0 - images[v][m == 1]).abs().mean()) > 0.05


def test_unknown_category_is_a_user_error():
    with pytest.raises(UserError) as e:
        make_object("chair", 0)
    msg = str(e.value)
    assert "chair" in msg and all(c in msg for c in CATEGORIES)


def test_same_seed_same_object_and_images():
    a, b = make_object("teddybear", 3), make_object("teddybear", 3)
    assert a.bounding_radius == b.bounding_radius and a.params == b.params
    cams = sequence_cameras(3, 2, (32, 32), a.bounding_radius)
    ra = render_views(a, cams, generator=torch.Generator().manual_seed(1))
    rb = render_views(b, cams, generator=torch.Generator().manual_seed(1))
    for x, y in zip(ra, rb):
        assert torch.equal(x, y)
    pa = a.sample_surface(100, torch.Generator().manual_seed(5))
    pb = b.sample_surface(100, torch.Generator().manual_seed(5))
    assert torch.equal(pa[0], pb[0]) and torch.equal(pa[1], pb[1])
    cams2 = sequence_cameras(3, 2, (32, 32), a.bounding_radius)
    assert torch.equal(cams.R, cams2.R) and torch.equal(cams.focal_length, cams2.focal_length)


def test_chunked_rendering_equals_one_trace(objects):
    obj = objects["donut"]
    cams = sequence_cameras(1, 3, (24, 24), obj.bounding_radius)
    one = render_views(obj, cams, chunk_views=16)
    per_view = render_views(obj, cams, chunk_views=1)
    for x, y in zip(one, per_view):
        assert torch.allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("cat", CATEGORIES)
def test_seeds_vary_in_colour_and_shape(cat):
    """Over 16 seeds, the objects' mean surface colours and their proportions spread like a real category's."""
    means, spreads = [], []
    for seed in range(16):
        obj = make_object(cat, seed)
        pts, cols = obj.sample_surface(300, torch.Generator().manual_seed(seed))
        means.append(cols.mean(0))
        # Shape: the ratio of spread along the up axis to the spread across it.
        up = pts @ torch.tensor(WORLD_UP)
        across = (pts - up[:, None] * torch.tensor(WORLD_UP)).norm(dim=-1)
        spreads.append(float(up.std() / across.std()))
    means = torch.stack(means)
    colour_spread = float(means.std(0).norm())
    assert colour_spread > 0.06, f"{cat}: mean colours barely differ across seeds ({colour_spread:.3f})"
    assert len({tuple(np.round(m.numpy(), 3)) for m in means}) == 16
    assert float(np.std(spreads)) > 0.03, f"{cat}: proportions barely differ across seeds"


def test_world_is_normalised_and_up_is_minus_y(objects):
    for cat, obj in objects.items():
        pts, _ = obj.sample_surface(2000, torch.Generator().manual_seed(0))
        assert float(pts.mean(0).norm()) < 0.1, cat
        spread = float(pts.var(0).mean().sqrt())
        assert 0.85 < spread < 1.15, (cat, spread)
        assert float(pts.norm(dim=-1).max()) <= obj.bounding_radius, cat
        assert 1.5 < obj.bounding_radius < 3.6, (cat, obj.bounding_radius)
    # A hydrant stands on its wide flange with its narrow nut on top: the top is towards -Y.
    pts, _ = objects["hydrant"].sample_surface(4000, torch.Generator().manual_seed(0))
    y = pts[:, 1]
    width = pts[:, [0, 2]].norm(dim=-1)
    top = width[y < float(y.min()) + 0.1].max()
    bottom = width[y > float(y.max()) - 0.1].max()
    assert float(bottom) > 2 * float(top)


@pytest.mark.parametrize("cat", CATEGORIES)
def test_surface_samples_lie_on_the_surface_and_inside_the_silhouette(cat, objects, renders):
    obj = objects[cat]
    cams, _, masks, _ = renders[cat]
    pts, cols = obj.sample_surface(1500, torch.Generator().manual_seed(2))
    assert pts.shape == cols.shape == (1500, 3)
    assert float(obj.sdf(pts).abs().max()) < 1e-3
    assert 0.0 <= float(cols.min()) and float(cols.max()) <= 1.0
    assert torch.isfinite(pts).all()
    # Occluded points also project inside the silhouette, so (almost) all of them must land in the mask.
    for v in range(len(cams)):
        uv = cams[v].project(pts)
        ix = uv[:, 0].floor().long().clamp(0, SIZE - 1)
        iy = uv[:, 1].floor().long().clamp(0, SIZE - 1)
        inside = masks[v][iy, ix] > 0
        assert float(inside.float().mean()) >= 0.99, (cat, v, float(inside.float().mean()))


@pytest.mark.parametrize("cat", CATEGORIES)
def test_depth_unprojects_onto_the_surface(cat, objects, renders):
    obj = objects[cat]
    cams, _, masks, depth = renders[cat]
    fx = float(cams.pixel_intrinsics()[0][0])
    for v in range(len(cams)):
        hit = masks[v].reshape(-1) == 1
        xy = cams[v].pixel_centers()[hit]
        z = depth[v].reshape(-1)[hit]
        p = cams[v].unproject(xy, z)[0]
        # The tracer stops within 2 % of a pixel's footprint of the surface.
        tol = 0.03 * z / fx + 1e-5
        assert torch.all(obj.sdf(p).abs() <= tol), cat


def _reference_march(obj, o, d, step, level):
    """Slow reference: march each ray in fixed steps through the bounding sphere, then bisect the first step where
    the SDF drops below ``level``. Returns that point's z-depth per ray (NaN where there is none)."""
    norm = d.norm(dim=-1)
    u = d / norm[:, None]
    t = (o.norm(dim=-1) - obj.bounding_radius).clamp_min(0.0)
    far = o.norm(dim=-1) + obj.bounding_radius
    lo, hi = t.clone(), torch.full_like(t, float("nan"))
    while True:
        open_ = torch.isnan(hi) & (t < far)
        if not bool(open_.any()):
            break
        below = open_ & (obj.sdf(o + u * t[:, None]) < level)
        hi = torch.where(below, t, hi)
        lo = torch.where(open_ & ~below, t, lo)
        t = torch.where(open_ & ~below, t + step, t)
    found = ~torch.isnan(hi)
    hi = torch.where(found, hi, lo)
    for _ in range(30):
        mid = (lo + hi) / 2
        below = obj.sdf(o + u * mid[:, None]) < level
        hi, lo = torch.where(below, mid, hi), torch.where(below, lo, mid)
    return torch.where(found, hi / norm, torch.full_like(hi, float("nan")))


@pytest.mark.parametrize("cat", CATEGORIES)
def test_sphere_tracer_matches_a_fixed_step_reference(cat, objects):
    """The fast tracer's first hit agrees with a dense fixed-step march: it never stops before the first point within
    its hit tolerance, never steps through a surface, and rays it calls misses cross no surface."""
    obj = objects[cat]
    cam = sequence_cameras(11, 1, (40, 40), obj.bounding_radius)
    _, masks, depth = render_views(obj, cam)
    g = torch.Generator().manual_seed(0)
    flat_m, flat_d = masks[0].reshape(-1), depth[0].reshape(-1)
    hits = torch.nonzero(flat_m == 1).squeeze(1)
    misses = torch.nonzero(flat_m == 0).squeeze(1)
    pick_h = hits[torch.randperm(len(hits), generator=g)[:50]]
    pick_m = misses[torch.randperm(len(misses), generator=g)[:40]]
    o, d = cam.rays()
    idx = torch.cat([pick_h, pick_m])
    f_px = float(cam.pixel_intrinsics()[0][0])
    # The tracer's hit tolerance is 2 % of the pixel footprint, z / f_px, at the hit.
    tol = 0.02 * float(flat_d[pick_h].max()) / f_px
    near = _reference_march(obj, o[0][idx], d[0][idx], step=0.01, level=tol)
    cross = _reference_march(obj, o[0][idx], d[0][idx], step=0.01, level=0.0)
    n_h = len(pick_h)
    assert not torch.isnan(near[:n_h]).any(), "the reference found nothing near where the tracer hit"
    got = flat_d[pick_h]
    assert torch.all(got >= near[:n_h] - 1e-3)
    crossed = ~torch.isnan(cross[:n_h])
    assert torch.all(got[crossed] <= cross[:n_h][crossed] + 1e-3)
    assert torch.isnan(cross[n_h:]).all(), "a ray the tracer called a miss passes through the object"


def test_sequence_cameras_orbit_the_object():
    cfg = SequenceCameraConfig()
    cams = sequence_cameras(5, 24, (64, 48), bounding_radius=2.0)
    assert isinstance(cams, PerspectiveCamera) and len(cams) == 24 and cams.image_size == (64, 48)
    centres = cams.center()
    up = torch.tensor(WORLD_UP)
    elev = torch.rad2deg(torch.asin((centres @ up) / centres.norm(dim=-1)))
    assert float(elev.min()) >= cfg.elevation_deg[0] - 2.0 and float(elev.max()) <= cfg.elevation_deg[1] + 2.0
    horiz = centres - (centres @ up)[:, None] * up
    az = torch.atan2(horiz[:, 2], horiz[:, 0])
    # A walk around: the azimuths cover the circle with no gap wider than two even steps.
    s = torch.sort(az % (2 * math.pi)).values
    gaps = torch.diff(torch.cat([s, s[:1] + 2 * math.pi]))
    assert float(gaps.max()) < 2 * (2 * math.pi / 24)
    # Every camera looks at (about) the origin, with the object's up pointing up in the image.
    fwd = cams.R[:, :, 2]
    to_origin = torch.nn.functional.normalize(-centres, dim=-1)
    assert float((fwd * to_origin).sum(-1).min()) > 0.99
    # Roll is at most a few degrees: the camera's left axis stays nearly level, its up axis on the world's up side.
    assert float((cams.R[:, :, 0] @ up).abs().max()) < math.sin(math.radians(cfg.roll_deg + 1.0))
    assert float((cams.R[:, :, 1] @ up).min()) > 0.5
    # Other seeds give other sequences.
    other = sequence_cameras(6, 24, (64, 48), bounding_radius=2.0)
    assert not torch.allclose(other.R, cams.R)
