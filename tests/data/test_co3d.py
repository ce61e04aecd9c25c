"""CO3Dv2 reader and writer: round trips through real files, crops with corrected cameras, batches, malformed input."""

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from holofusion.cameras import PerspectiveCamera
from holofusion.data.co3d import (
    FRAME_TYPE_FOR_SPLIT,
    Co3dDataset,
    Co3dWriter,
    decode_depth,
    encode_depth,
    load_depth_png,
    load_eval_batches,
    mask_crop_box,
    read_category_to_subset,
    read_ply,
    split_sequences,
    write_category_to_subset,
    write_ply,
)
from holofusion.errors import DataError
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
H, W = 40, 56  # deliberately not square: image.size is [H, W]
CAT = "toy"


# ---------------------------------------------------------------------- synthetic frames
def random_camera(rng: np.random.Generator, hw=(H, W)) -> PerspectiveCamera:
    az, el = rng.uniform(0, 2 * math.pi), rng.uniform(-0.3, 0.8)
    dist = rng.uniform(4.0, 6.0)
    eye = dist * np.array([math.cos(el) * math.cos(az), -math.sin(el), math.cos(el) * math.sin(az)])
    cam = PerspectiveCamera.look_at(torch.tensor(eye[None], dtype=torch.float64), up=(0.0, -1.0, 0.0),
                                    focal_length=float(rng.uniform(1.5, 2.5)), image_size_hw=hw,
                                    principal_point=torch.tensor(rng.uniform(-0.1, 0.1, 2)))
    return cam


def synthetic_frame(rng: np.random.Generator, cam: PerspectiveCamera, radius_px: float = 9.0):
    """Smooth image, a soft disc mask around the projected origin, and a depth map valid inside the disc."""
    h, w = cam.image_size
    uv = cam.project(torch.zeros(1, 3, dtype=cam.dtype))[0].numpy()
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    r = np.hypot(xs - uv[0], ys - uv[1])
    mask = np.clip(radius_px + 0.5 - r, 0.0, 1.0).astype(np.float32)
    base = rng.uniform(0.2, 0.8, 3)
    img = base[None, None, :] + 0.15 * np.sin(xs / 9.0)[..., None] + 0.1 * np.cos(ys / 7.0)[..., None]
    image = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    depth = np.where(mask > 0.5, rng.uniform(3.0, 7.0, (h, w)), 0.0).astype(np.float32)
    return image, mask, depth


def write_toy_dataset(root: Path, n_seq=5, n_frames=6, seed=0, category=CAT, split=None):
    """A small dataset; returns the per-frame inputs for comparison."""
    rng = np.random.default_rng(seed)
    names = [f"seq_{i:02d}" for i in range(n_seq)]
    split = split or split_sequences(names, val_fraction=0.2, test_fraction=0.2, seed=seed)
    inputs, clouds = {}, {}
    with Co3dWriter(root, category) as writer:
        for name in names:
            for k in range(n_frames):
                num = 3 * k + 1  # frame numbers need not be consecutive
                cam = random_camera(rng)
                image, mask, depth = synthetic_frame(rng, cam)
                writer.add_frame(name, num, image, mask, depth, cam, frame_type=FRAME_TYPE_FOR_SPLIT[split[name]])
                inputs[(name, num)] = (image, mask, depth, cam)
            pts = rng.normal(size=(50, 3)).astype(np.float32)
            cols = rng.integers(0, 256, (50, 3), dtype=np.uint8)
            writer.add_sequence(name, pts, cols)
            clouds[name] = (pts, cols)
        # close() by the context manager writes fewview_dev from the frame types
    write_category_to_subset(root, {category: ["fewview_dev"]})
    return inputs, clouds, split


@pytest.fixture
def toy(tmp_path):
    root = tmp_path / "ds"
    inputs, clouds, split = write_toy_dataset(root)
    return root, inputs, clouds, split


# ---------------------------------------------------------------------- round trip
def test_roundtrip_pixels_cameras_point_clouds(toy):
    root, inputs, clouds, split = toy
    ds = Co3dDataset(root, CAT, subset=None, split=None, image_size=None, crop=False, mask_images=False,
                     load_depth=True, camera_dtype=torch.float64)
    assert len(ds) == len(inputs) == 30
    assert [s for _, s in ds.sequences] == sorted(clouds)
    for i in range(len(ds)):
        f = ds[i]
        image, mask, depth, cam = inputs[(f.sequence_name, f.frame_number)]
        stem = f"frame{f.frame_number:06d}"
        jpeg = np.asarray(Image.open(root / CAT / f.sequence_name / "images" / f"{stem}.jpg"))
        got = np.rint(f.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert got.shape == (H, W, 3)
        np.testing.assert_array_equal(got, jpeg)  # exactly the decoded JPEG
        assert np.abs(got.astype(float) - image).mean() < 2.0  # and close to the input (quality 95)
        np.testing.assert_array_equal(np.rint(f.mask[0].numpy() * 255), np.rint(mask * 255))
        np.testing.assert_array_equal(f.depth[0].numpy(), depth.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(f.depth_mask[0].numpy(), (depth > 0).astype(np.float32))
        assert f.camera.image_size == (H, W) == cam.image_size
        for a in ("R", "T", "focal_length", "principal_point"):
            torch.testing.assert_close(getattr(f.camera, a), getattr(cam, a), atol=1e-6, rtol=0)
        assert f.crop_box == (0, 0, W, H)
    for name, (pts, cols) in clouds.items():
        p, c = ds.point_cloud(CAT, name)
        np.testing.assert_array_equal(p, pts)
        np.testing.assert_array_equal(c, cols)


def test_annotation_files_follow_the_format(toy):
    root, inputs, _, _ = toy
    with gzip.open(root / CAT / "frame_annotations.jgz", "rt") as fh:
        frames = json.load(fh)
    f0 = frames[0]
    assert f0["image"]["size"] == [H, W]
    assert f0["image"]["path"] == f"{CAT}/seq_00/images/frame000001.jpg"
    assert f0["depth"]["path"].endswith("depths/frame000001.jpg.geometric.png")
    assert f0["depth"]["scale_adjustment"] == 1.0
    assert f0["viewpoint"]["intrinsics_format"] == "ndc_isotropic"
    assert f0["mask"]["mass"] == pytest.approx(np.rint(inputs[("seq_00", 1)][1] * 255).sum() / 255)
    assert Image.open(root / f0["mask"]["path"]).mode == "L"
    assert Image.open(root / f0["depth"]["path"]).mode == "I;16"
    assert Image.open(root / f0["depth"]["mask_path"]).mode == "1"
    for rec in frames:  # nothing absolute: the folder can be renamed
        for p in (rec["image"]["path"], rec["mask"]["path"], rec["depth"]["path"], rec["depth"]["mask_path"]):
            assert p.startswith(CAT + "/") and (root / p).is_file()
    with gzip.open(root / CAT / "sequence_annotations.jgz", "rt") as fh:
        seqs = json.load(fh)
    assert [s["sequence_name"] for s in seqs] == [f"seq_{i:02d}" for i in range(5)]
    assert seqs[0]["point_cloud"] == {"path": f"{CAT}/seq_00/pointcloud.ply", "quality_score": 1.0, "n_points": 50}
    assert read_category_to_subset(root) == {CAT: ["fewview_dev"]}


def test_renamed_root_still_reads(toy, tmp_path):
    root = toy[0]
    moved = tmp_path / "moved"
    root.rename(moved)
    assert len(Co3dDataset(moved, CAT, subset="fewview_dev", split="train")) > 0


# ---------------------------------------------------------------------- splits and subsets
def test_set_lists_and_frame_types_select_the_same_frames(toy):
    root, inputs, _, split = toy
    for s in ("train", "val", "test"):
        want = sorted(k for k in inputs if split[k[0]] == s)
        by_list = Co3dDataset(root, CAT, subset="fewview_dev", split=s)
        by_type = Co3dDataset(root, CAT, subset=None, split=s)
        assert sorted((r.sequence_name, r.frame_number) for r in by_list._flat) == want
        assert sorted((r.sequence_name, r.frame_number) for r in by_type._flat) == want
        assert {n for _, n in by_list.sequences} == {n for n, v in split.items() if v == s}
    all_frames = Co3dDataset(root, None, subset="fewview_dev", split=None)  # categories from the json
    assert all_frames.categories == [CAT] and len(all_frames) == len(inputs)


def test_explicit_set_lists_and_eval_batches(tmp_path):
    root = tmp_path / "ds"
    rng = np.random.default_rng(3)
    with Co3dWriter(root, "thing") as w:
        for name in ("a", "b"):
            for num in range(4):
                cam = random_camera(rng)
                w.add_frame(name, num, *synthetic_frame(rng, cam), cam)
        subsets = w.close(set_lists={"manyview_dev_0": {"train": [["a", 0], ["a", 2]], "val": [["b", 1]],
                                                        "test": [["b", 3]]}},
                          eval_batches={"manyview_dev_0": [[["b", 3], ["a", 0], ["a", 2]]]})
    assert subsets == ["manyview_dev_0"]
    write_category_to_subset(root, {"thing": subsets})
    ds = Co3dDataset(root, "thing", subset="manyview_dev_0", split="train")
    assert [(r.sequence_name, r.frame_number) for r in ds._flat] == [("a", 0), ("a", 2)]
    assert [r.frame_number for r in Co3dDataset(root, "thing", subset="manyview_dev_0", split="val")._flat] == [1]
    batches = load_eval_batches(root, "thing", "manyview_dev_0")
    assert batches == [[("b", 3, "thing/b/images/frame000003.jpg"), ("a", 0, "thing/a/images/frame000000.jpg"),
                        ("a", 2, "thing/a/images/frame000002.jpg")]]
    with pytest.raises(DataError, match=r"thing/set_lists/set_lists_fewview_dev\.json.*manyview_dev_0"):
        Co3dDataset(root, "thing", subset="fewview_dev")


def test_optional_fields_missing_and_unknown_keys_ignored(tmp_path):
    root = tmp_path / "ds"
    (root / "c" / "s" / "images").mkdir(parents=True)
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "c/s/images/x.jpg")
    cam = random_camera(np.random.default_rng(0))
    vp = cam.to_co3d()
    vp["camera_name"] = "phone"  # unknown keys are ignored
    frames = [{"sequence_name": "s", "frame_number": 7, "image": {"path": "c/s/images/x.jpg", "size": [H, W]},
               "viewpoint": vp, "weird": 1},
              {"sequence_name": "s", "frame_number": 8, "image": {"path": "c/s/images/x.jpg", "size": [H, W]},
               "viewpoint": None, "mask": None, "depth": None, "meta": None}]
    with gzip.open(root / "c" / "frame_annotations.jgz", "wt") as fh:
        json.dump(frames, fh)
    ds = Co3dDataset(root, "c", subset=None, split=None, image_size=32, load_depth=True)
    assert len(ds) == 1  # the frame without a viewpoint is left out
    f = ds[0]
    assert f.frame_number == 7 and f.depth is None and f.image.shape == (3, 32, 32)
    # no mask: the whole image is foreground, padded above and below (W > H) with white to a square
    assert torch.all(f.mask[:, 6:-6] == 1)
    assert torch.all(f.image[:, :3] == 1) and torch.all(f.mask[:, :3] == 0) and torch.all(f.mask[:, -3:] == 0)
    assert torch.all(f.image[:, 8:-8] < 0.5)


# ---------------------------------------------------------------------- crop and resize
def test_crop_resize_moves_pixels_and_camera_together(tmp_path):
    """A dot drawn at a 3D point's projection lands where the corrected camera projects that point."""
    rng = np.random.default_rng(7)
    root = tmp_path / "ds"
    point = torch.tensor([[0.3, -0.2, 0.25]], dtype=torch.float64)
    h, w = 120, 90
    cams = []
    with Co3dWriter(root, CAT) as wr:
        for num in range(4):
            cam = random_camera(rng, (h, w))
            cams.append(cam)
            _, mask, depth = synthetic_frame(rng, cam, radius_px=25.0)
            image = np.full((h, w, 3), 40, np.uint8)
            u, v = cam.project(point)[0].numpy()
            ys, xs = np.mgrid[0:h, 0:w] + 0.5
            image[np.hypot(xs - u, ys - v) < 3.0] = 255
            mask = np.maximum(mask, (np.hypot(xs - u, ys - v) < 5.0).astype(np.float32))
            wr.add_frame("s", num, image, mask, depth, cam)
    size = 64
    ds = Co3dDataset(root, CAT, subset=None, split=None, image_size=size, crop=True, mask_images=False,
                     camera_dtype=torch.float64)
    for num, cam in enumerate(cams):
        f = ds.load_frame((CAT, "s", num))
        x0, y0, x1, y1 = f.crop_box
        assert x1 - x0 == y1 - y0  # square
        assert f.camera.image_size == (size, size) and f.image.shape == (3, size, size)
        scale = size / (x1 - x0)
        before = cam.project(point)[0]
        after = f.camera.project(point)[0]
        torch.testing.assert_close(after, (before - torch.tensor([x0, y0], dtype=torch.float64)) * scale)
        # the brightest blob of the output sits at the projected pixel
        bright = f.image[0].numpy() > 0.6
        ys, xs = np.nonzero(bright)
        assert len(xs) > 0
        centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
        assert np.abs(centroid - after.numpy()).max() < 1.0
        # world origin (centre of the mask disc) projects near the output's centre
        centre = f.camera.project(torch.zeros(1, 3, dtype=torch.float64))[0].numpy()
        assert np.abs(centre - size / 2).max() < size * 0.2


def test_mask_crop_box_context_and_square():
    m = np.zeros((100, 200), np.float32)
    m[20:40, 50:90] = 1.0  # 40 wide, 20 tall
    m[60, 10] = 0.39  # below threshold: ignored
    x0, y0, x1, y1 = mask_crop_box(m, 0.4, 0.3)
    assert x1 - x0 == y1 - y0 == 52  # longer side 40 * 1.3
    assert (x0 + x1) / 2 == 70 and (y0 + y1) / 2 == 30
    assert mask_crop_box(np.zeros((5, 5)), 0.4, 0.3) is None


def test_crop_box_outside_image_pads_white(tmp_path):
    root = tmp_path / "ds"
    rng = np.random.default_rng(1)
    cam = random_camera(rng)
    image, _, depth = synthetic_frame(rng, cam)
    mask = np.zeros((H, W), np.float32)
    mask[0:30, 0:10] = 1.0  # touches the top-left corner: the square box leaves the image
    with Co3dWriter(root, CAT) as wr:
        wr.add_frame("s", 0, image, mask, depth, cam)
    f = Co3dDataset(root, CAT, subset=None, split=None, image_size=39, load_depth=True)[0]
    x0, y0, x1, y1 = f.crop_box
    assert x0 < 0 and y0 < 0
    assert torch.all(f.image[:, :, 0] == 1.0)  # left column is outside the image: white
    assert torch.all(f.mask[:, :, 0] == 0.0) and torch.all(f.depth[:, :, 0] == 0.0)


def test_depth_map_smaller_than_image(tmp_path):
    """Real CO3D depth maps may be smaller than the image; the crop box is rescaled into them."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(2)
    cam = random_camera(rng, (80, 80))
    image, mask, _ = synthetic_frame(rng, cam, radius_px=20)
    with Co3dWriter(root, CAT) as wr:
        rec = wr.add_frame("s", 0, image, mask, None, cam)
        rec["depth"] = {"path": f"{CAT}/s/depths/small.png", "scale_adjustment": 2.0}
    small = np.tile(np.linspace(1.0, 2.0, 40, dtype=np.float32), (40, 1))  # depth grows left to right
    (root / CAT / "s" / "depths").mkdir(parents=True)
    Image.fromarray(encode_depth(small)).save(root / CAT / "s/depths/small.png")
    f = Co3dDataset(root, CAT, subset=None, split=None, image_size=None, crop=False, load_depth=True)[0]
    assert f.depth.shape == (1, 80, 80)
    row = f.depth[0, 40].numpy()
    assert row[0] == pytest.approx(2.0, abs=0.01) and row[-1] == pytest.approx(4.0, abs=0.01)
    assert np.all(np.diff(row) >= 0)


# ---------------------------------------------------------------------- batches
def test_batches_disjoint_reproducible_and_skip_short_sequences(tmp_path):
    root = tmp_path / "ds"
    rng = np.random.default_rng(5)
    with Co3dWriter(root, CAT) as wr:
        for name, n in (("long_a", 9), ("long_b", 7), ("short", 4)):
            for num in range(n):
                cam = random_camera(rng)
                wr.add_frame(name, num * 2, *synthetic_frame(rng, cam), cam)
    ds = Co3dDataset(root, CAT, subset=None, split=None, image_size=24)
    run = lambda seed: list(ds.batches(3, 2, seed=seed, n_batches=6))  # noqa: E731
    a, b, c = run(11), run(11), run(12)
    assert len(a) == 6
    for x, y in zip(a, b):
        assert (x.sequence_name, x.source.frame_numbers, x.target.frame_numbers) == \
               (y.sequence_name, y.source.frame_numbers, y.target.frame_numbers)
        torch.testing.assert_close(x.source.images, y.source.images)
    assert [(x.sequence_name, x.source.frame_numbers) for x in a] != [(x.sequence_name, x.source.frame_numbers)
                                                                      for x in c]
    for x in a:
        assert x.sequence_name != "short"  # 4 < 3 + 2 frames
        assert not set(x.source.frame_numbers) & set(x.target.frame_numbers)
        assert x.source.images.shape == (3, 3, 24, 24) and x.target.masks.shape == (2, 1, 24, 24)
        assert len(x.source.cameras) == 3 and x.target.cameras.image_size == (24, 24)
    # each pass visits every eligible sequence once
    assert sorted(x.sequence_name for x in a[:2]) == ["long_a", "long_b"]
    g = torch.Generator().manual_seed(11)
    assert [x.source.frame_numbers for x in ds.batches(3, 2, generator=g, n_batches=6)] == \
           [x.source.frame_numbers for x in a]
    with pytest.raises(Exception, match="10 frames"):
        next(ds.batches(5, 5))


# ---------------------------------------------------------------------- encodings
def test_float16_depth_png_by_hand(tmp_path):
    values = np.array([[0.0, 1.5, 3.14159, 1000.0], [np.inf, np.nan, -2.0, 6e-5]], dtype=np.float16)
    bits = values.view(np.uint16)
    path = tmp_path / "d.png"
    Image.fromarray(bits.copy()).save(path)  # a 16-bit PNG holding the raw bit patterns
    got = load_depth_png(path, scale_adjustment=2.0)
    want = np.array([[0.0, 3.0, float(np.float16(3.14159)) * 2, 2000.0], [0, 0, 0, float(np.float16(6e-5)) * 2]],
                    dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(decode_depth(encode_depth(np.array([[2.5, 0.0, -1.0, np.nan]]))),
                                  [[2.5, 0.0, 0.0, 0.0]])


def test_ndc_norm_image_bounds_viewpoint(tmp_path):
    """CO3D v1's per-axis NDC: fx = f0 W/2, fy = f1 H/2, cx = W/2 - p0 W/2, cy = H/2 - p1 H/2."""
    root = tmp_path / "ds"
    (root / "c" / "s" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "c/s/images/f.jpg")
    vp = {"R": np.eye(3).tolist(), "T": [0.1, 0.2, 3.0], "focal_length": [1.8, 2.2], "principal_point": [0.1, -0.05],
          "intrinsics_format": "ndc_norm_image_bounds"}
    with gzip.open(root / "c" / "frame_annotations.jgz", "wt") as fh:
        json.dump([{"sequence_name": "s", "frame_number": 0, "image": {"path": "c/s/images/f.jpg", "size": [H, W]},
                    "viewpoint": vp}], fh)
    f = Co3dDataset(root, "c", subset=None, split=None, image_size=None, crop=False, camera_dtype=torch.float64)[0]
    fx, fy, cx, cy = (t.item() for t in f.camera.pixel_intrinsics())
    assert (fx, fy, cx, cy) == pytest.approx((1.8 * W / 2, 2.2 * H / 2, W / 2 - 0.1 * W / 2, H / 2 + 0.05 * H / 2))


def test_ply_formats(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(7, 3)).astype(np.float32)
    write_ply(tmp_path / "n.ply", pts)
    p, c = read_ply(tmp_path / "n.ply")
    np.testing.assert_array_equal(p, pts)
    assert c is None
    write_ply(tmp_path / "f.ply", torch.from_numpy(pts), np.full((7, 3), 0.5))
    assert read_ply(tmp_path / "f.ply")[1].tolist() == [[128, 128, 128]] * 7
    # ascii with an extra property and a face element after the vertices
    lines = ["ply", "format ascii 1.0", "comment hi", "element vertex 2", "property double x", "property double y",
             "property double z", "property float nx", "property uchar red", "property uchar green",
             "property uchar blue", "element face 1", "property list uchar int vertex_indices", "end_header",
             "1 2 3 0 10 20 30", "4 5 6 0 40 50 60", "3 0 1 1"]
    (tmp_path / "a.ply").write_text("\n".join(lines) + "\n")
    p, c = read_ply(tmp_path / "a.ply")
    assert p.tolist() == [[1, 2, 3], [4, 5, 6]] and c.tolist() == [[10, 20, 30], [40, 50, 60]]
    # big-endian binary
    table = np.array([(1.0, 2.0, 3.0)], dtype=[("x", ">f4"), ("y", ">f4"), ("z", ">f4")])
    head = "ply\nformat binary_big_endian 1.0\nelement vertex 1\nproperty float x\nproperty float y\n" \
           "property float z\nend_header\n"
    (tmp_path / "b.ply").write_bytes(head.encode() + table.tobytes())
    assert read_ply(tmp_path / "b.ply")[0].tolist() == [[1, 2, 3]]
    (tmp_path / "t.ply").write_bytes((tmp_path / "n.ply").read_bytes()[:-5])
    with pytest.raises(DataError, match=r"t\.ply.*truncated"):
        read_ply(tmp_path / "t.ply")


# ---------------------------------------------------------------------- malformed input
def _rewrite_frames(root: Path, edit):
    path = root / CAT / "frame_annotations.jgz"
    with gzip.open(path, "rt") as fh:
        frames = json.load(fh)
    edit(frames)
    with gzip.open(path, "wt") as fh:
        json.dump(frames, fh)


def _load_all(root: Path):
    ds = Co3dDataset(root, CAT, subset=None, split=None, image_size=16, load_depth=True)
    for i in range(len(ds)):
        ds[i]


@pytest.fixture
def small(tmp_path):
    root = tmp_path / "ds"
    write_toy_dataset(root, n_seq=2, n_frames=2)
    return root


def test_missing_frame_annotations(small):
    (small / CAT / "frame_annotations.jgz").unlink()
    with pytest.raises(DataError, match=r"toy/frame_annotations\.jgz: file is missing"):
        _load_all(small)


def test_corrupted_gzip(small):
    (small / CAT / "frame_annotations.jgz").write_bytes(b"\x1f\x8b\x08garbage-not-deflate")
    with pytest.raises(DataError, match=r"toy/frame_annotations\.jgz: not a readable gzip"):
        _load_all(small)


def test_gzip_of_non_json(small):
    (small / CAT / "frame_annotations.jgz").write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(DataError, match=r"toy/frame_annotations\.jgz: gzip content is not JSON"):
        _load_all(small)


@pytest.mark.parametrize("edit, pattern", [
    (lambda fr: fr[1]["viewpoint"].pop("R"), r"frame 4 of sequence 'seq_00'.*viewpoint\.R is missing"),
    (lambda fr: fr[1]["viewpoint"].update(R=[[1, 0, 0], [0, 1, 0]]),
     r"viewpoint\.R has shape \[2, 3\]; expected \[3, 3\]"),
    (lambda fr: fr[1]["viewpoint"].update(focal_length=[1, "a"]),
     r"viewpoint\.focal_length is not an array of numbers"),
    (lambda fr: fr[1].update(image="x.jpg"), r"frame 4 of sequence 'seq_00': image is str; expected an object"),
    (lambda fr: fr[0]["viewpoint"].update(intrinsics_format="foo"),
     r"frame 1 of sequence 'seq_00'.*viewpoint\.intrinsics_format is 'foo'; expected 'ndc_isotropic' or "
     r"'ndc_norm_image_bounds'"),
    (lambda fr: fr[0]["viewpoint"].update(T=[1, 2]), r"viewpoint\.T has shape \[2\]; expected \[3\]"),
    (lambda fr: fr[0]["image"].pop("size"), r"frame 1 of sequence 'seq_00'.*image\.size is missing"),
    (lambda fr: fr[0]["image"].update(size=[W]), r"image\.size is \[56\]; expected \[H, W\]"),
    (lambda fr: fr[2].pop("sequence_name"), r"entry 2: sequence_name is missing"),
    (lambda fr: fr[0]["depth"].update(scale_adjustment="x"), r"depth\.scale_adjustment is 'x'"),
])
def test_malformed_frame_records(small, edit, pattern):
    _rewrite_frames(small, edit)
    with pytest.raises(DataError, match=pattern) as err:
        _load_all(small)
    assert str(err.value).startswith("toy/frame_annotations.jgz: ")  # the file first, then the frame and field


def test_image_missing_on_disk(small):
    (small / CAT / "seq_01" / "images" / "frame000004.jpg").unlink()
    with pytest.raises(DataError, match=r"toy/seq_01/images/frame000004\.jpg: file is missing.*frame 4 of sequence "
                                         r"'seq_01'.*image\.path"):
        _load_all(small)


def test_image_size_not_matching_annotation(small):
    _rewrite_frames(small, lambda fr: fr[0]["image"].update(size=[W, H]))  # [W, H] instead of [H, W]
    with pytest.raises(DataError, match=rf"toy/seq_00/images/frame000001\.jpg: image is {H}x{W} \(HxW\) but .*"
                                        rf"image\.size \[{W}, {H}\]"):
        _load_all(small)


def test_mask_size_not_matching_image(small):
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(small / CAT / "seq_00/masks/frame000001.png")
    with pytest.raises(DataError, match=r"toy/seq_00/masks/frame000001\.png: mask is"):
        _load_all(small)


def test_corrupt_image_file(small):
    (small / CAT / "seq_00/images/frame000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"frame000001\.jpg: cannot be decoded.*image\.path"):
        _load_all(small)


def test_depth_png_of_wrong_kind(small):
    Image.fromarray(np.zeros((H, W), np.uint8)).save(small / CAT / "seq_00/depths/frame000001.jpg.geometric.png")
    with pytest.raises(DataError, match=r"frame000001\.jpg\.geometric\.png: depth PNG has mode L"):
        _load_all(small)


def test_set_list_naming_unknown_frame(small):
    path = small / CAT / "set_lists" / "set_lists_fewview_dev.json"
    sl = json.loads(path.read_text())
    sl["train"].append(["seq_00", 999, "toy/seq_00/images/frame000999.jpg"])
    path.write_text(json.dumps(sl))
    with pytest.raises(DataError, match=r"set_lists_fewview_dev\.json: train\[\d+\] names frame 999"):
        Co3dDataset(small, CAT, subset="fewview_dev", split="train")


def test_missing_point_cloud(small):
    (small / CAT / "seq_00" / "pointcloud.ply").unlink()
    ds = Co3dDataset(small, CAT, subset=None, split=None)
    with pytest.raises(DataError, match=r"toy/seq_00/pointcloud\.ply: file is missing"):
        ds.point_cloud(CAT, "seq_00")


# ---------------------------------------------------------------------- real CO3D photos
def test_real_co3d_portrait_photos(tmp_path):
    """Real 1066 x 1896 (W x H) CO3D apple photos with their ground-truth cameras, annotated by hand in CO3D format.

    Every optical axis passes near the apple; after padding to a square and resizing, the corrected camera still
    projects the axes' meeting point inside the apple (its hand-marked box, mapped the same way)."""
    src = FIXTURES / "co3d-apple-real"
    gt = np.load(src / "gt_cameras.npz")
    names = sorted(p.name for p in src.glob("frame*.jpg"))
    R, T = gt["gtR"].astype(np.float64), gt["gtT"].astype(np.float64)
    centres = -np.einsum("bj,bij->bi", T, R)
    axes = R[:, :, 2]  # the third column of R is the forward axis in world coordinates
    proj = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    meet = np.linalg.solve(proj.sum(0), np.einsum("bij,bj->i", proj, centres))
    root = tmp_path / "ds"
    (root / "apple" / "s" / "images").mkdir(parents=True)
    picks = [0, 5, 10, 15]
    frames = []
    for i in picks:
        shutil.copy(src / names[i], root / "apple/s/images" / names[i])
        frames.append({"sequence_name": "s", "frame_number": int(names[i][5:11]), "camera_name": "x",
                       "image": {"path": f"apple/s/images/{names[i]}", "size": [1896, 1066]},
                       "viewpoint": {"R": R[i].tolist(), "T": T[i].tolist(), "focal_length": gt["gtFL"][i].tolist(),
                                     "principal_point": [0.0, 0.0], "intrinsics_format": "ndc_isotropic"},
                       "meta": {"frame_type": "train_known"}})
    with gzip.open(root / "apple" / "frame_annotations.jgz", "wt") as fh:
        json.dump(frames, fh)
    size = 128
    ds = Co3dDataset(root, "apple", subset=None, split="train", image_size=size, crop=False,
                     camera_dtype=torch.float64)
    assert len(ds) == len(picks)
    for k, i in enumerate(picks):
        f = ds[k]
        x0, y0, x1, y1 = f.crop_box
        assert (x0, y0, x1 - x0, y1 - y0) == ((1066 - 1896) // 2, 0, 1896, 1896)
        s = size / 1896
        bx0, by0, bx1, by1 = APPLE_BOXES[i]
        u, v = f.camera.project(torch.tensor(meet[None]))[0].tolist()
        assert (bx0 - x0) * s <= u <= (bx1 - x0) * s and (by0 - y0) * s <= v <= (by1 - y0) * s
        assert torch.all(f.image[:, :, :10] == 1.0)  # padding on both sides is white ...
        assert f.image[:, :, 40:90].mean() < 0.9  # ... the photo is in the middle


# Hand-marked apple boxes (x0, y0, x1, y1) of frames 0, 5, 10 and 15 (file-name order), from tests/test_cameras.py.
APPLE_BOXES = {0: (362, 565, 747, 877), 5: (344, 658, 776, 981), 10: (578, 726, 991, 1110),
               15: (588, 654, 948, 995)}
