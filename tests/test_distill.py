"""Distillation and the pipeline on tiny models: the fit beats its starting grid on the targets, the patch loss forgives
small shifts and nothing more, the initial grid reproduces the coarse fields, seeds reproduce, the callback stops
every stage, presets and bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from holofusion.distill import (DistillConfig, ExplicitField, GridFit, backproject_colour, distill, initial_grid,
                                object_box, patch_loss, rim_mask, sharpen_density, sharpness, sharpness_split,
                                start_grid, view_cameras)
from holofusion.errors import UserError
from holofusion.grid import VoxelGrid
from holofusion.pipeline import PRESETS, HoloFusionPipeline, PipelineCancelled, with_distill
from holofusion.render import RenderConfig, render_grid


pytestmark = pytest.mark.usefixtures("one_thread")


def small_preset(**distill_changes):
    """The standard preset shrunk to tiny-model sizes (16 px views, a 16^3 grid, a few dozen steps)."""
    settings = dict(resolution=16, iterations=40, patches=4, patch_size=8, resample_every=15, window=5)
    pre = with_distill(PRESETS["standard"], **{**settings, **distill_changes})
    return replace(pre, views=4, sr_steps=3, coarse_steps=5)


@pytest.fixture(scope="module")
def pipe(tiny_models) -> HoloFusionPipeline:
    return HoloFusionPipeline.from_pretrained(str(tiny_models["pipeline"]))


# --------------------------------------------------------------------------------------------------------------------
# pieces


def test_patch_loss_forgives_shifts_up_to_the_tolerance_only():
    g = torch.Generator().manual_seed(0)
    big = torch.rand(2, 3, 14, 14, generator=g)
    target = big[..., 3:13, 2:12]  # the window at offset (3, 2) of big: 1 px off the centre (2, 2) in y
    render = big[..., 1:13, 1:13]  # the 12 x 12 render centred on (2, 2) + 1 px margin
    assert torch.allclose(patch_loss(render, target, 1), torch.zeros(2), atol=1e-7)
    assert bool((patch_loss(render[..., 1:11, 1:11], target, 0) > 1e-3).all())  # no tolerance: an error
    far = big[..., 4:14, 4:14]  # 2 px off in x as well: beyond a tolerance of 1
    assert bool((patch_loss(render, far, 1) > 1e-3).all())


def test_patch_loss_l1_is_the_mean_absolute_error():
    g = torch.Generator().manual_seed(1)
    render, target = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    torch.testing.assert_close(patch_loss(render, target, 0, "l1"), (render - target).abs().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(patch_loss(render, target, 0), ((render - target) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("bad, words", [({"colour_resolution": 1}, "colour_resolution"),
                                        ({"colour_resolution": 128}, "colour_resolution"),
                                        ({"loss": "huber"}, "loss must be"),
                                        ({"colour_init": "texture"}, "colour_init"),
                                        ({"sharpen": 0.5}, "sharpen must be")])
def test_distill_config_refuses_bad_settings(bad, words):
    with pytest.raises(ValueError, match=words):
        DistillConfig(**bad)


def test_initial_grid_reproduces_the_coarse_fields(pipe):
    coarse = pipe.coarse(3, None, 5, None)
    init = initial_grid(coarse, pipe.hd.decoder, 24)
    assert init.features.shape == (1, 4, 24, 24, 24)
    pts = init.cell_centers()[::37][None]
    with torch.no_grad():
        want = pipe.hd.decoder(coarse.sample(pts)[0])
        got = ExplicitField()(init.sample(pts)[0])
    torch.testing.assert_close(got.density_raw, want.density_raw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.rgb, pipe.hd.decoder.mean_colour(coarse.sample(pts)[0]).clamp(1e-3, 1 - 1e-3),
                               atol=1e-4, rtol=1e-4)


def test_sharpening_keeps_the_surface_and_steepens_the_rim(pipe):
    """A fog-edged ball (density falling off smoothly through the surface level at radius 1): sharpened, its
    density crosses the level at the same cells (the same surface), rises faster inside and falls faster outside,
    and its silhouettes are crisper (fewer half-transparent pixels); colour is untouched."""
    level, r = 1.4, 24
    shell = VoxelGrid(torch.zeros(1, 1, r, r, r), (-2.0,) * 3, (2.0,) * 3)
    radius = shell.cell_centers().norm(dim=-1).reshape(1, 1, r, r, r)
    sigma = level * torch.exp(-2.0 * (radius - 1.0))  # level at radius 1, e-fold every half unit
    colour = torch.randn(1, 3, r, r, r, generator=torch.Generator().manual_seed(0))
    plain = VoxelGrid(torch.cat([torch.log(torch.expm1(sigma)), colour], 1), shell.box_min, shell.box_max)
    sharp = sharpen_density(plain, level, 4.0)
    torch.testing.assert_close(sharp.features[:, 1:], colour)
    s0 = torch.nn.functional.softplus(plain.features[:, 0])
    s1 = torch.nn.functional.softplus(sharp.features[:, 0])
    assert bool(((s0 > level) == (s1 > level)).all())
    inside, outside = s0 > 1.2 * level, s0 < level / 1.2
    assert bool((s1[inside] > s0[inside]).all()) and bool((s1[outside] < s0[outside]).all())
    assert float(s1.max()) <= 30.0 + 1e-3  # capped: opaque within about a cell, no larger
    cams = view_cameras(4, 9.0, 3.0, 32)
    look = RenderConfig(n_coarse=64, n_fine=32)
    with torch.no_grad():
        a0 = render_grid(plain, ExplicitField(), cams, look).alpha
        a1 = render_grid(sharp, ExplicitField(), cams, look).alpha
    soft0, soft1 = int(((a0 > 0.05) & (a0 < 0.95)).sum()), int(((a1 > 0.05) & (a1 < 0.95)).sum())
    assert soft1 < 0.6 * soft0, (soft0, soft1)
    # start_grid sharpens only with the model's surface level to keep.
    coarse = pipe.coarse(3, None, 5, None)
    with pytest.raises(ValueError, match="surface level"):
        start_grid(coarse, pipe.hd.decoder, DistillConfig(resolution=8, sharpen=2.0))


def test_view_cameras_cover_the_band_and_look_at_the_object():
    cams = view_cameras(16, 9.0, 2.0, 32, (-5.0, 50.0))
    centres = cams.center()
    assert torch.allclose(centres.norm(dim=-1), torch.full((16,), 9.0), atol=1e-4)
    uv = cams.project(torch.zeros(16, 1, 3))
    assert torch.allclose(uv, torch.full_like(uv, 16.0), atol=1e-3)  # the origin at every image's centre
    up = -centres[:, 1] / 9.0  # world up is -Y
    elev = torch.rad2deg(torch.asin(up))
    assert float(elev.min()) > -5.0 and float(elev.max()) < 50.0 and float(elev.max() - elev.min()) > 40.0
    az = torch.atan2(centres[:, 2], centres[:, 0])
    assert len(set((torch.rad2deg(az) // 45).tolist())) == 8  # every 45-degree sector holds a view


def _render_error(grid: VoxelGrid, cams, views: torch.Tensor) -> float:
    with torch.no_grad():
        out = render_grid(grid, ExplicitField(), cams, RenderConfig(n_coarse=48, n_fine=24))
    return float((out.rgb.permute(0, 3, 1, 2) - views).abs().mean())


@pytest.mark.parametrize("changes", [{}, {"colour_resolution": 8}, {"loss": "l1"}, {"colour_init": "views"}],
                         ids=["one-grid", "coarser-colour-grid", "l1", "colour-from-views"])
def test_distillation_recovers_a_known_object(pipe, changes):
    """Consistent targets (renders of a known sphere coloured by position) from the coarse grid's start: the fit
    must get most of the way there, with colour on its own coarser grid or an L1 loss too."""
    coarse = pipe.coarse(3, None, 5, None)
    init = initial_grid(coarse, pipe.hd.decoder, 16)
    c = init.cell_centers()
    f = torch.stack([torch.where(c.norm(dim=-1) < 1.2, 5.0, -5.0), 2 * c[:, 0], 2 * c[:, 1], -torch.ones(len(c))])
    truth = VoxelGrid(f.reshape(1, 4, 16, 16, 16), init.box_min, init.box_max)
    cams = view_cameras(8, 9.0, 3.0, 32)
    with torch.no_grad():
        views = render_grid(truth, ExplicitField(), cams, RenderConfig(n_coarse=64, n_fine=32)).rgb.permute(0, 3, 1, 2)
    cfg = DistillConfig(resolution=16, iterations=100, patches=8, patch_size=8, resample_every=0, tolerance=0.0,
                        **changes)
    res = distill(init, views, cams, cfg, torch.Generator().manual_seed(0))
    before, after = _render_error(init, cams, views), _render_error(res.grid, cams, views)
    assert after < 0.4 * before, f"{before:.4f} -> {after:.4f}"
    assert res.iterations == 100 and len(res.losses) == 100
    assert res.grid.features.shape == (1, 4, 16, 16, 16)  # colour handed on at the density's resolution
    if changes.get("colour_resolution"):  # 8^3 colour cells fitted, 16^3 density cells
        fit = GridFit(init, cams, cfg, torch.Generator().manual_seed(0))
        assert fit.colour.shape == (1, 3, 8, 8, 8) and fit.density.shape == (1, 1, 16, 16, 16)


def test_backprojection_colours_a_known_object_from_its_views():
    """A sphere with position-dependent colour, seen by 12 views; its density known, its colour grey: the
    back-projected colours must reproduce views the bake never saw, and only cells some view saw change."""
    r, box = 24, ((-2.0,) * 3, (2.0,) * 3)
    c = VoxelGrid(torch.zeros(1, 1, r, r, r), *box).cell_centers()
    density = torch.where(c.norm(dim=-1) < 1.2, 5.0, -5.0)
    colour = torch.stack([3 * torch.sin(4 * c[:, 0]), 3 * torch.cos(5 * c[:, 1]), 2 * c[:, 2]])
    truth = VoxelGrid(torch.cat([density[None], colour]).reshape(1, 4, r, r, r), *box)
    grey = VoxelGrid(torch.cat([density[None], torch.zeros(3, len(c))]).reshape(1, 4, r, r, r), *box)
    look = RenderConfig(n_coarse=64, n_fine=32)
    seen_cams, held = view_cameras(12, 9.0, 3.0, 32), view_cameras(4, 9.0, 3.0, 32, (10.0, 40.0))
    with torch.no_grad():
        views = render_grid(truth, ExplicitField(), seen_cams, look).rgb.permute(0, 3, 1, 2)
        want = render_grid(truth, ExplicitField(), held, look).rgb.permute(0, 3, 1, 2)
    baked = backproject_colour(grey, views, seen_cams, DistillConfig().render)
    before, after = _render_error(grey, held, want), _render_error(baked, held, want)
    assert after < 0.5 * before, f"{before:.4f} -> {after:.4f}"
    assert torch.equal(baked.features[:, :1], grey.features[:, :1])  # density untouched
    far = c.norm(dim=-1) > 1.8  # empty space no view's surface reaches keeps its colour
    assert torch.equal(baked.features[0, 1:].reshape(3, -1)[:, far], grey.features[0, 1:].reshape(3, -1)[:, far])


def test_distilled_renders_match_the_super_resolved_views_better_than_the_coarse_start(pipe):
    pre = small_preset(resample_every=0, iterations=60, tolerance=0.0)
    coarse = pipe.coarse(3, None, 5, None)
    cams, cond = pipe.conditions(coarse, pre)
    views = pipe.super_resolve(cond, 3, 3, None)
    init = initial_grid(coarse, pipe.hd.decoder, 16)
    res = distill(init, views, cams, pre.distill, torch.Generator().manual_seed(0))
    # The tiny super-resolution model's views disagree with each other a lot; a single grid fits what they share.
    before, after = _render_error(init, cams, views), _render_error(res.grid, cams, views)
    assert after < 0.95 * before, f"distilled renders are no closer to the targets: {before:.4f} -> {after:.4f}"


def test_distillation_stops_early_when_converged(pipe):
    pre = small_preset(resample_every=0, iterations=400, tolerance=0.5, window=5)
    coarse = pipe.coarse(3, None, 5, None)
    cams, cond = pipe.conditions(coarse, pre)
    views = pipe.super_resolve(cond, 3, 3, None)
    res = distill(initial_grid(coarse, pipe.hd.decoder, 16), views, cams, pre.distill,
                  torch.Generator().manual_seed(0))
    assert res.converged and res.iterations < 400


def test_the_object_box_holds_the_dense_part_and_shrinks_the_cells(pipe):
    coarse = pipe.coarse(3, None, 5, None)
    lo, hi = object_box(coarse, pipe.hd.decoder, density=0.5, margin=0.15)
    side = [b - a for a, b in zip(lo, hi)]
    assert max(side) - min(side) < 1e-5  # a cube
    assert all(a >= c - 1e-6 and b <= d + 1e-6 for a, b, c, d in zip(lo, hi, coarse.box_min, coarse.box_max))
    # Every cell denser than the threshold is inside it.
    pts = VoxelGrid(torch.zeros(1, 1, 32, 32, 32), coarse.box_min, coarse.box_max).cell_centers()
    with torch.no_grad():
        sigma = torch.nn.functional.softplus(pipe.hd.decoder(coarse.sample(pts[None])[0]).density_raw)
    dense = pts[sigma > 0.5]
    if dense.shape[0]:
        assert (dense >= torch.tensor(lo) - 0.25).all() and (dense <= torch.tensor(hi) + 0.25).all()
    # Nothing that dense: the whole coarse box.
    assert object_box(coarse, pipe.hd.decoder, density=1e9, margin=0.1) == (coarse.box_min, coarse.box_max)
    grid = start_grid(coarse, pipe.hd.decoder, DistillConfig(resolution=8))
    assert (grid.box_min, grid.box_max) == object_box(coarse, pipe.hd.decoder, 0.5, 0.15)
    whole = start_grid(coarse, pipe.hd.decoder, DistillConfig(resolution=8, box_density=None))
    assert (whole.box_min, whole.box_max) == (coarse.box_min, coarse.box_max)


def test_the_synchronised_phase_ends_on_views_the_grid_agrees_with(pipe):
    """Each synchronised step continues from the grid's renders, so the final views are close to the grid's own
    renders; views re-sampled independently from the same renders are not. Progress counts every fit step."""
    pre = small_preset(resample_every=0, iterations=10, tolerance=-1.0, sync_steps=3, sync_iterations=4,
                       sync_strength=0.6)
    coarse = pipe.coarse(3, None, 5, None)
    cams, cond = pipe.conditions(coarse, pre)
    views = pipe.super_resolve(cond, 3, 3, None)

    def sync(renders, strength, steps, hook):
        return pipe.super_resolve(cond, 3, steps, None, init=renders, strength=strength, round_=500, x0_hook=hook)

    seen = []
    res = distill(start_grid(coarse, pipe.hd.decoder, pre.distill), views, cams, pre.distill,
                  torch.Generator().manual_seed(0), callback=lambda i, n, p: seen.append((i, n)), sync=sync)
    assert res.iterations == 10 + (3 + 1) * 4 == len(res.losses)
    assert [i for i, _ in seen] == list(range(1, 27)) and {n for _, n in seen} == {26}
    with torch.no_grad():
        renders = render_grid(res.grid, ExplicitField(), cams, pre.distill.render).rgb.permute(0, 3, 1, 2).clamp(0, 1)
    independent = pipe.super_resolve(cond, 3, 3, None, init=renders, strength=0.6, round_=7)
    synced_gap = float((res.targets - renders).abs().mean())
    independent_gap = float((independent - renders).abs().mean())
    assert synced_gap < 0.7 * independent_gap, f"{synced_gap:.4f} vs {independent_gap:.4f}"


def test_the_pipeline_runs_the_synchronised_phase_and_reproduces(pipe):
    pre = small_preset(resample_every=0, iterations=6, tolerance=-1.0, sync_steps=2, sync_iterations=3)
    a, b = pipe(5, preset=pre), pipe(5, preset=pre)
    assert a.distill_iterations == 6 + 3 * 3
    assert torch.equal(a.distilled.features, b.distilled.features)


def test_sharpness_measures_edges():
    flat = torch.full((1, 3, 16, 16), 0.5)
    stripes = flat.clone()
    stripes[..., ::2] = 1.0
    assert sharpness(flat) == 0.0 and sharpness(stripes) > 0.3


def test_sharpness_splits_into_rim_and_the_rest():
    """A disc on white with a soft edge and stripes inside: the rim part holds the edge's gradient, the rest the
    stripes', and the two add up to the whole."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r = ((xx - 15.5) ** 2 + (yy - 15.5) ** 2).sqrt()
    alpha = (10.0 - r).clamp(0, 1)[None, None]
    inner = torch.full((1, 3, 32, 32), 0.2)
    img = alpha * inner + (1 - alpha)  # a dark disc on white
    rim = rim_mask(alpha)
    assert rim.shape == (1, 31, 31) and bool(rim[0, 15, 5]) and not bool(rim[0, 15, 15]) and not bool(rim[0, 0, 0])
    edge, rest = sharpness_split(img, rim)
    assert edge > 0 and rest == pytest.approx(0.0, abs=1e-7)
    striped = img.clone()
    striped[..., 12:20, 12:20:2] = 0.6  # stripes well inside the disc
    edge2, rest2 = sharpness_split(striped, rim)
    assert edge2 == pytest.approx(edge) and rest2 > 0.01
    assert edge2 + rest2 == pytest.approx(sharpness(striped), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# the pipeline


def test_same_seed_same_object_other_seed_other_object(pipe):
    pre = small_preset()
    a, b = pipe(3, preset=pre), pipe(3, preset=pre)
    assert torch.equal(a.coarse.features, b.coarse.features)
    assert torch.equal(a.views, b.views)
    assert torch.equal(a.distilled.features, b.distilled.features)
    c = pipe(4, preset=pre)
    assert not torch.equal(a.coarse.features, c.coarse.features)
    assert a.views.shape == (4, 3, 16, 16) and a.distilled.features.shape == (1, 4, 16, 16, 16)
    grid, field = a.field()
    assert grid is a.distilled and isinstance(field, ExplicitField)


def test_draft_is_the_coarse_stage_only(pipe):
    out = pipe(3, preset="draft")
    assert out.views is None and out.distilled is None
    grid, decoder = out.field()
    assert grid is out.coarse and decoder is pipe.hd.decoder
    same = pipe.coarse(3, None, PRESETS["draft"].coarse_steps, None)
    assert torch.equal(out.coarse.features, same.features)


def test_the_high_preset_takes_the_folders_larger_factor_model(tiny_models, tmp_path):
    """A folder with superres_high.safetensors (here an untrained 2x larger one): `high` draws its views with it,
    at its size; `standard` keeps superres.safetensors; the folder loads, and one with only the high model is
    refused with a clear message."""
    from holofusion.superres import SuperRes, SuperResConfig
    from holofusion.weights import save_weights

    folder = tmp_path / "pipe4x"
    folder.mkdir()
    for name in ("holodiffusion.safetensors", "superres.safetensors"):
        (folder / name).write_bytes((tiny_models["pipeline"] / name).read_bytes())
    base = HoloFusionPipeline.from_pretrained(str(folder))
    assert base.sr_high is None and base.sr_for(PRESETS["high"]) is base.sr  # no 4x model: high uses superres
    cfg = SuperResConfig.from_dict({**base.sr.config.to_dict(), "high_size": 2 * base.sr.config.high_size})
    torch.manual_seed(0)
    save_weights(folder / "superres_high.safetensors", SuperRes(cfg).state_dict(), "superres", cfg.to_dict(), {})
    pipe4x = HoloFusionPipeline.from_pretrained(str(folder))
    assert pipe4x.sr_for(PRESETS["high"]) is pipe4x.sr_high and pipe4x.sr_for(PRESETS["standard"]) is pipe4x.sr
    small = replace(PRESETS["high"], views=2, sr_steps=2, coarse_steps=3,
                    distill=replace(PRESETS["high"].distill, resolution=12, iterations=3, patches=2, patch_size=8))
    out = pipe4x(3, preset=small)
    assert out.views.shape[-1] == cfg.high_size and out.cameras.image_size == (cfg.high_size, cfg.high_size)
    std = pipe4x(3, preset=replace(small, sr_model="superres"))
    assert std.views.shape[-1] == base.sr.config.high_size
    (folder / "superres.safetensors").unlink()
    with pytest.raises(UserError, match="no superres.safetensors"):
        HoloFusionPipeline.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="sr_model must be"):
        replace(PRESETS["high"], sr_model="superres4x")


@pytest.mark.parametrize("stage", ["coarse", "superres", "distill"])
def test_the_callback_stops_each_stage(pipe, stage):
    seen: list[tuple[str, int, int]] = []

    def callback(s, step, total, preview):
        seen.append((s, step, total))
        return s != stage or step < 2

    with pytest.raises(PipelineCancelled) as e:
        pipe(3, preset=small_preset(), callback=callback)
    assert e.value.stage == stage
    assert seen[-1][0] == stage and seen[-1][1] == 2  # stopped right after the step that said so
    order = ["coarse", "superres", "distill"]
    assert [s for s in order if any(x[0] == s for x in seen)] == order[:order.index(stage) + 1]


def test_the_callback_gets_distillation_previews(pipe):
    previews = []
    pipe(3, preset=small_preset(), callback=lambda s, i, n, p: previews.append(p) if p is not None else None)
    assert previews and all(p.shape == (16, 16, 3) for p in previews)


def test_bad_input(pipe, tiny_models, tmp_path):
    with pytest.raises(UserError, match="preset 'ultra' is unknown"):
        pipe(0, preset="ultra")
    with pytest.raises(UserError, match="category 'donut'"):
        pipe(0, category="donut", preset="draft")
    for seed in (-1, 2**31):
        with pytest.raises(UserError, match=f"seed {seed} is out of range: seeds are whole numbers from 0 to "):
            pipe(seed, preset="draft")
    with pytest.raises(UserError, match="neither a folder nor a shipped model"):
        HoloFusionPipeline.from_pretrained(str(tmp_path / "nothing"))
    only_hd = tmp_path / "only_hd"
    only_hd.mkdir()
    (only_hd / "holodiffusion.safetensors").write_bytes((tiny_models["pipeline"] / "holodiffusion.safetensors")
                                                        .read_bytes())
    draft_only = HoloFusionPipeline.from_pretrained(str(only_hd))
    assert draft_only(1, preset="draft").distilled is None
    with pytest.raises(UserError, match="needs a super-resolution model"):
        draft_only(1, preset="standard")
    with pytest.raises(ValueError, match="patch_size"):
        distill(initial_grid(pipe.coarse(1, None, 3, None), pipe.hd.decoder, 8), torch.rand(1, 3, 8, 8),
                view_cameras(1, 9.0, 2.0, 8), DistillConfig(patch_size=16), torch.Generator().manual_seed(0))
