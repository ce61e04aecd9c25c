"""PerspectiveCamera against the outside world: OpenCV reference projections, NeRF's Blender cameras, real CO3D photos."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from holofusion.cameras import PerspectiveCamera, fly_around_cameras, sample_orbit_cameras
from holofusion.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # real outside data; see fixtures/README.md

# Hand-marked boxes (x0, y0, x1, y1) around the apple in each of the 20 real CO3D photos, in file-name order,
# drawn by eye on a contact sheet of the photos.
APPLE_BOXES = [(362, 565, 747, 877), (394, 590, 718, 902), (463, 651, 797, 959), (473, 679, 804, 985),
               (423, 626, 765, 949), (344, 658, 776, 981), (322, 622, 729, 981), (427, 640, 883, 1010),
               (463, 658, 833, 1028), (603, 676, 1009, 1071), (578, 726, 991, 1110), (405, 636, 844, 1049),
               (499, 773, 883, 1146), (624, 744, 966, 1067), (668, 654, 1052, 1013), (588, 654, 948, 995),
               (585, 690, 916, 1013), (642, 726, 973, 1031), (517, 618, 883, 959), (434, 744, 819, 1067)]


def rodrigues(rvec) -> np.ndarray:
    r = np.asarray(rvec, dtype=np.float64)
    theta = np.linalg.norm(r)
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * Kx + (1 - math.cos(theta)) * Kx @ Kx


def random_camera(gen: torch.Generator, b: int = 3, hw=(60, 80)) -> PerspectiveCamera:
    q = torch.randn(b, 3, 3, generator=gen, dtype=torch.float64)
    R, _ = torch.linalg.qr(q)
    R = R * torch.sign(torch.linalg.det(R))[:, None, None]
    T = torch.randn(b, 3, generator=gen, dtype=torch.float64) + torch.tensor([0, 0, 6.0], dtype=torch.float64)
    f = 1 + 2 * torch.rand(b, 2, generator=gen, dtype=torch.float64)
    p = 0.2 * torch.randn(b, 2, generator=gen, dtype=torch.float64)
    return PerspectiveCamera(R, T, f, p, hw)


# ---------------------------------------------------------------------------- OpenCV
def test_opencv_reference_projections():
    cases = json.loads((FIXTURES / "opencv-projection" / "cv_project_points_precomputed.json").read_text())
    assert len(cases) == 4
    for case in cases:
        K = torch.tensor(case["camera_matrix"], dtype=torch.float64)
        R = torch.tensor(rodrigues(case["rvec"]))
        t = torch.tensor(case["tvec"], dtype=torch.float64)
        cam = PerspectiveCamera.from_opencv(K, R, t, case["image_size"])
        uv = cam.project(torch.tensor(case["pts"], dtype=torch.float64))
        expected = torch.tensor(case["pts_proj"], dtype=torch.float64)
        assert uv.shape == expected.shape
        assert (uv - expected).abs().max() < 1e-3
        # and back: the same K, R, t come out
        K2, R2, t2 = cam.to_opencv()
        assert torch.allclose(K2[0], K, atol=1e-9) and torch.allclose(R2[0], R, atol=1e-12)
        assert torch.allclose(t2[0], t, atol=1e-12)


def test_opencv_rejects_skew():
    K = torch.tensor([[100.0, 3.0, 50.0], [0, 100.0, 40.0], [0, 0, 1]])
    with pytest.raises(ValueError, match="skew"):
        PerspectiveCamera.from_opencv(K, torch.eye(3), torch.zeros(3), (80, 100))


# ---------------------------------------------------------------------------- Blender / NeRF
@pytest.mark.parametrize("split", ["train", "val"])
def test_blender_nerf_cameras_round_trip(split):
    meta = json.loads((FIXTURES / "blender-nerf-lego" / f"transforms_{split}.json").read_text())
    png = next((FIXTURES / "blender-nerf-lego" / split).glob("*.png"))
    w, h = Image.open(png).size
    angle = meta["camera_angle_x"]
    sensor = 36.0
    lens = sensor / 2 / math.tan(angle / 2)
    M = torch.tensor([f["transform_matrix"] for f in meta["frames"]], dtype=torch.float64)
    cam = PerspectiveCamera.from_blender(M, lens, sensor, (h, w))
    back = cam.to_blender(sensor_width_mm=sensor)
    assert torch.allclose(back["matrix_world"], M, atol=1e-6)
    assert torch.allclose(back["lens_mm"], torch.full((len(M),), lens, dtype=torch.float64), atol=1e-9)
    assert back["shift_x"].abs().max() < 1e-12 and back["shift_y"].abs().max() < 1e-12
    # NeRF's own ray formula (camera looks down -Z, +Y up, pixel centres at +0.5) gives the same directions.
    focal_px = 0.5 * w / math.tan(angle / 2)
    xy = torch.tensor([[0.5, 0.5], [w - 0.5, 0.5], [w / 2, h / 2], [3.5, h - 7.5]], dtype=torch.float64)
    o, d = cam.rays(xy)
    d_nerf_cam = torch.stack([(xy[:, 0] - w / 2) / focal_px, -(xy[:, 1] - h / 2) / focal_px,
                              -torch.ones(len(xy), dtype=torch.float64)], -1)
    d_nerf = torch.einsum("bij,nj->bni", M[:, :3, :3], d_nerf_cam)
    assert torch.allclose(torch.nn.functional.normalize(d, dim=-1), torch.nn.functional.normalize(d_nerf, dim=-1),
                          atol=1e-9)
    assert torch.allclose(o[:, 0], M[:, :3, 3], atol=1e-9)


def test_blender_shift_and_scale():
    gen = torch.Generator().manual_seed(3)
    cam = random_camera(gen, hw=(90, 120))
    cam = PerspectiveCamera(cam.R, cam.T, cam.focal_length[:, :1].expand(-1, 2), cam.principal_point, cam.image_size)
    bl = cam.to_blender(sensor_width_mm=24.0)
    scaled = bl["matrix_world"].clone()
    scaled[:, :3, :3] *= 2.5  # object scale does not change what a Blender camera sees
    again = PerspectiveCamera.from_blender(scaled, bl["lens_mm"], 24.0, (90, 120), bl["shift_x"], bl["shift_y"])
    pts = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(again.project(pts), cam.project(pts), atol=1e-9)


# ---------------------------------------------------------------------------- real CO3D photos
def test_real_co3d_apple_axes_converge_on_the_apple():
    npz = np.load(FIXTURES / "co3d-apple-real" / "gt_cameras.npz")
    files = sorted((FIXTURES / "co3d-apple-real").glob("*.jpg"))
    assert len(files) == 20
    w, h = Image.open(files[0]).size
    cams = [PerspectiveCamera.from_co3d({"R": R.tolist(), "T": T.tolist(), "focal_length": f.tolist(),
                                          "principal_point": [0.0, 0.0], "intrinsics_format": "ndc_isotropic"},
                                         (h, w)) for R, T, f in zip(npz["gtR"], npz["gtT"], npz["gtFL"])]
    cam = PerspectiveCamera.stack(cams)
    # The point nearest to all 20 optical axes (least squares).
    centres, forward = cam.center(), cam.R[:, :, 2]
    P = torch.eye(3, dtype=torch.float64) - forward[:, :, None] * forward[:, None, :]
    x = torch.linalg.solve(P.sum(0), (P @ centres[:, :, None]).sum(0))[:, 0]
    spread = torch.linalg.norm((P @ (x - centres)[:, :, None])[:, :, 0], dim=-1)
    assert spread.max() < 0.2 * centres.norm(dim=-1).mean()  # the axes meet (to ~10 degrees: hand-held video)
    for name, point in (("axes' convergence point", x), ("world origin", torch.zeros(3, dtype=torch.float64))):
        uv, z = cam.project(point[None].expand(20, 1, 3), return_depth=True)
        assert (z > 0).all(), f"{name} is behind a camera"
        for i, (u, v) in enumerate(uv[:, 0].tolist()):
            x0, y0, x1, y1 = APPLE_BOXES[i]
            assert x0 <= u <= x1 and y0 <= v <= y1, f"{name} projects off the apple in {files[i].name}: {(u, v)}"
    # The apple is red where the convergence point lands (a colour check beside the boxes).
    uv = cam.project(x[None].expand(20, 1, 3))[:, 0]
    reds = 0
    for f, (u, v) in zip(files, uv.tolist()):
        px = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64)[int(v) - 25:int(v) + 26, int(u) - 25:int(u) + 26]
        r, g, b = np.median(px.reshape(-1, 3), axis=0)
        reds += r > 1.5 * g and r > 1.5 * b
    assert reds >= 18


# ---------------------------------------------------------------------------- CO3D intrinsics formats
def test_co3d_formats_agree_and_round_trip():
    h, w = 120, 200
    s = min(h, w) / 2
    fx, fy, cx, cy = 150.0, 140.0, 90.0, 70.0
    iso = {"R": np.eye(3).tolist(), "T": [0.1, -0.2, 5.0], "focal_length": [fx / s, fy / s],
           "principal_point": [(w / 2 - cx) / s, (h / 2 - cy) / s], "intrinsics_format": "ndc_isotropic"}
    bounds = dict(iso, focal_length=[fx / (w / 2), fy / (h / 2)],
                  principal_point=[(w / 2 - cx) / (w / 2), (h / 2 - cy) / (h / 2)],
                  intrinsics_format="ndc_norm_image_bounds")
    a, b = PerspectiveCamera.from_co3d(iso, (h, w)), PerspectiveCamera.from_co3d(bounds, (h, w))
    for x, y in zip(a.pixel_intrinsics(), b.pixel_intrinsics()):
        assert torch.allclose(x, y, atol=1e-9)
    assert torch.allclose(torch.stack(a.pixel_intrinsics()), torch.tensor([[fx], [fy], [cx], [cy]],
                                                                          dtype=torch.float64))
    back = PerspectiveCamera.from_co3d(b.to_co3d(), (h, w))
    assert torch.allclose(back.focal_length, a.focal_length) and torch.allclose(back.principal_point,
                                                                                a.principal_point)


def test_co3d_bad_format_is_a_clear_error():
    vp = {"R": np.eye(3).tolist(), "T": [0, 0, 1], "focal_length": [1, 1], "principal_point": [0, 0],
          "intrinsics_format": "pixels"}
    with pytest.raises(UserError, match="intrinsics_format is 'pixels'.*ndc_isotropic"):
        PerspectiveCamera.from_co3d(vp, (10, 10))
    with pytest.raises(UserError, match="lacks T"):
        PerspectiveCamera.from_co3d({"R": np.eye(3).tolist(), "focal_length": [1, 1], "principal_point": [0, 0]},
                                    (10, 10))


# ---------------------------------------------------------------------------- geometry properties
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_rays_and_projection_are_inverse(seed):
    gen = torch.Generator().manual_seed(seed)
    cam = random_camera(gen)
    xy = torch.rand(3, 50, 2, generator=gen, dtype=torch.float64) * torch.tensor([80.0, 60.0], dtype=torch.float64)
    depth = 1 + 5 * torch.rand(3, 50, generator=gen, dtype=torch.float64)
    pts = cam.unproject(xy, depth)
    uv, z = cam.project(pts, return_depth=True)
    assert torch.allclose(uv, xy, atol=1e-8) and torch.allclose(z, depth, atol=1e-10)
    # OpenCV conversion projects the same way
    K, R, t = cam.to_opencv()
    Xc = torch.einsum("bij,bnj->bni", R, pts) + t[:, None]
    uv_cv = torch.einsum("bij,bnj->bni", K, Xc)
    assert torch.allclose(uv_cv[..., :2] / uv_cv[..., 2:], xy, atol=1e-8)


def test_view_axes_are_left_up_forward():
    cam = PerspectiveCamera.look_at(torch.tensor([[0.0, 0.0, -5.0]]), up=(0.0, 1.0, 0.0), focal_length=2.0,
                                    image_size_hw=(100, 100))
    assert torch.allclose(cam.center(), torch.tensor([[0.0, 0.0, -5.0]]))
    uv = cam.project(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(uv[0], torch.tensor([50.0, 50.0]))
    # Looking along +Z with +Y up, world +X is on the camera's left (PyTorch3D: +X left) and +Y is up in the image.
    assert uv[1, 0] < 50 and uv[2, 1] < 50
    assert torch.allclose(torch.linalg.det(cam.R), torch.ones(1))


def test_crop_and_resize_move_pixels_consistently():
    gen = torch.Generator().manual_seed(0)
    cam = random_camera(gen, b=2, hw=(60, 80))
    pts = cam.unproject(torch.tensor([[10.0, 20.0], [70.0, 55.0]], dtype=torch.float64), torch.full((2,), 4.0,
                                                                                                    dtype=torch.float64))
    uv = cam.project(pts)
    cropped = cam.crop(-5, 8, 45, 58)  # reaches outside the image on the left
    assert cropped.image_size == (50, 50)
    assert torch.allclose(cropped.project(pts), uv - torch.tensor([-5.0, 8.0], dtype=torch.float64), atol=1e-9)
    resized = cropped.resize((100, 25))
    expect = (uv - torch.tensor([-5.0, 8.0], dtype=torch.float64)) * torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.allclose(resized.project(pts), expect, atol=1e-9)


def test_camera_sampling():
    cams = fly_around_cameras(8, distance=10.0, elevation_deg=30.0, up=(0.0, -1.0, 0.0))
    c = cams.center()
    assert torch.allclose(c.norm(dim=-1), torch.full((8,), 10.0), atol=1e-4)
    assert torch.allclose(-c[:, 1], torch.full((8,), 10 * math.sin(math.radians(30))), atol=1e-4)
    assert torch.allclose(cams.project(torch.zeros(1, 3).expand(8, 1, 3))[:, 0], torch.full((8, 2), 64.0),
                          atol=1e-3)
    # the object's up axis (-Y) points up in every image: a point above the origin projects above the centre
    above = cams.project(torch.tensor([[0.0, -1.0, 0.0]]).expand(8, 1, 3))[:, 0]
    assert (above[:, 1] < 64).all()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = sample_orbit_cameras(16, g1, distance_range=(3, 4), elevation_range_deg=(0, 45))
    b = sample_orbit_cameras(16, g2, distance_range=(3, 4), elevation_range_deg=(0, 45))
    assert torch.equal(a.R, b.R) and torch.equal(a.T, b.T)
    d = a.center().norm(dim=-1)
    assert (d >= 3 - 1e-5).all() and (d <= 4 + 1e-5).all()
    el = torch.rad2deg(torch.asin(-a.center()[:, 1] / d))
    assert (el >= -1e-3).all() and (el <= 45 + 1e-3).all()


def test_batch_plumbing():
    gen = torch.Generator().manual_seed(1)
    cam = random_camera(gen, b=4)
    assert len(cam) == 4 and len(cam[1]) == 1 and len(cam[1:3]) == 2
    assert torch.equal(PerspectiveCamera.stack([cam[0], cam[1:]]).R, cam.R)
    with pytest.raises(ValueError, match="share one image size"):
        PerspectiveCamera.stack([cam[0], cam[1].resize((10, 10))])
    with pytest.raises(ValueError, match="positive"):
        PerspectiveCamera(cam.R, cam.T, cam.focal_length, cam.principal_point, (0, 5))
