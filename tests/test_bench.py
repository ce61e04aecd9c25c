"""`holofusion bench`: the table's rows come from real objects written to disk, stages are cut where the pipeline
moves on, memory is read, and the paper-scale configuration builds models the pipeline loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from holofusion.bench import STAGES, format_table, paper_scale_models, run_bench
from holofusion.pipeline import HoloFusionPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"opacity_length": 20.0, "texture_size": 128, "faces": 2000}  # the tiny models' grids are faint


def test_rows_time_each_stage_of_real_objects(tiny_models):
    rows = run_bench([str(tiny_models["pipeline"])], ["draft"], repeats=2, device="cpu", paper=False,
                     paper_presets=[], paper_repeats=1, progress=False, job_options=TINY)
    [row] = rows
    assert row.error is None and len(row.total_s) == 2
    assert set(row.seconds) == {"coarse", "asset", "preview"}
    for stage in ("coarse", "asset"):
        assert len(row.seconds[stage]) == 2 and all(t > 0 for t in row.seconds[stage])
        assert all(m > 50 for m in row.peak_mib[stage])  # a resident set in MiB, interpreter and torch included
    # Request to .glb: the stages before the preview add up to it (the preview is drawn after the file is written).
    for i, total in enumerate(row.total_s):
        assert row.seconds["coarse"][i] + row.seconds["asset"][i] == pytest.approx(total, rel=0.05, abs=0.05)
    table = format_table(rows, "cpu")
    assert "pipe" in table and "draft" in table and "<= 10 s" in table
    assert all(f"{s} s / MiB" in table for s in STAGES)


def test_a_preset_the_model_cannot_run_is_a_row_with_the_reason(tiny_models, tmp_path):
    coarse_only = tmp_path / "coarse_only"
    coarse_only.mkdir()
    (coarse_only / "holodiffusion.safetensors").write_bytes(
        (tiny_models["pipeline"] / "holodiffusion.safetensors").read_bytes())
    [row] = run_bench([str(coarse_only)], ["standard"], repeats=1, device="cpu", paper=False, paper_presets=[],
                      paper_repeats=1, progress=False, job_options=TINY)
    assert row.total_s == [] and "super-resolution model" in row.error
    assert "failed: request: preset 'standard' needs a super-resolution model" in format_table([row], "cpu")


def test_paper_scale_models_have_the_published_sizes_and_load(tmp_path):
    folder = paper_scale_models(tmp_path / "paper")
    pipe = HoloFusionPipeline.from_pretrained(str(folder))
    assert pipe.hd.config.grid_size == 16 and pipe.hd.config.encoder.channels == 64
    assert (pipe.sr.config.low_size, pipe.sr.config.high_size) == (64, 256)
    assert pipe.sr.config.cond_features == pipe.hd.config.decoder.n_features_out


def test_bad_input_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "holofusion.cli", "bench", "--presets", "fast", "--no-paper"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'fast' is unknown" in r.stderr and "Traceback" not in r.stderr
