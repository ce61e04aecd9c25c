"""Colour calibration (``holofusion.colour``): the map, its fit, folding it into fields, and ``holofusion calibrate``
measuring it on training objects for the pipeline to apply."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from holofusion.cli import main
from holofusion.colour import ColourMap, colour_map_of, fit_colour_map, map_decoder, map_explicit_grid
from holofusion.distill import ExplicitField
from holofusion.grid import VoxelGrid
from holofusion.holodiffusion import load_holodiffusion
from holofusion.pipeline import MODELS_DIR, HoloFusionPipeline
from holofusion.weights import read_metadata, save_weights

# cm.apply clamps colours to [1/512, 1 - 1/512] before their logit; a folded map does not, so they differ by that much
CLAMP_TOLERANCE = 2e-3


def test_a_map_acts_on_each_channels_logit():
    cm = ColourMap((2.0, 1.0, 0.5), (0.0, 1.0, 0.0))
    rgb = torch.tensor([[0.5, 0.5, 0.8]])
    out = cm.apply(rgb)[0]
    assert out[0] == pytest.approx(0.5)  # logit 0 stays 0 under any scale
    assert out[1] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())  # logit 0 + 1
    assert out[2] == pytest.approx(torch.sigmoid(0.5 * torch.logit(torch.tensor(0.8))).item(), abs=1e-6)
    assert ColourMap().is_identity and not cm.is_identity
    assert ColourMap.from_record(cm.to_record()) == cm


@pytest.mark.parametrize("bad", [dict(scale=(1.0, 0.0, 1.0)), dict(scale=(1.0, 1.0)),
                                 dict(shift=(0.0, float("nan"), 0.0))])
def test_a_map_refuses_bad_numbers(bad):
    with pytest.raises(ValueError, match="colour map"):
        ColourMap(**bad)


def test_a_record_that_is_not_a_map_says_so():
    with pytest.raises(ValueError, match="not a colour map record"):
        ColourMap.from_record({"scale": [1, 1, 1]})


def test_the_fit_recovers_a_known_map_and_bounds_the_scale():
    gen = torch.Generator().manual_seed(0)
    made = torch.rand(20000, 3, generator=gen) * 0.9 + 0.05
    known = ColourMap((1.3, 0.8, 1.0), (-0.4, 0.2, 0.5))
    fitted = fit_colour_map(made, known.apply(made))
    assert fitted.scale == pytest.approx(known.scale, abs=0.02)
    assert fitted.shift == pytest.approx(known.shift, abs=0.02)
    # a true distribution ten times wider in logit than the made one: the scale stops at its bound
    wide = ColourMap((10.0, 10.0, 10.0), (0.0, 0.0, 0.0)).apply(made)
    assert max(fit_colour_map(made, wide).scale) == 2.0
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        fit_colour_map(made[:, :2], made)


def test_folding_a_map_into_the_decoder_maps_every_view_and_leaves_the_rest():
    model = load_holodiffusion(str(MODELS_DIR / "apple" / "holodiffusion.safetensors"))
    decoder = model.decoder
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    cm = ColourMap((1.2, 0.9, 1.1), (-0.3, 0.1, 0.2))
    mapped = map_decoder(decoder, cm)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(400, decoder.config.n_features_in, generator=gen)
    dirs = torch.nn.functional.normalize(torch.randn(400, 3, generator=gen), dim=-1)
    with torch.no_grad():
        raw, new = decoder(feats, dirs), mapped(feats, dirs)
        assert (cm.apply(raw.rgb) - new.rgb).abs().max() < CLAMP_TOLERANCE
        assert (cm.apply(decoder.mean_colour(feats)) - mapped.mean_colour(feats)).abs().max() > 0  # a mean of maps
        assert (cm.apply(decoder(feats, None).rgb) - mapped(feats, None).rgb).abs().max() < CLAMP_TOLERANCE
        assert torch.equal(raw.density_raw, new.density_raw) and torch.equal(raw.features, new.features)
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())  # the original is untouched


def test_folding_a_map_into_a_distilled_grid():
    gen = torch.Generator().manual_seed(2)
    grid = VoxelGrid(torch.randn(1, 4, 6, 6, 6, generator=gen))  # colours within [0.03, 0.97], clear of the clamp
    cm = ColourMap((0.7, 1.5, 1.0), (0.3, -0.2, 0.0))
    mapped = map_explicit_grid(grid, cm)
    field = ExplicitField()
    x = torch.rand(1, 100, 3, generator=gen) * 2 - 1
    raw, new = field(grid.sample(x)), field(mapped.sample(x))
    assert torch.equal(raw.density_raw, new.density_raw)
    # trilinear interpolation of mapped logits is the map of interpolated logits (the map is affine in the logit)
    assert (cm.apply(raw.rgb) - new.rgb).abs().max() < CLAMP_TOLERANCE
    assert grid.features[:, 1:].abs().max() > 0 and not torch.equal(grid.features, mapped.features)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def apple_training(tmp_path_factory):
    """The shipped apple pipeline and 4 of its kind of training objects, freshly made and encoded."""
    from holofusion.data.synth import synthesize
    from holofusion.evaluate import training_reconstructions

    data = synthesize("apple", sequences=6, views=8, size=64, out=tmp_path_factory.mktemp("apples") / "data",
                      workers=1, progress=False)
    pipe = HoloFusionPipeline.from_pretrained("apple")
    return pipe, data, training_reconstructions(pipe.hd, data, objects=4, points=512, progress=False)


def test_the_draft_map_measured_on_training_apples_cuts_their_colour_error(apple_training):
    from holofusion.colour import calibrate_colour

    pipe, _, (z, _, colours) = apple_training
    r = calibrate_colour(pipe, z, colours, ["draft"], points=512, progress=False)["draft"]
    assert r["objects"] == 4 and "superres" not in r
    # the coarse colours are brighter than the true ones (the white the training images blend in) ...
    assert sum(r["error_before"]) > 0
    # ... and the map carries their distribution onto the true one: the mean error shrinks
    assert sum(abs(v) for v in r["error_after"]) < sum(abs(v) for v in r["error_before"])


def test_a_super_resolved_presets_map_is_measured_through_its_stages(apple_training):
    from holofusion.colour import calibrate_colour
    from holofusion.distill import DistillConfig
    from holofusion.evaluate import weights_digest
    from holofusion.pipeline import Preset

    pipe, _, (z, _, colours) = apple_training
    quick = Preset(views=2, sr_steps=2, distill=DistillConfig(iterations=4, patches=2, resample_every=0))
    r = calibrate_colour(pipe, z[:2], colours[:2], {"quick": quick}, points=512, progress=False)["quick"]
    assert r["objects"] == 2 and r["superres"] == weights_digest(pipe.sr)
    assert sum(abs(v) for v in r["error_after"]) < sum(abs(v) for v in r["error_before"])


def test_calibrate_stores_the_maps_and_keeps_the_surface_with_only_colour(apple_training, tmp_path, capsys):
    _, data, _ = apple_training
    model = tmp_path / "model.safetensors"
    shutil.copyfile(MODELS_DIR / "apple" / "holodiffusion.safetensors", model)
    before = read_metadata(model)["info"]
    code, out, err = run_cli(capsys, "calibrate", "--model", model, "--data", data, "--objects", "3",
                             "--only", "colour", "--source", "reconstructions")
    assert code == 0, err
    info = read_metadata(model)["info"]
    # a model file alone: no super-resolution model to measure standard with, so the shipped standard map is kept
    assert set(info["colour"]) == {"draft", "standard"} and info["colour"]["standard"] == before["colour"]["standard"]
    record = info["colour"]["draft"]
    assert record["objects"] == 3 and record["source"] == "reconstructions"
    assert "colour of draft (reconstructions): logit scale" in out
    assert info["surface"] == before["surface"] and "surface level" not in out
    assert colour_map_of(load_holodiffusion(str(model)), "draft") == ColourMap.from_record(record)


def test_training_colours_are_read_off_the_training_clouds_alone(apple_training):
    from holofusion.colour import training_colours
    from holofusion.data.co3d import Co3dDataset

    pipe, data, _ = apple_training
    every = training_colours(pipe.hd, data, points=256)
    trained_on = Co3dDataset(data, "apple", subset="fewview_dev", split="train", image_size=None).sequences
    assert every.shape == (len(trained_on), 256, 3) and 0 <= every.min() and every.max() <= 1
    assert training_colours(pipe.hd, data, objects=2, points=256).shape == (2, 256, 3)
    assert torch.equal(training_colours(pipe.hd, data, points=256), every)  # drawn from a fixed seed


def test_the_draft_map_measured_on_samples_matches_them_to_the_training_colours(apple_training):
    from holofusion.colour import calibrate_colour_on_samples, training_colours

    pipe, data, _ = apple_training
    truth = training_colours(pipe.hd, data, points=512)
    r = calibrate_colour_on_samples(pipe, range(10000, 10003), truth, ["draft"], points=512,
                                    progress=False)["draft"]
    assert r["source"] == "samples" and r["seeds"] == [10000, 10002] and r["references"] == len(truth)
    assert r["objects"] == 3 and "superres" not in r
    # a few samples and training apples differ in mean colour by chance as much as by the model's bias (apples are
    # red, yellow or green); whichever way, the map carries the samples' distribution onto the training objects'
    assert sum(abs(v) for v in r["error_before"]) > 0.05
    assert sum(abs(v) for v in r["error_after"]) < 0.5 * sum(abs(v) for v in r["error_before"])


def test_calibrate_measures_colours_on_samples_by_default(apple_training, tmp_path, capsys):
    _, data, _ = apple_training
    model = tmp_path / "model.safetensors"
    shutil.copyfile(MODELS_DIR / "apple" / "holodiffusion.safetensors", model)
    code, out, err = run_cli(capsys, "calibrate", "--model", model, "--data", data, "--only", "colour",
                             "--samples", "2", "--seed", "20000")
    assert code == 0, err
    record = read_metadata(model)["info"]["colour"]["draft"]
    assert record["source"] == "samples" and record["seeds"] == [20000, 20001] and record["objects"] == 2
    assert "colour of draft (samples): logit scale" in out
    before = model.read_bytes()
    code, _, err = run_cli(capsys, "calibrate", "--model", model, "--data", data, "--only", "colour",
                           "--seed", "-1")
    assert code == 2 and "--seed -1 with --samples 64: seeds are whole numbers from 0" in err
    assert model.read_bytes() == before


def _with_maps(folder, draft: ColourMap, standard: ColourMap) -> None:
    """Writes colour maps into a pipeline folder's HoloDiffusion file as ``holofusion calibrate`` stores them."""
    from holofusion.evaluate import weights_digest
    from holofusion.superres import load_superres

    path = folder / "holodiffusion.safetensors"
    meta = read_metadata(path)
    sr = load_superres(str(folder / "superres.safetensors"))[0]
    colour = {"draft": draft.to_record(), "standard": {**standard.to_record(), "superres": weights_digest(sr)}}
    save_weights(path, load_file(path), meta["kind"], meta["config"], {**meta["info"], "colour": colour})


def test_the_pipeline_applies_each_presets_map(tiny_models, tmp_path, monkeypatch):
    from holofusion.distill import DistillConfig
    from holofusion.pipeline import PRESETS, Preset

    # the standard preset's name with a few views and steps: the map goes by the preset's name
    monkeypatch.setitem(PRESETS, "standard", Preset(views=2, sr_steps=2, distill=DistillConfig(iterations=4,
                                                                                            patches=2)))
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_models["pipeline"], folder)
    draft_map, standard_map = ColourMap((1.2, 0.8, 1.0), (-0.5, 0.3, 0.1)), ColourMap((0.9, 1.1, 1.3), (0.2, -0.4, 0.0))
    _with_maps(folder, draft_map, standard_map)
    raw_pipe = HoloFusionPipeline.from_pretrained(str(tiny_models["pipeline"]))
    pipe = HoloFusionPipeline.from_pretrained(str(folder))
    feats = torch.randn(64, pipe.hd.decoder.config.n_features_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grid, decoder = pipe(3, preset="draft").field()
        raw_grid, raw_decoder = raw_pipe(3, preset="draft").field()
        assert torch.equal(grid.features, raw_grid.features) and raw_decoder is raw_pipe.hd.decoder
        assert (draft_map.apply(raw_decoder(feats, None).rgb) - decoder(feats, None).rgb).abs().max() < CLAMP_TOLERANCE
    out, raw = pipe(3, preset="standard"), raw_pipe(3, preset="standard")  # (distillation needs gradients)
    assert torch.equal(out.views, raw.views)  # the stages read the colours their models were trained on
    assert torch.equal(out.distilled.features, map_explicit_grid(raw.distilled, standard_map).features)
    assert out.coarse_decoder is pipe.coarse_decoder()  # the coarse stage is shown in the draft map's colours


def test_a_standard_map_is_not_applied_with_another_super_resolution_model(tiny_models, tmp_path):
    from holofusion.pipeline import PRESETS

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_models["pipeline"], folder)
    _with_maps(folder, ColourMap((1.1, 1.1, 1.1), (0.1, 0.1, 0.1)), ColourMap((0.9, 0.9, 0.9), (0.2, 0.2, 0.2)))
    assert HoloFusionPipeline.from_pretrained(str(folder)).colour_map("standard", PRESETS["standard"]) is not None
    path = folder / "superres.safetensors"
    state, meta = load_file(path), read_metadata(path)
    name = next(iter(state))
    state[name] = state[name] + 1e-3  # a retrained super-resolution model
    save_weights(path, state, meta["kind"], meta["config"], meta["info"])
    pipe = HoloFusionPipeline.from_pretrained(str(folder))
    assert pipe.colour_map("standard", PRESETS["standard"]) is None
    assert pipe.colour_map("draft", PRESETS["draft"]) is not None


@pytest.mark.parametrize("case", ["unknown-preset", "needs-superres"])
def test_calibrate_refuses_presets_it_cannot_measure(case, tiny_models, tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_models["holodiffusion"] / "model.safetensors", model)
    before = model.read_bytes()
    presets = "draft,fancy" if case == "unknown-preset" else "draft,standard"
    code, _, err = run_cli(capsys, "calibrate", "--model", model, "--data", tiny_models["data"], "--objects", "2",
                           "--presets", presets)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("holofusion: error: --presets")
    assert ("'fancy' is not a preset" in line) if case == "unknown-preset" else ("superres.safetensors" in line)
    assert model.read_bytes() == before
