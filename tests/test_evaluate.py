"""Evaluation: surface extraction, Chamfer distances, COV / MMD / 1-NNA / diversity, and the sample / evaluate CLI.

Metric definitions are checked on hand-made point sets with known answers; surface extraction on analytic density
fields; the CLI on a tiny random-weight model saved the way the trainer saves one, and a tiny procedural dataset.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
import shutil

import pytest
import torch
from safetensors.torch import load_file

from holofusion.cli import main
from holofusion.errors import UserError
from holofusion.configs import resolve_config
from holofusion.evaluate import (
    FID_NOTE,
    ColouredPoints,
    ObjectStore,
    SurfaceConfig,
    chamfer_matrix,
    chamfer_pairs,
    colour_weight_for,
    coverage,
    density_lattice,
    density_level,
    fit_opacity_length,
    generative_metrics,
    level_set_points,
    minimum_matching_distance,
    model_file,
    one_nn_accuracy,
    opacity_length_of,
    surface_points,
    turntable_settings,
    weights_digest,
)
from holofusion.grid import VoxelGrid
from holofusion.holodiffusion import HoloDiffusion, HoloDiffusionConfig
from holofusion.nets.decoder import Decoder, DecoderConfig
from holofusion.weights import read_metadata, save_weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The machine is shared with long jobs; these tensors are small enough that one thread costs little.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ helpers
def sphere_sets(radii, colours, n: int = 96, seed: int = 0, centre=(0.0, 0.0, 0.0)) -> ColouredPoints:
    """Point sets on spheres of the given radii, each of one colour: (len(radii), n, 3)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(len(radii), n, 3, generator=g), dim=-1)
    pts = dirs * torch.as_tensor(radii, dtype=torch.float32).view(-1, 1, 1) + torch.tensor(centre)
    cols = torch.as_tensor(colours, dtype=torch.float32).view(-1, 1, 3).expand(-1, n, 3).contiguous()
    return ColouredPoints(pts, cols, torch.zeros(len(radii), dtype=torch.bool))


def metrics_of(samples: ColouredPoints, refs: ColouredPoints, w: float = 1.0) -> dict[str, dict[str, float]]:
    n = len(samples)
    col, geo = chamfer_matrix(ColouredPoints.cat([samples, refs]), None, w)
    return {k: generative_metrics(d[:n, :n], d[n:, n:], d[:n, n:], samples.empty)
            for k, d in (("coloured", col), ("geometry", geo))}


def brute_chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return float(d.min(1).values.mean() + d.min(0).values.mean())


# ------------------------------------------------------------------------------------------------------ distances
def test_chamfer_matrix_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    none = torch.zeros(4, dtype=torch.bool)
    a = ColouredPoints(torch.randn(3, 40, 3, generator=g), torch.rand(3, 40, 3, generator=g), none[:3])
    b = ColouredPoints(torch.randn(4, 31, 3, generator=g), torch.rand(4, 31, 3, generator=g), none)
    w = 0.7
    # A tiny byte budget forces one pair per chunk: the chunking must not change anything.
    col, geo = chamfer_matrix(a, b, w, max_bytes=1)
    for i in range(3):
        for j in range(4):
            assert geo[i, j] == pytest.approx(brute_chamfer(a.points[i], b.points[j]), rel=1e-4, abs=1e-5)
            six_a = torch.cat([a.points[i], w * a.colours[i]], -1)
            six_b = torch.cat([b.points[j], w * b.colours[j]], -1)
            assert col[i, j] == pytest.approx(brute_chamfer(six_a, six_b), rel=1e-4, abs=1e-5)
    # The symmetric form (one set against itself) equals the general form.
    sym_c, sym_g = chamfer_matrix(a, None, w)
    full_c, full_g = chamfer_matrix(a, a, w)
    assert torch.allclose(sym_c, sym_c.T) and torch.all(sym_c.diagonal() == 0)
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.allclose(sym_c[off], full_c[off], atol=1e-5) and torch.allclose(sym_g[off], full_g[off], atol=1e-5)


def test_coloured_distance_separates_colours_geometry_does_not():
    red = sphere_sets([1.5], [(0.9, 0.1, 0.1)], seed=3)
    green = sphere_sets([1.5], [(0.1, 0.8, 0.1)], seed=3)  # the same points, another colour
    c, g = chamfer_pairs(red.points, red.colours, green.points, green.colours, colour_weight=1.5)
    assert float(g) == pytest.approx(0.0, abs=1e-5)
    # Every nearest neighbour is the same point, so each direction adds w^2 |c1 - c2|^2.
    assert float(c) == pytest.approx(2 * 1.5**2 * (0.8**2 + 0.7**2), rel=1e-4)
    # As metrics: red samples against green references of the same shapes.
    radii = [1.0 + 0.5 * i for i in range(6)]  # far apart against the point spacing: twins are nearest
    samples = sphere_sets(radii, [(0.9, 0.1, 0.1)] * 6, seed=4)
    refs = sphere_sets(radii, [(0.1, 0.8, 0.1)] * 6, seed=5)
    m = metrics_of(samples, refs, w=1.5)
    assert m["coloured"]["1nna"] == 1.0  # told apart by colour alone
    assert m["geometry"]["1nna"] <= 0.5  # by shape, each sample sits on its twin reference
    assert m["geometry"]["cov"] == 1.0 and m["coloured"]["mmd"] > 10 * m["geometry"]["mmd"]


def test_colour_weight_balances_shape_and_colour_differences():
    def single(x: float, rgb) -> ColouredPoints:  # sets of 4 copies of one point
        return ColouredPoints(torch.tensor([[[x, 0.0, 0.0]]]).expand(1, 4, 3).contiguous(),
                              torch.tensor([[rgb]], dtype=torch.float32).expand(1, 4, 3).contiguous(),
                              torch.zeros(1, dtype=torch.bool))

    # Shape term 2 * 1^2, colour term 2 * 1^2: w = 1. Twice the distance: w = 2 (world units per unit of RGB).
    assert colour_weight_for(ColouredPoints.cat([single(0, (0, 0, 0)), single(1, (1, 0, 0))])) == pytest.approx(1.0)
    refs = ColouredPoints.cat([single(0, (0, 0, 0)), single(2, (1, 0, 0))])
    w = colour_weight_for(refs)
    assert w == pytest.approx(2.0)
    col, geo = chamfer_matrix(refs, None, w)
    assert float(col[0, 1]) == pytest.approx(2 * float(geo[0, 1]))  # half shape, half colour
    # One colour for all: nothing to balance, the weight falls back to the objects' size.
    same = sphere_sets([1.0, 3.0], [(0.5, 0.5, 0.5)] * 2, centre=(5.0, -2.0, 1.0))
    assert colour_weight_for(same) == pytest.approx(2.0, rel=0.02)  # about the sample centroid, not the centre


# ------------------------------------------------------------------------------------------------------ metrics
def test_identical_sets_cover_everything_at_zero_distance():
    radii = [1.0 + 0.15 * i for i in range(8)]
    cols = [(0.1 * i, 0.5, 1 - 0.1 * i) for i in range(8)]
    refs = sphere_sets(radii, cols, seed=7)
    m = metrics_of(refs, refs)
    for key in ("coloured", "geometry"):
        assert m[key]["cov"] == 1.0
        assert m[key]["mmd"] == pytest.approx(0.0, abs=1e-4)
        # Copies are each other's nearest neighbours, so the classifier is always wrong: memorisation reads 0%.
        assert m[key]["1nna"] == 0.0
        assert m[key]["diversity_ratio"] == pytest.approx(1.0, rel=1e-4)


def test_independent_draws_of_one_distribution_score_near_half():
    g = torch.Generator().manual_seed(11)

    def draw(k: int, seed: int) -> ColouredPoints:
        radii = (1.0 + torch.rand(k, generator=g)).tolist()
        cols = torch.rand(k, 3, generator=g).tolist()
        return sphere_sets(radii, cols, n=48, seed=seed)

    m = metrics_of(draw(40, 1), draw(40, 2), w=1.0)
    for key in ("coloured", "geometry"):
        assert 0.3 <= m[key]["1nna"] <= 0.7
        assert 0.7 <= m[key]["diversity_ratio"] <= 1.4
        assert m[key]["cov"] >= 0.4


def test_far_disjoint_sets_are_always_told_apart():
    radii = [1.0, 1.2, 1.4, 1.6]
    cols = [(0.5, 0.5, 0.5)] * 4
    refs = sphere_sets(radii, cols, seed=1)
    far = sphere_sets(radii, cols, seed=2, centre=(100.0, 0.0, 0.0))
    m = metrics_of(far, refs)
    assert m["geometry"]["1nna"] == 1.0 and m["coloured"]["1nna"] == 1.0
    assert m["geometry"]["mmd"] > 1e4


def test_metric_definitions_on_a_hand_made_matrix():
    # 3 samples x 4 references: samples 0 and 1 both pick reference 2, sample 2 picks reference 0.
    d_sr = torch.tensor([[5.0, 4.0, 1.0, 9.0],
                         [6.0, 7.0, 2.0, 8.0],
                         [0.5, 3.0, 6.0, 7.0]])
    assert coverage(d_sr) == 0.5
    assert minimum_matching_distance(d_sr) == pytest.approx((0.5 + 3.0 + 1.0 + 7.0) / 4)
    d_ss = torch.tensor([[0.0, 0.2, 9.0], [0.2, 0.0, 9.0], [9.0, 9.0, 0.0]])
    d_rr = torch.full((4, 4), 10.0).fill_diagonal_(0.0)
    # NN: s0 -> s1, s1 -> s0 (right), s2 -> r0 (wrong); r0 -> s2 (wrong), r1 -> s2 (wrong), r2 -> s0 (wrong),
    # r3 -> s2 (wrong, 7 < 8 < 10): 2 of 7 right.
    assert one_nn_accuracy(d_ss, d_rr, d_sr) == pytest.approx(2 / 7)


def test_empty_samples_count_as_infinitely_far():
    refs = sphere_sets([1.0, 1.5], [(1, 0, 0), (0, 1, 0)], seed=1)
    good = sphere_sets([0.9], [(1, 0, 0)], seed=9)
    empty = ColouredPoints(torch.zeros(2, 96, 3), torch.zeros(2, 96, 3), torch.ones(2, dtype=torch.bool))
    samples = ColouredPoints.cat([good, empty])
    col, geo = chamfer_matrix(ColouredPoints.cat([samples, refs]), None, 1.0)
    assert math.isinf(geo[1, 3]) and geo[1, 2] == 0.0  # empty vs reference; empty vs empty
    m = metrics_of(samples, refs)["geometry"]
    assert m["cov"] == 0.5  # the good sample covers the nearer reference; empties cover nothing
    assert math.isfinite(m["mmd"])
    # The good sample and the first reference are mutual NNs (both wrong); the empties find each other (right); the
    # second reference's nearest is the first reference (right): 3 of 5.
    assert m["1nna"] == pytest.approx(3 / 5)
    only_empty = metrics_of(empty, refs)["geometry"]
    assert only_empty["cov"] == 0.0 and math.isinf(only_empty["mmd"]) and only_empty["1nna"] == 1.0
    assert math.isnan(only_empty["diversity_ratio"])


# ------------------------------------------------------------------------------------------------------ surfaces
def test_level_set_of_an_analytic_sphere():
    lattice, r0, h = 48, 1.3, 2.0
    ax = torch.linspace(-h, h, lattice)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = torch.sqrt(xx**2 + yy**2 + zz**2)
    sigma = 20.0 * torch.sigmoid((r0 - r) / 0.1)  # crosses 10 at r0
    pts = level_set_points(sigma, (-h,) * 3, (h,) * 3, 10.0, 6000, torch.Generator().manual_seed(0))
    radius = pts.norm(dim=-1)
    step = 2 * h / (lattice - 1)
    assert (radius - r0).abs().max() < 0.25 * step  # linear interpolation along edges of a smooth field
    # Uniform over the area: on a sphere, |n_z| > 1/2 holds on exactly half of the area. Without the 1/|n|_1
    # weights the diagonal directions, which cross more lattice edges, would be over-represented.
    frac = float(((pts[:, 2] / radius).abs() > 0.5).float().mean())
    assert frac == pytest.approx(0.5, abs=0.04)
    assert level_set_points(torch.zeros(8, 8, 8), (-1,) * 3, (1,) * 3, 1.0, 10) is None
    assert level_set_points(torch.ones(8, 8, 8) * 5, (-1,) * 3, (1,) * 3, 1.0, 10) is None  # all inside: no surface


def sphere_decoder(rgb=(0.2, 0.5, 0.8)) -> Decoder:
    """A 1-channel decoder whose raw density is its feature f and whose albedo is ``rgb`` everywhere.

    Trunk: h = (relu(f), relu(-f)), then identity; head: density_raw = h0 - h1 = f, albedo logits constant.
    """
    dec = Decoder(DecoderConfig(n_features_in=1, hidden_dim=2, n_hidden_layers=2, n_harmonics_dir=0))
    with torch.no_grad():
        dec.trunk[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        dec.trunk[0].bias.zero_()
        dec.trunk[1].weight.copy_(torch.eye(2))
        dec.trunk[1].bias.zero_()
        dec.head.weight.zero_()
        dec.head.bias.zero_()
        dec.head.weight[0] = torch.tensor([1.0, -1.0])
        dec.head.bias[1:4] = torch.logit(torch.tensor(rgb))
    return dec


def test_floaters_are_left_out_of_the_measured_surface_as_the_mesh_chain_drops_them():
    dec = sphere_decoder()
    cfg = SurfaceConfig(lattice=40, points=512, opacity_length=0.5)
    raw_level = math.log(math.expm1(density_level(cfg.opacity_length)))
    s, h = 24, 2.0
    grid = VoxelGrid.zeros(1, 1, s, (-h,) * 3, (h,) * 3)
    centres = grid.cell_centers().view(s, s, s, 3)
    body = raw_level + 4.0 * (1.2 - centres.norm(dim=-1))
    speck = raw_level + 4.0 * (0.2 - (centres - torch.tensor([1.7, 1.7, 1.7])).norm(dim=-1))  # a floater
    grid.features[0, 0] = torch.maximum(body, speck)
    gens = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    kept = surface_points(grid, dec, "softplus", replace(cfg, min_component=0.0), gens())
    clean = surface_points(grid, dec, "softplus", cfg, gens())
    assert (kept.points[0].norm(dim=-1) > 1.5).any()  # the floater is measured when kept ...
    assert (clean.points[0].norm(dim=-1) - 1.2).abs().max() < 0.05  # ... and gone by default, the body intact


def test_surface_points_of_a_decoded_sphere():
    dec = sphere_decoder()
    # Length 0.5 (level 2 ln 2): zero features (the box faces) decode to softplus(0) = ln 2, clearly outside.
    cfg = SurfaceConfig(lattice=40, points=512, opacity_length=0.5)
    level = density_level(cfg.opacity_length)
    raw_level = math.log(math.expm1(level))  # softplus^-1: the decoder's raw value at the level
    s, h, r0 = 24, 2.0, 1.2
    grid = VoxelGrid.zeros(2, 1, s, (-h,) * 3, (h,) * 3)
    r = grid.cell_centers().norm(dim=-1).view(s, s, s)
    # A field linear in the radius: it crosses the level exactly at r0, and trilinear interpolation keeps it close.
    grid.features[0, 0] = raw_level + 4.0 * (r0 - r)
    grid.features[1, 0] = -5.0  # nothing anywhere: an empty sample
    out = surface_points(grid, dec, "softplus", cfg, [torch.Generator().manual_seed(i) for i in range(2)])
    assert out.empty.tolist() == [False, True]
    radius = out.points[0].norm(dim=-1)
    assert (radius - r0).abs().max() < 0.05
    assert torch.allclose(out.colours[0], torch.tensor([0.2, 0.5, 0.8]).expand(512, 3), atol=1e-5)
    assert torch.all(out.points[1] == 0)
    # The same generator gives the same points.
    again = surface_points(grid, dec, "softplus", cfg, [torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(again.points, out.points)
    sigma = density_lattice(grid, dec, "softplus", 9)
    assert sigma.shape == (2, 9, 9, 9) and bool((sigma >= 0).all())


# ------------------------------------------------------------------------------------------------------ CLI
def test_fit_opacity_length_finds_the_level_of_the_true_surface():
    """A field whose level sets are spheres, one radius per level: the fitted level is the one whose sphere is the
    true surface, and the distance grows as the level moves away from it; a level with no surface scores inf."""
    dec = sphere_decoder()
    s, h = 24, 2.0
    grid = VoxelGrid.zeros(3, 1, s, (-h,) * 3, (h,) * 3)
    r = grid.cell_centers().norm(dim=-1).view(s, s, s)
    lengths = (0.3, 0.5, 0.8, 1.25)
    # Raw density linear in the radius, reaching the level of length 0.5 at r = 1.0: softplus^-1(ln 2 / l) - 2 (r - 1).
    grid.features[:, 0] = math.log(math.expm1(density_level(0.5))) - 2.0 * (r - 1.0)
    truth = torch.randn(3, 800, 3, generator=torch.Generator().manual_seed(0))
    truth = truth / truth.norm(dim=-1, keepdim=True)  # points on the unit sphere
    cfg = SurfaceConfig(lattice=40, points=800)
    best, scores = fit_opacity_length(grid, dec, truth, lengths=lengths, config=cfg)
    assert best == 0.5
    # 0.01 is the floor of two independent 800-point draws of one sphere; the neighbours' spheres are 0.2-0.3 off.
    assert scores[0.5] < 0.02 and 20 * scores[0.5] < min(scores[0.3], scores[0.8]) and scores[0.8] < scores[1.25]
    grid.features[0, 0] = -20.0  # one object with no surface anywhere: the median still finds the level
    assert fit_opacity_length(grid, dec, truth, lengths=lengths, config=cfg)[0] == 0.5
    grid.features[1, 0] = -20.0  # most of them empty: no level fits
    assert all(math.isinf(v) for v in fit_opacity_length(grid, dec, truth, lengths=lengths, config=cfg)[1].values())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from holofusion.data.synth import synthesize

    root = tmp_path_factory.mktemp("eval") / "data"
    # 6 sequences: the procedural split then holds one test and one val object.
    synthesize("apple", sequences=6, views=2, size=16, out=root, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A random-weight tiny model saved as the trainer saves one (run folder with model + checkpoint)."""
    cfg = resolve_config("tiny", ["apple", "donut"])
    config = HoloDiffusionConfig.from_dict(cfg["model"])
    model = HoloDiffusion(config)
    with torch.no_grad():
        # Raw density near 0 where the features are small: random features then cross the default level (ln 2
        # per unit = softplus(0)), so samples have surfaces; the default bias -3 would leave every sample empty.
        model.decoder.head.bias[0] = 0.0
    run = tmp_path_factory.mktemp("eval") / "run"
    run.mkdir()
    info = {"step": 0, "categories": config.categories}
    save_weights(run / "model.safetensors", model.state_dict(), "holodiffusion", config.to_dict(), info)
    cfg["train"]["view_distance"] = 10.0
    save_weights(run / "checkpoint.safetensors", {"x": torch.zeros(1)}, "holodiffusion-checkpoint", cfg, info)
    return run


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_turntable_settings_come_from_the_run(run_dir, tmp_path):
    assert turntable_settings(run_dir) == (10.0, 2.0, 20.0)
    assert turntable_settings(run_dir / "model.safetensors") == (10.0, 2.0, 20.0)
    lone = tmp_path / "m.safetensors"
    shutil.copy(run_dir / "model.safetensors", lone)
    assert turntable_settings(lone) == (9.0, 2.0, 20.0)  # the trainer's defaults


def test_model_file_takes_a_file_a_run_folder_a_model_folder_or_a_shipped_name(run_dir, tmp_path):
    from holofusion.pipeline import MODELS_DIR

    assert model_file(run_dir) == run_dir  # a run folder: load_holodiffusion reads its model.safetensors
    assert model_file(run_dir / "model.safetensors") == run_dir / "model.safetensors"
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(run_dir / "model.safetensors", folder / "holodiffusion.safetensors")
    assert model_file(folder) == folder / "holodiffusion.safetensors"
    assert model_file("apple") == MODELS_DIR / "apple" / "holodiffusion.safetensors"
    with pytest.raises(UserError, match="does not exist .*shipped model's name: apple"):
        model_file("no-such-model")
    with pytest.raises(UserError, match="not a .safetensors file"):
        model_file(__file__)  # exists, but is not weights


def test_sample_cli_writes_grids_and_turntables_deterministically(run_dir, tmp_path, capsys):
    args = ["sample", "--model", run_dir, "--category", "donut", "--steps", "2", "--views", "2", "--size", "16"]
    code, out, _ = run_cli(capsys, *args, "--seed", "5", "--count", "2", "--out", tmp_path / "a")
    assert code == 0
    for seed in (5, 6):
        for ext in ("safetensors", "png"):
            path = tmp_path / "a" / f"donut_{seed}.{ext}"
            assert path.is_file() and str(path) in out
    code, _, _ = run_cli(capsys, *args, "--seed", "6", "--out", tmp_path / "b")
    assert code == 0
    a, b = tmp_path / "a" / "donut_6.safetensors", tmp_path / "b" / "donut_6.safetensors"
    # Same seed, same grid bytes, whatever --count was. (Whole files may differ in the order of the metadata keys:
    # safetensors keeps them in a hash map.)
    tensors = load_file(str(a))
    for name, t in load_file(str(b)).items():
        assert t.numpy().tobytes() == tensors[name].numpy().tobytes()
    assert read_metadata(a) == read_metadata(b)
    assert tensors["latent"].shape == (8, 8, 8, 8) and tensors["features"].shape == (8, 8, 8, 8)
    assert not torch.equal(tensors["latent"], load_file(str(tmp_path / "a" / "donut_5.safetensors"))["latent"])
    meta = read_metadata(a)
    assert meta["kind"] == "holodiffusion-sample"
    info = meta["info"]
    assert (info["seed"], info["steps"], info["sampler"], info["category"]) == (6, 2, "dpm++", "donut")
    assert info["box_min"] == [-3.5] * 3 and info["box_max"] == [3.5] * 3 and info["model"] == str(run_dir.resolve())
    assert not (tmp_path / "a" / "donut_sheet.png").exists()  # only when asked for


def test_sample_cli_sheet_puts_every_seed_in_one_picture(run_dir, tmp_path, capsys):
    from PIL import Image

    args = ["sample", "--model", run_dir, "--category", "donut", "--steps", "2", "--views", "2", "--size", "16"]
    code, out, _ = run_cli(capsys, *args, "--count", "5", "--sheet", "--out", tmp_path / "s")
    sheet = tmp_path / "s" / "donut_sheet.png"
    assert code == 0 and sheet.is_file() and str(sheet) in out
    # four seeds to a row (each 2 views of 16 px and a 4 px gap), two rows under a 16 px title
    assert Image.open(sheet).size == (4 * (2 * 16 + 4) + 4, 16 + 2 * (16 + 4) + 4)


def test_evaluate_cli_writes_all_metrics(run_dir, dataset, tmp_path, capsys):
    out = tmp_path / "m" / "eval.json"
    code, text, _ = run_cli(capsys, "evaluate", "--model", run_dir, "--data", dataset, "--category", "apple",
                            "--samples", "3", "--steps", "2", "--points", "64", "--lattice", "16", "--out", out)
    assert code == 0, text
    report = json.loads(out.read_text())
    for key in ("model", "data", "category", "reference_split", "references", "samples", "points", "empty_samples",
                "colour_weight", "coloured", "geometry", "diversity_ratio", "diversity_ratio_geometry", "fid", "kid",
                "fid_note", "notes", "surface"):
        assert key in report, key
    for kind in ("coloured", "geometry"):
        assert set(report[kind]) == {"cov", "mmd", "1nna", "diversity_ratio", "sample_pairwise",
                                     "reference_pairwise"}
    assert report["fid"] is None and report["fid_note"] == FID_NOTE
    assert report["reference_split"] == "test" and report["references"] == 1 and report["samples"] == 3
    assert report["empty_samples"] < 3 and report["geometry"]["mmd"] > 0  # the fixture's samples have surfaces
    assert (tmp_path / "m" / "eval_samples.png").is_file()
    assert "1-NNA" in text and "COV" in text
    # Deterministic for a given seed.
    run_cli(capsys, "evaluate", "--model", run_dir, "--data", dataset, "--category", "apple", "--samples", "3",
            "--steps", "2", "--points", "64", "--lattice", "16", "--out", tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["coloured"] == report["coloured"] and again["geometry"] == report["geometry"]


def test_evaluate_falls_back_to_val_with_a_note(run_dir, dataset, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    lists = root / "apple" / "set_lists" / "set_lists_fewview_dev.json"
    split = json.loads(lists.read_text())
    split["train"] += split["test"]  # no test objects left; val stays
    split["test"] = []
    lists.write_text(json.dumps(split))
    code, text, _ = run_cli(capsys, "evaluate", "--model", run_dir / "model.safetensors", "--data", root,
                            "--category", "apple", "--samples", "2", "--steps", "1", "--points", "32", "--lattice",
                            "8", "--out", tmp_path / "e.json")
    assert code == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["reference_split"] == "val" and any("val split" in n for n in report["notes"])
    assert "val split" in text


def test_calibrate_cli_measures_the_shipped_model_and_evaluate_uses_its_level(tmp_path, capsys):
    """The shipped apple model on a few freshly made training apples: its surface level is found where the
    reconstructions' surfaces meet the true ones (not at the uncalibrated 1.0, which puts them 9 % out), stored in
    the file, and taken by evaluate unless --opacity-length is given."""
    from holofusion.data.synth import synthesize
    from holofusion.pipeline import MODELS_DIR

    data = tmp_path / "data"
    synthesize("apple", sequences=10, views=8, size=64, out=data, workers=1, progress=False)
    model = tmp_path / "model.safetensors"
    shutil.copyfile(MODELS_DIR / "apple" / "holodiffusion.safetensors", model)
    code, out, err = run_cli(capsys, "calibrate", "--model", model, "--data", data, "--objects", "4")
    assert code == 0, err
    surface = read_metadata(model)["info"]["surface"]
    assert surface["split"] == "train" and surface["objects"] == 4
    chamfer = {float(k): v for k, v in surface["chamfer"].items()}  # {length: median distance}: the smallest is kept
    assert min(chamfer, key=lambda k: (chamfer[k], k)) == surface["opacity_length"]
    assert 0.3 <= surface["opacity_length"] <= 0.8 and chamfer[surface["opacity_length"]] < chamfer[1.0]
    assert f"opacity length {surface['opacity_length']:g}" in out
    report = tmp_path / "e.json"
    args = ["evaluate", "--model", model, "--data", data, "--samples", "1", "--steps", "1", "--points", "32",
            "--lattice", "8", "--out", report]
    assert run_cli(capsys, *args)[0] == 0
    assert json.loads(report.read_text())["surface"]["opacity_length"] == surface["opacity_length"]
    assert run_cli(capsys, *args, "--opacity-length", "3")[0] == 0
    assert json.loads(report.read_text())["surface"]["opacity_length"] == 3.0  # given: it wins


def test_calibrate_refuses_a_model_without_surfaces_and_leaves_it_alone(run_dir, tmp_path, capsys):
    from holofusion.data.synth import synthesize

    data = tmp_path / "data"
    synthesize("all", sequences=8, views=3, size=16, out=data, workers=1, progress=False)  # the model's categories
    state = load_file(run_dir / "model.safetensors")
    state["decoder.head.weight"][0] = 0.0
    state["decoder.head.bias"][0] = -10.0  # density softplus(-10) everywhere: nothing is ever opaque
    meta = read_metadata(run_dir / "model.safetensors")
    model = tmp_path / "dead.safetensors"
    save_weights(model, state, "holodiffusion", meta["config"], {**meta["info"], "image_size": 16, "n_source": 3})
    before = model.read_bytes()
    code, out, err = run_cli(capsys, "calibrate", "--model", model, "--data", data, "--objects", "3")
    assert code == 2
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("holofusion: error:") and "surface" in last, err
    assert model.read_bytes() == before


@pytest.mark.parametrize("case", ["data-category", "text-model", "model-category", "inception", "not-safetensors"])
def test_bad_inputs_exit_2_with_one_line(case, run_dir, dataset, tmp_path, capsys):
    model = run_dir
    category = "apple"
    extra: list = []
    if case == "data-category":
        category = "donut"  # the model knows it; the data has only apple
    elif case == "text-model":
        model = tmp_path / "fake.safetensors"
        model.write_text("this is not a weights file\n")
    elif case == "not-safetensors":
        model = tmp_path / "model.pt"
        model.write_bytes(b"\x80\x04")
    elif case == "model-category":
        category = "hydrant"
    elif case == "inception":
        weights = tmp_path / "inception.safetensors"
        weights.write_bytes(b"")
        extra = ["--inception", weights]
    code, out, err = run_cli(capsys, "evaluate", "--model", model, "--data", dataset, "--category", category,
                             "--samples", "2", "--steps", "1", *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("holofusion: error:"), err
    if case == "inception":
        assert "not supported in this version" in lines[0]
    if case in ("model-category", "text-model"):
        code, _, err = run_cli(capsys, "sample", "--model", model, "--category", category, "--out", tmp_path / "s")
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "s").exists()


def test_evaluate_a_preset_measures_the_distilled_objects(tiny_models, tmp_path, capsys, one_thread, monkeypatch):
    """--preset standard runs the whole pipeline per seed and measures the surface of the distilled grid (what a
    user's mesh is cut from), not the coarse sample; a folder without a super-resolution model is refused."""
    from holofusion.distill import DistillConfig
    from holofusion.evaluate import SurfaceConfig, opacity_length_of, reference_points, surface_points
    from holofusion.pipeline import PRESETS, HoloFusionPipeline, Preset

    # All three stages under the standard preset's name, with fewer views, steps and iterations (the full preset
    # takes a minute per object here; it runs on the shipped models in test_generate, the demo and the benchmark).
    fit = DistillConfig(resolution=32, iterations=100, resample_every=0, tv_weight=0.01, colour_init="views")
    monkeypatch.setitem(PRESETS, "standard", Preset(views=4, sr_steps=3, distill=fit))

    # The folder's standard preset has a colour map (holofusion calibrate): what users get, so what is measured.
    from holofusion.colour import ColourMap
    from holofusion.superres import load_superres
    from holofusion.weights import read_metadata, save_weights

    pipe_dir, data = tmp_path / "pipe", tiny_models["data"]
    shutil.copytree(tiny_models["pipeline"], pipe_dir)
    hd_file, cmap = pipe_dir / "holodiffusion.safetensors", ColourMap((1.3, 0.8, 1.1), (0.4, -0.3, 0.2))
    meta, sr = read_metadata(hd_file), load_superres(str(pipe_dir / "superres.safetensors"))[0]
    colour = {"standard": {**cmap.to_record(), "superres": weights_digest(sr)}}
    save_weights(hd_file, load_file(hd_file), meta["kind"], meta["config"], {**meta["info"], "colour": colour})
    args = ["--data", data, "--samples", "1", "--seed", "3", "--points", "64", "--lattice", "16"]
    code, text, _ = run_cli(capsys, "evaluate", "--model", pipe_dir, "--preset", "standard", *args,
                            "--out", tmp_path / "std.json")
    assert code == 0, text
    std = json.loads((tmp_path / "std.json").read_text())
    assert std["preset"] == "standard" and std["steps"] == 25 and "standard preset" in text
    assert std["references"] == 1 and (tmp_path / "std_samples.png").is_file()
    assert std["objects_reused"] == 0 and (tmp_path / "std.objects" / "seed_0000000003.pt").is_file()
    # The same command again (as after an interruption): the measured object is taken from std.objects/, not made
    # again, and the metrics are the same to the last digit.
    code, text, _ = run_cli(capsys, "evaluate", "--model", pipe_dir, "--preset", "standard", *args,
                            "--out", tmp_path / "std.json")
    again = json.loads((tmp_path / "std.json").read_text())
    assert code == 0 and again["objects_reused"] == 1 and "measured by an earlier run" in text
    assert again["coloured"] == std["coloured"] and again["geometry"] == std["geometry"]

    # The distilled surface of seed 3, extracted by hand: its Chamfer distance to the one reference is the MMD.
    pipe = HoloFusionPipeline.from_pretrained(str(pipe_dir))
    cfg = SurfaceConfig(lattice=16, points=64, opacity_length=opacity_length_of(pipe.hd))
    mine = surface_points(*pipe(3, None, "standard").field(), "softplus", cfg, [torch.Generator().manual_seed(3)])
    refs = reference_points(data, "apple", 64)[0]
    d = torch.cdist(mine.points[0], refs.points[0]).pow(2)
    assert std["geometry"]["mmd"] == pytest.approx(float(d.min(1).values.mean() + d.min(0).values.mean()), rel=1e-4)
    # ... and on (x, y, z, w r, w g, w b), its coloured one: the measured colours are the calibrated ones
    assert std["colour_map"] == cmap.to_record()
    w = std["colour_weight"]
    d = torch.cdist(torch.cat([mine.points[0], w * mine.colours[0]], 1),
                    torch.cat([refs.points[0], w * refs.colours[0]], 1)).pow(2)
    assert std["coloured"]["mmd"] == pytest.approx(float(d.min(1).values.mean() + d.min(0).values.mean()), rel=1e-4)
    code, _, _ = run_cli(capsys, "evaluate", "--model", pipe_dir / "holodiffusion.safetensors", *args,
                         "--out", tmp_path / "draft.json")
    draft = json.loads((tmp_path / "draft.json").read_text())
    assert code == 0 and draft["preset"] == "draft" and draft["geometry"]["mmd"] != std["geometry"]["mmd"]

    alone = tmp_path / "coarse_only"
    alone.mkdir()
    shutil.copy(pipe_dir / "holodiffusion.safetensors", alone)
    code, _, err = run_cli(capsys, "evaluate", "--model", alone, "--preset", "standard", *args)
    assert code == 2 and "superres.safetensors" in err and "--preset draft" in err


def test_object_store_keeps_objects_under_one_key_only(tmp_path):
    """Objects stored under a key come back whole; a store opened under another key (other weights, preset or
    surface settings) starts empty instead of mixing objects of two configurations; a half-written file is none."""
    folder = tmp_path / "e.objects"
    pts = ColouredPoints(torch.rand(1, 8, 3), torch.rand(1, 8, 3), torch.tensor([False]))
    strip = torch.rand(3, 8, 32)
    store = ObjectStore(folder, {"weights": "a", "preset": "standard"})
    assert store.get(4) is None
    store.put(4, pts, strip)
    again = ObjectStore(folder, {"weights": "a", "preset": "standard"})
    got, got_strip = again.get(4)
    assert torch.equal(got.points, pts.points) and torch.equal(got.colours, pts.colours)
    assert torch.equal(got.empty, pts.empty) and torch.equal(got_strip, strip) and again.kept == 1
    assert not list(folder.glob(".*partial"))
    other = ObjectStore(folder, {"weights": "b", "preset": "standard"})
    assert other.get(4) is None and not list(folder.glob("seed_*.pt"))
    (folder / "seed_0000000005.pt").write_bytes(b"PK\x03\x04 cut short")
    assert other.get(5) is None and other.kept == 0


def test_weights_digest_names_the_networks_not_the_file(tmp_path):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a, None) == weights_digest(b)
    with torch.no_grad():
        b.bias[1] += 1e-6
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a, b) != weights_digest(b, a)
