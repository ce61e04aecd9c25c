"""Perspective cameras in PyTorch3D's convention, written in plain torch.

pytorch3d has no installable build for this platform, so this module re-implements the part of its camera model that
CO3Dv2 depends on, keeping its conventions exactly so that CO3D annotations read correctly:

- row vectors: ``X_cam = X_world @ R + T``; the columns of ``R`` are the camera's left, up and forward axes in world
  coordinates, and the camera centre is ``C = -T @ R^T``;
- view axes: +X left, +Y up, +Z forward (into the scene);
- intrinsics in *isotropic NDC*: with ``s = min(H, W) / 2`` a focal length ``f`` is ``f * s`` pixels and a principal
  point ``p`` sits at pixel ``(W/2 - p_x s, H/2 - p_y s)``;
- screen space: ``(0, 0)`` is the top-left corner of the top-left pixel, ``(W, H)`` the bottom-right corner of the last
  one, so pixel centres are at ``+0.5``.

Conversions to OpenCV (``x_px ~ K (R_cv X + t_cv)``) and to Blender cameras (local -Z forward, +Y up, +X right) are
exact inverses of the constructors. Every camera carries a batch dimension ``B``; one image size ``(H, W)`` is shared
by the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import UserError

__all__ = [
    "PerspectiveCamera",
    "WORLD_UP",
    "fly_around_cameras",
    "look_at_cameras_on_sphere",
    "sample_orbit_cameras",
]

# CO3D worlds are not gravity aligned; HoloDiffusion renders its fly-arounds with this up vector. Our synthetic
# worlds use up = -Y exactly, which is the axis this vector is closest to.
CO3D_UP = (-0.0396, -0.8306, -0.5554)
WORLD_UP = (0.0, -1.0, 0.0)

# OpenCV's camera looks down +Z with +X right and +Y down: two axes flipped against PyTorch3D's.
_FLIP_XY = (-1.0, -1.0, 1.0)
# Blender's camera looks down -Z with +X right and +Y up: X and Z flipped against PyTorch3D's.
_FLIP_XZ = (-1.0, 1.0, -1.0)

INTRINSICS_FORMATS = ("ndc_isotropic", "ndc_norm_image_bounds")


def _as_tensor(x, dtype=None, device=None) -> Tensor:
    if isinstance(x, Tensor):
        t = x
        if dtype is not None or device is not None:
            t = t.to(dtype=dtype or t.dtype, device=device or t.device)
        return t
    t = torch.as_tensor(x, device=device)
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


def _check_size(image_size_hw) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size_hw)
    except (TypeError, ValueError):
        raise ValueError(f"image size must be two integers (H, W); got {image_size_hw!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive (H, W); got {(h, w)}")
    return h, w


@dataclass
class PerspectiveCamera:
    """A batch of B pinhole cameras in PyTorch3D's convention.

    Attributes:
        R: (B, 3, 3) world-to-view rotation for row vectors (``X_cam = X_world @ R + T``).
        T: (B, 3) world-to-view translation.
        focal_length: (B, 2) focal lengths (f_x, f_y) in isotropic NDC units (pixels / (min(H, W) / 2)).
        principal_point: (B, 2) principal point in isotropic NDC (+x points left, +y up, 0 is the image centre).
        image_size: (H, W) in pixels, shared by the batch.
    """

    R: Tensor
    T: Tensor
    focal_length: Tensor
    principal_point: Tensor
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        self.R = _as_tensor(self.R)
        dtype, device = self.R.dtype, self.R.device
        self.T = _as_tensor(self.T, dtype, device)
        self.focal_length = _as_tensor(self.focal_length, dtype, device)
        self.principal_point = _as_tensor(self.principal_point, dtype, device)
        if self.R.dim() == 2:
            self.R = self.R[None]
        if self.T.dim() == 1:
            self.T = self.T[None]
        b = self.R.shape[0]
        self.focal_length = self._per_camera_pair(self.focal_length, b, "focal_length")
        self.principal_point = self._per_camera_pair(self.principal_point, b, "principal_point")
        if self.R.shape != (b, 3, 3) or self.T.shape != (b, 3):
            raise ValueError(f"expected R (B,3,3) and T (B,3); got {tuple(self.R.shape)} and {tuple(self.T.shape)}")
        self.image_size = _check_size(self.image_size)

    @staticmethod
    def _per_camera_pair(x: Tensor, b: int, name: str) -> Tensor:
        if x.dim() == 0:
            x = x.expand(2)
        if x.dim() == 1:
            x = x.expand(2) if x.numel() == 1 else x
            x = x[None].expand(b, 2)
        if x.shape != (b, 2):
            raise ValueError(f"{name} must broadcast to ({b}, 2); got {tuple(x.shape)}")
        return x.contiguous()

    # ------------------------------------------------------------------ batch plumbing
    def __len__(self) -> int:
        return self.R.shape[0]

    def __getitem__(self, idx) -> PerspectiveCamera:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return PerspectiveCamera(self.R[idx], self.T[idx], self.focal_length[idx], self.principal_point[idx],
                                 self.image_size)

    @property
    def device(self) -> torch.device:
        return self.R.device

    @property
    def dtype(self) -> torch.dtype:
        return self.R.dtype

    def to(self, device=None, dtype=None) -> PerspectiveCamera:
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device or t.device, dtype=dtype or t.dtype)

        return PerspectiveCamera(mv(self.R), mv(self.T), mv(self.focal_length), mv(self.principal_point),
                                 self.image_size)

    @staticmethod
    def stack(cameras: Sequence[PerspectiveCamera]) -> PerspectiveCamera:
        """Concatenates camera batches that share one image size."""
        if not cameras:
            raise ValueError("cannot stack an empty list of cameras")
        sizes = {c.image_size for c in cameras}
        if len(sizes) != 1:
            raise ValueError(f"cameras to stack must share one image size; got {sorted(sizes)}")
        return PerspectiveCamera(
            torch.cat([c.R for c in cameras]), torch.cat([c.T for c in cameras]),
            torch.cat([c.focal_length for c in cameras]), torch.cat([c.principal_point for c in cameras]),
            cameras[0].image_size)

    def repeat_interleave(self, n: int) -> PerspectiveCamera:
        return PerspectiveCamera(self.R.repeat_interleave(n, 0), self.T.repeat_interleave(n, 0),
                                 self.focal_length.repeat_interleave(n, 0),
                                 self.principal_point.repeat_interleave(n, 0), self.image_size)

    # ------------------------------------------------------------------ intrinsics in pixels
    @property
    def _ndc_scale(self) -> float:
        h, w = self.image_size
        return min(h, w) / 2.0

    def pixel_intrinsics(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(fx, fy, cx, cy), each (B,), in pixels of the screen convention ((0,0) = top-left pixel's corner)."""
        h, w = self.image_size
        s = self._ndc_scale
        fx, fy = self.focal_length.unbind(-1)
        px, py = self.principal_point.unbind(-1)
        return fx * s, fy * s, w / 2.0 - px * s, h / 2.0 - py * s

    @classmethod
    def from_pixel_intrinsics(cls, R, T, fx, fy, cx, cy, image_size_hw) -> PerspectiveCamera:
        """Builds cameras from focal lengths and a principal point in pixels (fx, fy, cx, cy broadcast to (B,))."""
        h, w = _check_size(image_size_hw)
        R = _as_tensor(R)
        if R.dim() == 2:
            R = R[None]
        b = R.shape[0]
        s = min(h, w) / 2.0

        def vec(x) -> Tensor:
            return _as_tensor(x, R.dtype, R.device).reshape(-1).expand(b)

        fx, fy, cx, cy = vec(fx), vec(fy), vec(cx), vec(cy)
        focal = torch.stack([fx / s, fy / s], -1)
        pp = torch.stack([(w / 2.0 - cx) / s, (h / 2.0 - cy) / s], -1)
        return cls(R, T, focal, pp, (h, w))

    # ------------------------------------------------------------------ CO3D
    @classmethod
    def from_co3d(cls, viewpoint: dict, image_size_hw) -> PerspectiveCamera:
        """One camera (B=1) from a CO3D ``viewpoint`` record of an image of size ``image_size_hw`` = (H, W).

        Both of CO3D's intrinsics formats are read: ``ndc_isotropic`` (v2) and ``ndc_norm_image_bounds`` (v1, where
        the x and y axes are normalised by W/2 and H/2 separately). Anything else raises ``UserError``.
        """
        h, w = _check_size(image_size_hw)
        missing = [k for k in ("R", "T", "focal_length", "principal_point") if k not in viewpoint]
        if missing:
            raise UserError(f"viewpoint lacks {', '.join(missing)}; it needs R, T, focal_length and principal_point")
        fmt = viewpoint.get("intrinsics_format", "ndc_norm_image_bounds")
        if fmt not in INTRINSICS_FORMATS:
            raise UserError(f"viewpoint.intrinsics_format is {fmt!r}; expected one of {', '.join(INTRINSICS_FORMATS)}")
        dtype = torch.float64
        try:
            R = torch.tensor(viewpoint["R"], dtype=dtype).reshape(3, 3)
            T = torch.tensor(viewpoint["T"], dtype=dtype).reshape(3)
            f = torch.tensor(viewpoint["focal_length"], dtype=dtype).reshape(-1).expand(2).clone()
            p = torch.tensor(viewpoint["principal_point"], dtype=dtype).reshape(2)
        except (RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"viewpoint has a malformed field ({e}); expected R 3x3, T 3, focal_length 2, "
                            "principal_point 2") from None
        if fmt == "ndc_norm_image_bounds":
            # Per-axis normalisation: x by W/2, y by H/2. Re-express in isotropic units of min(H, W)/2.
            s = min(h, w) / 2.0
            half = torch.tensor([w / 2.0, h / 2.0], dtype=dtype)
            f = f * half / s
            p = p * half / s
        return cls(R[None], T[None], f[None], p[None], (h, w))

    def to_co3d(self) -> dict:
        """The CO3D ``viewpoint`` record (``ndc_isotropic``) of a single camera."""
        if len(self) != 1:
            raise ValueError(f"to_co3d needs a single camera; this batch holds {len(self)}")
        return {
            "R": self.R[0].tolist(),
            "T": self.T[0].tolist(),
            "focal_length": self.focal_length[0].tolist(),
            "principal_point": self.principal_point[0].tolist(),
            "intrinsics_format": "ndc_isotropic",
        }

    # ------------------------------------------------------------------ OpenCV
    @classmethod
    def from_opencv(cls, K, R, t, image_size_hw) -> PerspectiveCamera:
        """Cameras from OpenCV's ``x_px ~ K (R X + t)`` with K (B,3,3), R (B,3,3), t (B,3) (batch dims optional).

        OpenCV's pixel centres are at integer coordinates; PyTorch3D's screen space puts them at +0.5. Following
        PyTorch3D's own conversion (``cameras_from_opencv_projection``) the principal point is taken over unchanged,
        so ``project`` reproduces ``cv2.projectPoints`` numerically.
        """
        K = _as_tensor(K)
        if K.dim() == 2:
            K = K[None]
        R_cv = _as_tensor(R, K.dtype, K.device)
        t_cv = _as_tensor(t, K.dtype, K.device)
        if R_cv.dim() == 2:
            R_cv = R_cv[None]
        t_cv = t_cv.reshape(R_cv.shape[0], 3)
        if torch.any(K[:, 0, 1].abs() > 1e-9 * K[:, 0, 0].abs()):
            raise ValueError("K has a non-zero skew K[0,1]; only skew-free intrinsics are supported")
        flip = torch.tensor(_FLIP_XY, dtype=K.dtype, device=K.device)
        # R_cv = F R^T  =>  R = R_cv^T F (F = diag(-1,-1,1) is its own inverse); t_cv = F T.
        R_p3d = R_cv.transpose(1, 2) * flip[None, None, :]
        T_p3d = t_cv * flip
        return cls.from_pixel_intrinsics(R_p3d, T_p3d, K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2],
                                         image_size_hw)

    def to_opencv(self) -> tuple[Tensor, Tensor, Tensor]:
        """(K (B,3,3), R (B,3,3), t (B,3)) such that OpenCV's projection equals ``project``."""
        fx, fy, cx, cy = self.pixel_intrinsics()
        K = torch.zeros(len(self), 3, 3, dtype=self.dtype, device=self.device)
        K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = fx, fy, cx, cy, 1.0
        flip = torch.tensor(_FLIP_XY, dtype=self.dtype, device=self.device)
        R_cv = flip[None, :, None] * self.R.transpose(1, 2)
        t_cv = self.T * flip
        return K, R_cv, t_cv

    # ------------------------------------------------------------------ Blender
    @classmethod
    def from_blender(cls, matrix_world, lens_mm, sensor_width_mm, image_size_hw, shift_x=0.0, shift_y=0.0,
                     sensor_fit: str = "HORIZONTAL") -> PerspectiveCamera:
        """Cameras from Blender camera objects: ``matrix_world`` (B,4,4) or (4,4), lens and sensor width in mm.

        ``sensor_fit`` is Blender's: HORIZONTAL maps the sensor width to the image width; AUTO maps it to the larger
        image dimension. Object scale in ``matrix_world`` is ignored (Blender ignores it for projection too).
        ``shift_x``/``shift_y`` are Blender's lens shift, in units of the larger image dimension.
        """
        h, w = _check_size(image_size_hw)
        M = _as_tensor(matrix_world)
        if M.dim() == 2:
            M = M[None]
        if M.shape[-2:] != (4, 4):
            raise ValueError(f"matrix_world must be (B,4,4); got {tuple(M.shape)}")
        b = M.shape[0]
        rot = M[:, :3, :3]
        rot = rot / rot.norm(dim=1, keepdim=True)  # drop object scale: columns are the camera's local axes
        centre = M[:, :3, 3]
        flip = torch.tensor(_FLIP_XZ, dtype=M.dtype, device=M.device)
        R = rot * flip[None, None, :]  # local +X right/-Z forward -> left/forward
        T = -torch.einsum("bi,bij->bj", centre, R)
        if sensor_fit == "HORIZONTAL":
            span = float(w)
        elif sensor_fit == "AUTO":
            span = float(max(h, w))
        else:
            raise ValueError(f"sensor_fit {sensor_fit!r} is not supported; use 'HORIZONTAL' or 'AUTO'")
        lens = _as_tensor(lens_mm, M.dtype, M.device).reshape(-1).expand(b)
        f_px = lens / float(sensor_width_mm) * span
        big = float(max(h, w))
        sx = _as_tensor(shift_x, M.dtype, M.device).reshape(-1).expand(b)
        sy = _as_tensor(shift_y, M.dtype, M.device).reshape(-1).expand(b)
        # A positive shift moves the frame right/up, so the optical axis lands left of / below the centre.
        return cls.from_pixel_intrinsics(R, T, f_px, f_px, w / 2.0 - sx * big, h / 2.0 + sy * big, (h, w))

    def to_blender(self, sensor_width_mm: float = 36.0, sensor_fit: str = "HORIZONTAL") -> dict[str, Tensor]:
        """Blender camera settings: ``matrix_world`` (B,4,4), ``lens_mm`` (B,), ``shift_x``/``shift_y`` (B,).

        Blender has one focal length, so cameras with fx != fy (non-square pixels) raise ``ValueError``.
        """
        h, w = self.image_size
        fx, fy, cx, cy = self.pixel_intrinsics()
        if torch.any((fx - fy).abs() > 1e-6 * fx.abs()):
            raise ValueError("Blender cameras have square pixels; this camera has fx != fy")
        span = float(w) if sensor_fit == "HORIZONTAL" else float(max(h, w))
        if sensor_fit not in ("HORIZONTAL", "AUTO"):
            raise ValueError(f"sensor_fit {sensor_fit!r} is not supported; use 'HORIZONTAL' or 'AUTO'")
        flip = torch.tensor(_FLIP_XZ, dtype=self.dtype, device=self.device)
        M = torch.zeros(len(self), 4, 4, dtype=self.dtype, device=self.device)
        M[:, :3, :3] = self.R * flip[None, None, :]
        M[:, :3, 3] = self.center()
        M[:, 3, 3] = 1.0
        big = float(max(h, w))
        return {
            "matrix_world": M,
            "lens_mm": fx / span * sensor_width_mm,
            "sensor_width_mm": torch.full_like(fx, sensor_width_mm),
            "shift_x": (w / 2.0 - cx) / big,
            "shift_y": (cy - h / 2.0) / big,
        }

    # ------------------------------------------------------------------ look-at
    @classmethod
    def look_at(cls, eye, at=(0.0, 0.0, 0.0), up=WORLD_UP, focal_length=2.0, image_size_hw=(128, 128),
                principal_point=0.0) -> PerspectiveCamera:
        """Cameras at ``eye`` (B,3) looking at ``at`` ((B,3) or (3,)), image "up" along ``up`` as far as possible.

        ``focal_length`` is in isotropic NDC units (a float or (B,) / (B,2)).
        """
        eye = _as_tensor(eye)
        if eye.dim() == 1:
            eye = eye[None]
        at = _as_tensor(at, eye.dtype, eye.device).expand_as(eye)
        up_v = _as_tensor(up, eye.dtype, eye.device).reshape(-1, 3).expand_as(eye)
        z = torch.nn.functional.normalize(at - eye, dim=-1)
        x = torch.linalg.cross(up_v, z, dim=-1)
        # Looking straight along `up` leaves the roll undefined; pick any axis orthogonal to z instead of NaNs.
        degenerate = x.norm(dim=-1) < 1e-8
        if degenerate.any():
            alt = torch.tensor([1.0, 0.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
            alt = torch.where((z[:, :1].abs() > 0.9), torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype,
                                                                   device=eye.device).expand_as(eye), alt)
            x = torch.where(degenerate[:, None], torch.linalg.cross(alt, z, dim=-1), x)
        x = torch.nn.functional.normalize(x, dim=-1)
        y = torch.linalg.cross(z, x, dim=-1)
        R = torch.stack([x, y, z], dim=-1)  # columns: left, up, forward
        T = -torch.einsum("bi,bij->bj", eye, R)
        b = eye.shape[0]
        f = _as_tensor(focal_length, eye.dtype, eye.device)
        if f.dim() <= 1:  # a float, or one focal length per camera
            f = f.reshape(-1, 1).expand(b, 2)
        return cls(R, T, f, principal_point, image_size_hw)

    # ------------------------------------------------------------------ geometry
    def center(self) -> Tensor:
        """(B, 3) camera centres in world coordinates (C = -T R^T)."""
        return -torch.einsum("bj,bij->bi", self.T, self.R)

    def world_to_view(self, points: Tensor) -> Tensor:
        """(B,N,3) or (N,3) world points -> (B,N,3) view-space points."""
        pts = self._batch_points(points)
        return pts @ self.R + self.T[:, None, :]

    def _batch_points(self, points: Tensor) -> Tensor:
        pts = _as_tensor(points, self.dtype, self.device)
        if pts.dim() == 2:
            pts = pts[None].expand(len(self), -1, -1)
        if pts.dim() != 3 or pts.shape[-1] != 3 or pts.shape[0] != len(self):
            raise ValueError(f"points must be (N,3) or ({len(self)},N,3); got {tuple(pts.shape)}")
        return pts

    def project(self, points: Tensor, return_depth: bool = False):
        """Pixel coordinates of world points, (0,0) at the top-left corner of the top-left pixel.

        Args:
            points: (N,3) (shared by all cameras) or (B,N,3).
        Returns:
            (N,2) when the batch holds one camera and ``points`` is (N,3), else (B,N,2); with ``return_depth`` also
            the z-depth in view space, shaped like the pixels without the last axis.
        """
        squeeze = points.dim() == 2 and len(self) == 1
        Xc = self.world_to_view(points)
        fx, fy, cx, cy = self.pixel_intrinsics()
        z = Xc[..., 2]
        # +X is left and +Y up in view space, while pixel x grows rightwards and y downwards.
        u = cx[:, None] - fx[:, None] * Xc[..., 0] / z
        v = cy[:, None] - fy[:, None] * Xc[..., 1] / z
        uv = torch.stack([u, v], -1)
        if squeeze:
            uv, z = uv[0], z[0]
        return (uv, z) if return_depth else uv

    def pixel_centers(self) -> Tensor:
        """(H*W, 2) pixel-centre coordinates in row-major order."""
        h, w = self.image_size
        ys = torch.arange(h, dtype=self.dtype, device=self.device) + 0.5
        xs = torch.arange(w, dtype=self.dtype, device=self.device) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)

    def rays(self, xy: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """World-space rays through pixels.

        Args:
            xy: (B,N,2) or (N,2) pixel coordinates; None means every pixel centre in row-major order (N = H*W).
        Returns:
            origins (B,N,3) (the camera centres) and directions (B,N,3). Directions are *not* unit length: their
            view-space z is 1, so a point at ray parameter t has z-depth t (CO3D depth maps are z-depth).
        """
        if xy is None:
            xy = self.pixel_centers()
        xy = _as_tensor(xy, self.dtype, self.device)
        if xy.dim() == 2:
            xy = xy[None].expand(len(self), -1, -1)
        fx, fy, cx, cy = self.pixel_intrinsics()
        dx = (cx[:, None] - xy[..., 0]) / fx[:, None]
        dy = (cy[:, None] - xy[..., 1]) / fy[:, None]
        d_view = torch.stack([dx, dy, torch.ones_like(dx)], -1)
        directions = d_view @ self.R.transpose(1, 2)
        origins = self.center()[:, None, :].expand_as(directions)
        return origins, directions

    def unproject(self, xy: Tensor, depth: Tensor) -> Tensor:
        """World points at z-depth ``depth`` (B,N) or (N,) through pixels ``xy`` (B,N,2) or (N,2)."""
        o, d = self.rays(xy)
        depth = _as_tensor(depth, self.dtype, self.device)
        if depth.dim() == 1:
            depth = depth[None].expand(len(self), -1)
        return o + d * depth[..., None]

    # ------------------------------------------------------------------ image edits
    def crop(self, x0: float, y0: float, x1: float, y1: float) -> PerspectiveCamera:
        """The camera of the pixel box [x0, x1) x [y0, y1) (which may reach outside the image)."""
        fx, fy, cx, cy = self.pixel_intrinsics()
        w, h = int(round(x1 - x0)), int(round(y1 - y0))
        return PerspectiveCamera.from_pixel_intrinsics(self.R, self.T, fx, fy, cx - x0, cy - y0, (h, w))

    def resize(self, new_hw) -> PerspectiveCamera:
        """The camera of the image resized to ``new_hw`` = (H', W') (axes scaled independently)."""
        h2, w2 = _check_size(new_hw)
        h, w = self.image_size
        sx, sy = w2 / w, h2 / h
        fx, fy, cx, cy = self.pixel_intrinsics()
        return PerspectiveCamera.from_pixel_intrinsics(self.R, self.T, fx * sx, fy * sy, cx * sx, cy * sy, (h2, w2))


# ---------------------------------------------------------------------- camera sampling
def _up_basis(up, dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    """An orthonormal basis (a, b, u) with u along ``up``; azimuth 0 looks along a."""
    u = torch.nn.functional.normalize(_as_tensor(up, dtype, device).reshape(3), dim=0)
    ref = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=device)
    if torch.abs(u @ ref) > 0.9:
        ref = torch.tensor([1.0, 0.0, 0.0], dtype=dtype, device=device)
    a = torch.nn.functional.normalize(ref - (ref @ u) * u, dim=0)
    b = torch.linalg.cross(u, a, dim=0)
    return a, b, u


def _eyes(azimuth: Tensor, elevation: Tensor, distance: Tensor, up, at) -> Tensor:
    a, b, u = _up_basis(up, azimuth.dtype, azimuth.device)
    ce = torch.cos(elevation)
    direction = (ce * torch.cos(azimuth))[:, None] * a + (ce * torch.sin(azimuth))[:, None] * b \
        + torch.sin(elevation)[:, None] * u
    return _as_tensor(at, azimuth.dtype, azimuth.device) + distance[:, None] * direction


def fly_around_cameras(n: int, distance: float = 10.0, elevation_deg: float = 30.0, focal_length: float = 3.2,
                       image_size_hw=(128, 128), up=WORLD_UP, at=(0.0, 0.0, 0.0), azimuth_offset_deg: float = 0.0,
                       dtype: torch.dtype = torch.float32) -> PerspectiveCamera:
    """``n`` cameras evenly spaced on a circle around ``at``, for turntables and sample sheets.

    Elevation is measured from the plane orthogonal to ``up`` (positive: looking down on the object). The defaults are
    HoloDiffusion's fly-around: distance 10, NDC focal 3.2, 30 degrees above the object.
    """
    if n <= 0:
        raise ValueError(f"need at least one camera; got n={n}")
    az = torch.arange(n, dtype=dtype) * (2 * math.pi / n) + math.radians(azimuth_offset_deg)
    el = torch.full((n,), math.radians(elevation_deg), dtype=dtype)
    eyes = _eyes(az, el, torch.full((n,), float(distance), dtype=dtype), up, at)
    return PerspectiveCamera.look_at(eyes, at, up, focal_length, image_size_hw)


def look_at_cameras_on_sphere(n: int, distance: float, focal_length: float, image_size_hw=(128, 128),
                              elevation_range_deg=(-5.0, 50.0), at=(0.0, 0.0, 0.0), up=WORLD_UP,
                              dtype: torch.dtype = torch.float32) -> PerspectiveCamera:
    """``n`` cameras spread evenly over the band of the sphere between two elevations, looking at ``at``.

    A Fibonacci spiral: camera i sits at the height that splits the band's area into equal parts (uniform in
    sin(elevation)) and turns by the golden angle from the previous one, so any number of views covers the band
    without clusters or gaps.
    """
    if n <= 0:
        raise ValueError(f"need at least one camera; got n={n}")
    lo, hi = (math.sin(math.radians(e)) for e in elevation_range_deg)
    i = torch.arange(n, dtype=torch.float64)
    el = torch.asin(lo + (hi - lo) * (i + 0.5) / n)
    az = (i * math.pi * (3.0 - math.sqrt(5.0))) % (2 * math.pi)
    eyes = _eyes(az.to(dtype), el.to(dtype), torch.full((n,), float(distance), dtype=dtype), up, (0.0, 0.0, 0.0))
    target = _as_tensor(at, dtype).reshape(1, 3)
    return PerspectiveCamera.look_at(eyes + target, target.expand(n, 3), up, focal_length, image_size_hw)


def sample_orbit_cameras(n: int, generator: torch.Generator, distance_range=(8.0, 12.0),
                         elevation_range_deg=(-10.0, 60.0), focal_length=3.2, image_size_hw=(128, 128), up=WORLD_UP,
                         at=(0.0, 0.0, 0.0), jitter_at: float = 0.0,
                         dtype: torch.dtype = torch.float32) -> PerspectiveCamera:
    """``n`` random training cameras around ``at``: uniform azimuth, elevation and distance in the given ranges.

    ``focal_length`` may be a float or a (lo, hi) range. ``jitter_at`` moves each look-at point by up to that much
    per axis so the object is not always centred. All draws come from ``generator``.
    """
    if n <= 0:
        raise ValueError(f"need at least one camera; got n={n}")

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=dtype)

    az = uniform(0.0, 2 * math.pi)
    el = uniform(math.radians(elevation_range_deg[0]), math.radians(elevation_range_deg[1]))
    dist = uniform(*distance_range)
    target = _as_tensor(at, dtype).reshape(1, 3).expand(n, 3)
    if jitter_at:
        target = target + (torch.rand(n, 3, generator=generator, dtype=dtype) * 2 - 1) * jitter_at
    eyes = _eyes(az, el, dist, up, (0.0, 0.0, 0.0)) + target
    if isinstance(focal_length, (tuple, list)):
        f = uniform(*focal_length)
    else:
        f = torch.full((n,), float(focal_length), dtype=dtype)
    return PerspectiveCamera.look_at(eyes, target, up, f, image_size_hw)
