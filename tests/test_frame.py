"""The object frame (``holofusion.frame``): measuring the frame training objects share, placing generated objects in
it, and ``holofusion calibrate --only frame`` storing it for the pipeline and evaluate to use."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from holofusion.cameras import PerspectiveCamera
from holofusion.cli import main
from holofusion.distill import ExplicitField
from holofusion.errors import UserError
from holofusion.frame import (ObjectFrame, box_centre, cameras_in_frame, frame_of, place_in_frame, spread_of,
                              surface_frame, training_frame)
from holofusion.grid import VoxelGrid
from holofusion.holodiffusion import load_holodiffusion
from holofusion.pipeline import MODELS_DIR, HoloFusionPipeline
from holofusion.weights import read_metadata


def _ball(centre, radius: float, size: int = 48, box: float = 3.0) -> VoxelGrid:
    """An explicit grid (raw density, colour logits) holding a ball: density softplus(20 (radius - |x - centre|)),
    which crosses the level of opacity length 1 (ln 2) exactly on the sphere; colour varies with height."""
    lin = (torch.arange(size) + 0.5) / size * 2 * box - box
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    d = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()
    raw = 20.0 * (radius - d)
    colour = torch.stack([y, -y, 0.5 * x]) * 0.5
    return VoxelGrid(torch.cat([raw[None], colour])[None], (-box,) * 3, (box,) * 3)


def test_the_spread_is_the_root_mean_of_the_per_axis_variances():
    p = torch.tensor([[[1.0, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -2, 0]]])
    # variances per axis: x 0.5, y 2, z 0; their mean 2.5 / 3
    assert spread_of(p)[0].item() == pytest.approx(math.sqrt(2.5 / 3))
    assert spread_of(p + 7.0)[0].item() == pytest.approx(math.sqrt(2.5 / 3))  # the centre does not matter


def test_a_placed_ball_lands_on_the_frame_with_its_field_untouched():
    grid = _ball((0.3, -0.4, 0.2), 1.5)
    centre, spread = surface_frame(grid, ExplicitField(), "softplus", 1.0)
    # a sphere's surface: centred on its centre, per-axis variance r^2 / 3
    assert centre.tolist() == pytest.approx([0.3, -0.4, 0.2], abs=0.01)
    assert spread == pytest.approx(1.5 / math.sqrt(3), rel=0.01)
    frame = ObjectFrame((0.1, 0.0, -0.2), 1.0, scale=True)
    placed = place_in_frame(grid, centre, spread, frame)
    assert placed.features is grid.features  # a change of box: nothing is resampled or copied
    c2, s2 = surface_frame(placed, ExplicitField(), "softplus", 1.0, lattice=80)
    assert c2.tolist() == pytest.approx([0.1, 0.0, -0.2], abs=0.01) and s2 == pytest.approx(1.0, rel=0.01)
    # the box scaled uniformly, about the surface's centre
    k = 1.0 / spread
    assert [b - a for a, b in zip(placed.box_min, placed.box_max)] == pytest.approx([6.0 * k] * 3)
    # centring alone keeps the size
    centred = place_in_frame(grid, centre, spread, ObjectFrame((0.1, 0.0, -0.2), 1.0, scale=False))
    assert [b - a for a, b in zip(centred.box_min, centred.box_max)] == pytest.approx([6.0] * 3)
    c3, s3 = surface_frame(centred, ExplicitField(), "softplus", 1.0, lattice=80)
    assert c3.tolist() == pytest.approx([0.1, 0.0, -0.2], abs=0.01) and s3 == pytest.approx(spread, rel=0.01)


def test_the_box_centre_is_the_midpoint_of_the_quantiles_and_ignores_what_lies_inside():
    # 1,000 points evenly on [0, 1] per axis, then 15 (1.5 %) far out on +x: the 2 % quantiles do not reach them
    lin = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    p = torch.stack([lin, 2 * lin, lin - 3], dim=1)
    assert box_centre(p).tolist() == pytest.approx([0.5, 1.0, -2.5], abs=2e-3)
    far = torch.cat([p, torch.tensor([[9.0, 1.0, -2.5]] * 15, dtype=torch.float64)])
    assert box_centre(far).tolist() == pytest.approx([0.5, 1.0, -2.5], abs=0.02)
    assert far.mean(0)[0].item() > 0.6  # where the centroid went
    # weights count as many points: the lower half weighing 3 times as much moves both quantiles down
    w = torch.where(p[:, 0] < 0.5, 3.0, 1.0).double()
    assert box_centre(p, w)[0].item() == pytest.approx((0.02 * 4 / 6 + (1 - 0.02 * 4 / 2)) / 2, abs=2e-3)


def test_a_hollow_inside_moves_the_centroid_and_not_the_box_centre():
    # a ball of radius 1 with a spherical hollow of radius 0.3 at (0, 0.4, 0): the hollow's wall is surface too,
    # 9 % of the outer area, which pulls the centroid up by 0.09 * 0.4 / 1.09; the extent stays the ball's
    size, box = 64, 1.5
    lin = (torch.arange(size) + 0.5) / size * 2 * box - box
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    outer = 1.0 - (x ** 2 + y ** 2 + z ** 2).sqrt()
    hollow = (x ** 2 + (y - 0.4) ** 2 + z ** 2).sqrt() - 0.3
    raw = 20.0 * torch.minimum(outer, hollow)
    grid = VoxelGrid(torch.cat([raw[None], torch.zeros(3, size, size, size)])[None], (-box,) * 3, (box,) * 3)
    centroid, spread = surface_frame(grid, ExplicitField(), "softplus", 1.0, lattice=96)
    middle, spread2 = surface_frame(grid, ExplicitField(), "softplus", 1.0, lattice=96, rule="box")
    assert centroid[1].item() == pytest.approx(0.09 * 0.4 / 1.09, abs=0.008)
    assert middle.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.01)
    assert spread2 == spread  # the spread is about the centroid whatever the rule
    with pytest.raises(ValueError, match="centre rule"):
        ObjectFrame(rule="median")


def test_an_empty_grid_has_no_frame_to_measure():
    grid = _ball((0.0, 0.0, 0.0), 1.0)
    grid = VoxelGrid(torch.cat([torch.full_like(grid.features[:, :1], -30.0), grid.features[:, 1:]], 1),
                     grid.box_min, grid.box_max)
    assert surface_frame(grid, ExplicitField(), "softplus", 1.0) is None


def test_cameras_moved_with_the_world_see_the_same_image():
    cams = PerspectiveCamera.look_at(torch.tensor([[6.0, -2.0, 5.0], [-4.0, -1.0, 7.0]]), focal_length=2.5,
                                     image_size_hw=(64, 64))
    gen = torch.Generator().manual_seed(0)
    world = torch.randn(20, 3, generator=gen)
    centre, spread = torch.tensor([0.4, -0.3, 0.1], dtype=torch.float64), 1.3
    frame = ObjectFrame((0.2, 0.1, -0.1), 0.9, scale=True)
    moved = torch.tensor(frame.centre) + (world - centre.float()) * (frame.spread / spread)
    before = cams.project(world)
    after = cameras_in_frame(cams, centre, spread, frame).project(moved)
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("bad", [dict(spread=0.0), dict(spread=float("inf")), dict(centre=(0.0, 0.0)),
                                 dict(centre=(0.0, float("nan"), 0.0))])
def test_a_frame_refuses_bad_numbers(bad):
    with pytest.raises(ValueError, match="frame"):
        ObjectFrame(**bad)


def test_the_training_frame_of_procedural_data_is_centred_with_unit_spread(tiny_models):
    model = load_holodiffusion(str(tiny_models["holodiffusion"] / "model.safetensors"))
    rec = training_frame(model, tiny_models["data"], points=2048)
    # the generator normalises each object on a band around its surface; its surface point clouds agree to 1 %
    assert rec["centre"] == pytest.approx([0.0, 0.0, 0.0], abs=0.02)
    assert 0.98 < rec["spread"] < 1.01 and rec["spread_variation"] < 0.01
    assert rec["split"] == "train" and rec["objects"] >= 2
    assert training_frame(model, tiny_models["data"], points=2048) == rec  # drawn from a fixed seed


def _resized_copy(data, dst):
    """A copy of a dataset whose training objects' point clouds are scaled by 1, 1.5, 1, 1.5, ...: objects in their
    own sizes, as unnormalised data hold them."""
    from holofusion.data.co3d import Co3dDataset, read_ply, write_ply

    shutil.copytree(data, dst)
    seqs = Co3dDataset(dst, "apple", subset="fewview_dev", split="train", image_size=None).sequences
    for i, (cat, seq) in enumerate(seqs):
        path = dst / cat / seq / "pointcloud.ply"
        p, c = read_ply(path)
        write_ply(path, p * (1.5 if i % 2 else 1.0), c)
    return dst


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_objects_of_many_sizes_get_no_frame(tiny_models, tmp_path, capsys):
    model_file = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_models["holodiffusion"] / "model.safetensors", model_file)
    data = _resized_copy(tiny_models["data"], tmp_path / "data")
    with pytest.raises(UserError, match=r"spreads vary by \d+\.\d% .*at most 2% counts as one frame"):
        training_frame(load_holodiffusion(str(model_file)), data)
    before = model_file.read_bytes()
    code, _, err = run_cli(capsys, "calibrate", "--model", model_file, "--data", data, "--only", "frame")
    assert code == 2 and "were not normalised to one size" in err and "Traceback" not in err
    assert model_file.read_bytes() == before
    code, _, err = run_cli(capsys, "calibrate", "--model", model_file, "--data", data, "--only", "colour",
                           "--frame-scale")
    assert code == 2 and "--only colour does not measure one" in err
    assert model_file.read_bytes() == before


@pytest.fixture(scope="module")
def apple_with_frame(tmp_path_factory):
    """A copy of the shipped apple folder (draft only: its HoloDiffusion model and guide) without the frame the
    shipped file carries, so that the tests measure one from nothing."""
    from holofusion.weights import load_weights, save_weights

    folder = tmp_path_factory.mktemp("apple_frame") / "apple"
    folder.mkdir()
    for name in ("holodiffusion.safetensors", "guide.safetensors"):
        shutil.copyfile(MODELS_DIR / "apple" / name, folder / name)
    _drop_frame(folder / "holodiffusion.safetensors")
    return folder


def _drop_frame(path) -> None:
    from holofusion.weights import load_weights, save_weights

    state, meta = load_weights(path)
    save_weights(path, state, meta["kind"], meta["config"], {k: v for k, v in meta["info"].items() if k != "frame"})


def test_calibrate_stores_the_frame_and_the_pipeline_places_every_object_in_it(apple_with_frame, tiny_models,
                                                                                capsys, one_thread):
    folder = apple_with_frame
    plain = HoloFusionPipeline.from_pretrained(str(folder))
    assert frame_of(plain.hd) is None
    before = plain(3, preset="draft").field()[0]
    code, out, err = run_cli(capsys, "calibrate", "--model", folder, "--data", tiny_models["data"], "--only", "frame",
                             "--frame-scale")
    assert code == 0, err
    info = read_metadata(folder / "holodiffusion.safetensors")["info"]
    assert "object frame: centre" in out and "centred and scaled to it" in out
    assert info["frame"]["objects"] >= 2 and info["frame"]["scale"] is True
    assert "colour" in info and "surface" in info  # only the frame was measured; the rest is kept
    pipe = HoloFusionPipeline.from_pretrained(str(folder))
    frame = frame_of(pipe.hd)
    assert frame_of(pipe.hd, "custom") == frame  # a record naming no preset places every object
    out1 = pipe(3, preset="draft")
    grid, field = out1.field()
    assert torch.equal(grid.features, before.features)  # the same field, ...
    assert grid.box_min != before.box_min  # ... moved
    centre, spread = surface_frame(grid, field, pipe.hd.config.render.density_activation, pipe.opacity_length(),
                                   lattice=80)  # measured on another lattice than the pipeline's
    assert centre.tolist() == pytest.approx(list(frame.centre), abs=0.04)
    assert spread == pytest.approx(frame.spread, rel=0.02)
    assert pipe(3, preset="draft").field()[0].box_min == grid.box_min  # the same seed lands in the same place
    from holofusion.generate import format_models, list_models

    rows = list_models(folder.parent)
    assert [r["frame"] for r in rows] == [["draft", "standard", "high"]]  # a record naming no preset: every one
    assert "objects placed in the training frame (draft, standard, high)" in format_models(rows)


def test_evaluate_measures_draft_objects_in_the_frame(apple_with_frame, tiny_models, tmp_path, one_thread):
    from holofusion.evaluate import evaluate_model

    folder = apple_with_frame
    assert main(["calibrate", "--model", str(folder), "--data", str(tiny_models["data"]), "--only", "frame"]) == 0
    rec = read_metadata(folder / "holodiffusion.safetensors")["info"]["frame"]
    assert rec["scale"] is False  # the default: centre only
    args = dict(samples=2, steps=4, points=256, progress=False, sheet_objects=2)
    report, _, _ = evaluate_model(str(folder), str(tiny_models["data"]), "apple", out=tmp_path / "a.json", **args)
    assert report["frame"] == rec
    # the same objects unplaced (the frame removed) score differently: the placement reached the measurement
    shutil.copytree(folder, tmp_path / "plain")
    _drop_frame(tmp_path / "plain" / "holodiffusion.safetensors")
    plain, _, _ = evaluate_model(str(tmp_path / "plain"), str(tiny_models["data"]), "apple", out=tmp_path / "b.json",
                                 **args)
    assert plain["frame"] is None
    assert plain["geometry"]["mmd"] != report["geometry"]["mmd"]
    assert np.isfinite(report["geometry"]["mmd"])


def test_a_frame_can_be_kept_to_the_presets_it_helps(apple_with_frame, tiny_models, capsys, one_thread):
    from holofusion.generate import format_models, list_models

    folder = apple_with_frame
    model_file = folder / "holodiffusion.safetensors"
    before = model_file.read_bytes()
    for bad, said in (("standard,fast", "unknown preset 'fast'; choose from draft, standard, high"),
                      (" , ", "no preset named; choose from")):
        code, _, err = run_cli(capsys, "calibrate", "--model", folder, "--data", tiny_models["data"], "--only",
                               "frame", "--frame-presets", bad)
        assert code == 2 and said in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "calibrate", "--model", folder, "--data", tiny_models["data"], "--only", "surface",
                           "--frame-presets", "draft")
    assert code == 2 and "--frame-presets sets how the object frame is used" in err
    assert model_file.read_bytes() == before  # refused before anything was written

    code, out, err = run_cli(capsys, "calibrate", "--model", folder, "--data", tiny_models["data"], "--only", "frame",
                             "--frame-presets", "high,standard,high")
    assert code == 0, err
    assert "centred on it under standard, high" in out
    rec = read_metadata(model_file)["info"]["frame"]
    assert rec["presets"] == ["standard", "high"]  # the presets' own order, once each
    pipe = HoloFusionPipeline.from_pretrained(str(folder))
    assert frame_of(pipe.hd) is not None and frame_of(pipe.hd, "draft") is None
    assert frame_of(pipe.hd, "custom") is None  # a custom preset is none of those named
    assert frame_of(pipe.hd, "standard") == frame_of(pipe.hd)
    plain = pipe.hd.info.pop("frame")
    unplaced = pipe(3, preset="draft").field()[0]
    pipe.hd.info["frame"] = plain
    kept = pipe(3, preset="draft").field()[0]  # draft is not one of the frame's presets: left where it was made
    assert (kept.box_min, kept.box_max) == (unplaced.box_min, unplaced.box_max)
    rows = list_models(folder.parent)
    assert rows[0]["frame"] == ["standard", "high"]
    assert "objects placed in the training frame (standard, high)" in format_models(rows)

    # the centre read off each object's extent instead: its box midpoint lands on the training objects' mean one
    code, _, err = run_cli(capsys, "calibrate", "--model", folder, "--data", tiny_models["data"], "--only", "colour",
                           "--frame-centre", "box")
    assert code == 2 and "--frame-centre sets how the object frame is used" in err
    code, out, err = run_cli(capsys, "calibrate", "--model", folder, "--data", tiny_models["data"], "--only", "frame",
                             "--frame-centre", "box", "--frame-presets", "draft")
    assert code == 0, err
    assert "centred on it by the midpoint of their extent under draft" in out
    rec = read_metadata(model_file)["info"]["frame"]
    assert rec["centre_rule"] == "box" and rec["presets"] == ["draft"]
    pipe = HoloFusionPipeline.from_pretrained(str(folder))
    frame = frame_of(pipe.hd, "draft")
    assert frame.rule == "box"
    grid, field = pipe(3, preset="draft").field()
    middle, _ = surface_frame(grid, field, pipe.hd.config.render.density_activation, pipe.opacity_length(),
                              lattice=80, rule="box")
    assert middle.tolist() == pytest.approx(list(frame.centre), abs=0.04)
