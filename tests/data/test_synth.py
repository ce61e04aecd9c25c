"""`holofusion dataset synth` / `preview`: the written dataset reads back exactly, masks cover the true surface,
bad input gives one clear line and leaves nothing behind."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from holofusion.data.co3d import Co3dDataset, load_frame_annotations, load_set_list, read_ply
from holofusion.data.procedural import make_object, render_views, sequence_cameras
from holofusion.data.synth import sequence_name, synthesize


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synthesize("all", sequences=3, views=5, size=64, out=out, seed=11, workers=1, progress=False)
    return out


def test_layout_and_set_lists(dataset):
    assert (dataset / "category_to_subset_name_list.json").is_file()
    for cat in ("apple", "donut", "hydrant", "teddybear"):
        records = load_frame_annotations(dataset, cat)
        assert len(records) == 15
        assert {r.viewpoint["intrinsics_format"] for r in records} == {"ndc_isotropic"}
        sl = load_set_list(dataset, cat, "fewview_dev")
        seqs = {s: {e[0] for e in sl[s]} for s in sl}
        assert sum(len(v) for v in sl.values()) == 15
        assert not (seqs["train"] & seqs["val"]) and not (seqs["train"] & seqs["test"])
        assert (dataset / cat / sequence_name(11) / "pointcloud.ply").is_file()
    # nothing but the dataset was left beside it
    assert [p.name for p in dataset.parent.iterdir()] == ["ds"]


def test_round_trip_equals_what_was_rendered(dataset):
    """What the reader loads equals what the generator rendered: images (to JPEG precision), masks, depth and
    cameras (to 1e-6)."""
    cat, seed = "hydrant", 12
    obj = make_object(cat, seed)
    cams = sequence_cameras(seed, 5, (64, 64), bounding_radius=obj.bounding_radius)
    images, masks, depth = render_views(obj, cams, generator=torch.Generator().manual_seed(seed * 2 + 1))
    ds = Co3dDataset(dataset, [cat], subset=None, split=None, crop=False, image_size=None, load_depth=True,
                     mask_images=False)
    for i in range(5):
        f = ds.load_frame((cat, sequence_name(seed), i))
        for got, want in ((f.camera.R, cams.R[i]), (f.camera.T, cams.T[i]),
                          (f.camera.focal_length, cams.focal_length[i]),
                          (f.camera.principal_point, cams.principal_point[i])):
            assert torch.allclose(got[0].double(), want.double(), atol=1e-6)
        assert f.camera.image_size == (64, 64)
        img_err = (f.image.permute(1, 2, 0) - images[i]).abs()
        assert img_err.mean() < 3 / 255
        assert (f.mask[0] - masks[i]).abs().max() <= 0.5 / 255 + 1e-6
        d_ref = depth[i].numpy().astype(np.float16).astype(np.float32)
        assert np.array_equal(f.depth[0].numpy(), d_ref)


def test_true_surface_projects_into_masks(dataset):
    for cat in ("apple", "donut", "hydrant", "teddybear"):
        ds = Co3dDataset(dataset, [cat], subset=None, split=None, crop=False, image_size=None)
        for _, seq in ds.sequences:
            pts, _ = read_ply(dataset / cat / seq / "pointcloud.ply")
            pts = torch.from_numpy(pts)
            for rec in ds.frames(cat, seq):
                f = ds.load_frame(rec)
                uv = f.camera.project(pts.to(f.camera.dtype))
                h, w = f.camera.image_size
                iu = uv[:, 0].floor().long().clamp(0, w - 1)
                iv = uv[:, 1].floor().long().clamp(0, h - 1)
                inside = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
                hit = inside & (f.mask[0][iv, iu] > 0)
                assert hit.float().mean() >= 0.99, f"{cat}/{seq} frame {rec.frame_number}: {hit.float().mean():.3f}"


def test_point_colours_are_what_the_frames_show(dataset):
    """A point cloud's colours are read off the frames, as CO3D's are: where a point is seen (its depth matches the
    frame's depth map, well inside the mask), the pixel shows its stored colour, up to JPEG, pixel footprint and
    highlights; the bare albedo would be off by the shading."""
    for cat in ("apple", "donut", "hydrant", "teddybear"):
        ds = Co3dDataset(dataset, [cat], subset=None, split=None, crop=False, image_size=None, load_depth=True,
                         mask_images=False)
        for _, seq in ds.sequences:
            pts, cols = read_ply(dataset / cat / seq / "pointcloud.ply")
            pts, cols = torch.from_numpy(pts), torch.from_numpy(cols).float() / 255
            albedo = make_object(cat, int(seq.split("_")[1])).albedo(pts)
            err, err_albedo = [], []
            for rec in ds.frames(cat, seq):
                f = ds.load_frame(rec)
                uv, z = f.camera.project(pts.to(f.camera.dtype), return_depth=True)
                h, w = f.camera.image_size
                iu, iv = uv[:, 0].floor().long().clamp(0, w - 1), uv[:, 1].floor().long().clamp(0, h - 1)
                seen = (f.depth[0][iv, iu] - z.reshape(-1)).abs() < 0.01 * z.reshape(-1)
                seen &= f.mask[0][iv, iu] > 0.99
                pixel = f.image[:, iv[seen], iu[seen]].T.float()
                err.append((pixel - cols[seen]).abs().mean(-1))
                err_albedo.append((pixel - albedo[seen]).abs().mean(-1))
            err, err_albedo = torch.cat(err), torch.cat(err_albedo)
            assert len(err) > 500, f"{cat}/{seq}: only {len(err)} seen points"
            assert err.median() < 0.05, f"{cat}/{seq}: median colour error {err.median():.3f}"
            assert err.median() < 0.4 * err_albedo.median(), f"{cat}/{seq}: {err.median():.3f} vs albedo {err_albedo.median():.3f}"


def test_deterministic_and_parallel_equals_serial(tmp_path):
    a = synthesize("donut", 2, 3, 32, tmp_path / "a", seed=5, workers=1, progress=False)
    b = synthesize("donut", 2, 3, 32, tmp_path / "b", seed=5, workers=2, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes() or rel.suffix == ".jgz", rel
    assert gzip.decompress((a / "donut/frame_annotations.jgz").read_bytes()) == \
        gzip.decompress((b / "donut/frame_annotations.jgz").read_bytes())


def test_preview_sheet(dataset, tmp_path):
    out = synth_cli(["dataset", "preview", str(dataset), "--out", str(tmp_path / "sheet.png"), "--per-category", "4"])
    assert out.returncode == 0, out.stderr
    im = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    assert im.shape[0] == 4 * 128 and im.shape[1] > 4 * 128
    rows = im.reshape(4, 128, im.shape[1], 3)
    assert all((row < 200).any() for row in rows)  # every category row shows an object, not just white


# ---------------------------------------------------------------------------- bad input through the real CLI
def synth_cli(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "holofusion.cli", *args], capture_output=True, text=True,
                          timeout=120)


def _one_clear_line(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_category(tmp_path):
    res = synth_cli(["dataset", "synth", "--category", "banana", "--sequences", "1", "--views", "1",
                     "--out", str(tmp_path / "x")])
    _one_clear_line(res, "banana", "apple, donut, hydrant, teddybear")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", ["0", "-5"])
def test_bad_size(tmp_path, size):
    res = synth_cli(["dataset", "synth", "--category", "apple", "--sequences", "1", "--views", "1",
                     "--size", size, "--out", str(tmp_path / "x")])
    _one_clear_line(res, "--size", "at least 1")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path):
    if os.geteuid() == 0:
        parent = Path("/proc/self")  # even root cannot create folders here
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    res = synth_cli(["dataset", "synth", "--category", "apple", "--sequences", "1", "--views", "1",
                     "--out", str(parent / "ds")])
    _one_clear_line(res, "cannot write into", str(parent))
    assert not (parent / "ds").exists()


def test_existing_nonempty_output_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    res = synth_cli(["dataset", "synth", "--category", "apple", "--sequences", "1", "--views", "1",
                     "--out", str(tmp_path / "ds")])
    _one_clear_line(res, "already exists and is not empty")
    assert (tmp_path / "ds" / "keep.txt").read_text() == "mine"


def test_corrupted_jgz(dataset, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "apple" / "frame_annotations.jgz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    res = synth_cli(["dataset", "preview", str(broken), "--out", str(tmp_path / "sheet.png")])
    _one_clear_line(res, "apple/frame_annotations.jgz")
    assert not (tmp_path / "sheet.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_synth_leaves_nothing(tmp_path, monkeypatch):
    import holofusion.data.synth as synth

    def boom(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_render_sequence", boom)
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize("apple", 1, 1, 32, tmp_path / "ds", workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_help_lists_commands():
    res = synth_cli(["--help"])
    assert res.returncode == 0 and "dataset" in res.stdout
    res = synth_cli(["dataset", "--help"])
    assert "synth" in res.stdout and "preview" in res.stdout
