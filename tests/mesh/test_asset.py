"""Grid -> asset: extraction (watertight, floaters gone, decimation faithful), UV atlas and bake (texture matches the
grid), binary glTF (the Khronos validator and Blender's own importer read it), and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from holofusion.distill import ExplicitField
from holofusion.grid import VoxelGrid
from holofusion.mesh.asset import AssetConfig, make_asset, to_gltf_space
from holofusion.mesh.bake import bake_albedo, fill_texture, rasterize_uv, sample_texture
from holofusion.mesh.extract import EmptyGridError, Mesh, MeshConfig, extract_mesh
from holofusion.mesh.gltf import read_glb

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent


def blob_grid(res: int = 64, floater: bool = False) -> VoxelGrid:
    """An explicit grid: a smooth ellipsoid (raw density rising to 8 inside) coloured by position, plus optionally
    a small separate speck (a floater)."""
    g = VoxelGrid(torch.zeros(1, 4, res, res, res), -2.0, 2.0)
    c = g.cell_centers()
    r = torch.sqrt((c[:, 0] / 1.2) ** 2 + (c[:, 1] / 0.9) ** 2 + (c[:, 2] / 1.0) ** 2)
    density = 8 * (1 - r)
    if floater:
        speck = (c - torch.tensor([1.6, 1.6, 1.6])).norm(dim=-1)
        density = torch.maximum(density, 8 * (0.12 - speck) / 0.12)
    f = torch.stack([density, 2 * torch.sin(2 * c[:, 0]), 1.5 * c[:, 1], torch.cos(3 * c[:, 2])])
    return VoxelGrid(f.reshape(1, 4, res, res, res), -2.0, 2.0)


@pytest.fixture(scope="module")
def asset():
    return make_asset(blob_grid(), ExplicitField(), AssetConfig(texture_size=512, mesh=MeshConfig(
        lattice=96, target_faces=6000)), category="apple")


# --------------------------------------------------------------------------------------------------------------------
# extraction


def _surface_samples(mesh: Mesh, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n points uniform over the area: (points, face index, barycentrics)."""
    rng = np.random.default_rng(seed)
    v = mesh.vertices[mesh.faces].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)
    face = rng.choice(len(area), n, p=area / area.sum())
    b = rng.dirichlet([1, 1, 1], n)
    return np.einsum("nk,nkd->nd", b, v[face]), face, b


def _chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean nearest-neighbour distance (not squared) between point sets."""
    from scipy.spatial import cKDTree

    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def test_closed_object_is_watertight_and_faces_point_out():
    mesh = extract_mesh(blob_grid(), ExplicitField(), MeshConfig(lattice=64, target_faces=3000))
    assert mesh.is_watertight()
    assert 2500 <= mesh.n_faces <= 3000
    # outward: normals point away from the centre almost everywhere
    n = mesh.normals()
    assert float((np.einsum("ij,ij->i", n, mesh.vertices) > 0).mean()) > 0.99


def test_floaters_are_removed():
    grid = blob_grid(floater=True)
    kept = extract_mesh(grid, ExplicitField(), MeshConfig(lattice=64, target_faces=0, smooth_iterations=0))
    everything = extract_mesh(grid, ExplicitField(), MeshConfig(lattice=64, target_faces=0, smooth_iterations=0,
                                                                min_component=0.0))
    assert everything.n_faces > kept.n_faces
    assert float(np.abs(kept.vertices).max()) < 1.4  # nothing left near the speck at (1.6, 1.6, 1.6)
    assert float(np.abs(everything.vertices).max()) > 1.4


def test_decimated_mesh_stays_on_the_dense_surface():
    grid = blob_grid(96)
    dense = extract_mesh(grid, ExplicitField(), MeshConfig(lattice=128, target_faces=0, smooth_iterations=0))
    small = extract_mesh(grid, ExplicitField(), MeshConfig(lattice=128, target_faces=2000, smooth_iterations=0))
    assert dense.n_faces > 15 * small.n_faces
    d = _chamfer(_surface_samples(dense, 20000, 0)[0], _surface_samples(small, 20000, 1)[0])
    size = float(np.linalg.norm(dense.vertices.max(0) - dense.vertices.min(0)))
    assert d < 0.005 * size, f"Chamfer {d:.5f} against object size {size:.3f}"
    assert small.is_watertight()


def test_empty_grid_says_nothing_to_extract():
    empty = VoxelGrid(torch.full((1, 4, 16, 16, 16), -10.0), -2.0, 2.0)
    with pytest.raises(EmptyGridError, match="nothing to extract"):
        extract_mesh(empty, ExplicitField())


# --------------------------------------------------------------------------------------------------------------------
# UVs and bake


def test_texture_matches_the_grid_colour_at_random_surface_points(asset):
    w = asset.world_mesh
    points, face, bary = _surface_samples(w, 10000, 7)
    uv = np.einsum("nk,nkd->nd", bary, w.uvs[w.faces[face]].astype(np.float64))
    looked_up = sample_texture(asset.texture, uv)
    grid = blob_grid()
    with torch.no_grad():
        truth = ExplicitField().albedo(grid.sample(torch.from_numpy(points).float()[None])[0]).double().numpy()
    mae = float(np.abs(looked_up - truth).mean())
    assert mae <= 3 / 255, f"texture colour error {mae * 255:.2f}/255"


def test_a_decoder_is_baked_with_the_colour_it_renders_not_its_colour_head_alone(asset):
    """A trained coarse decoder keeps much of its colour in the view branch's residual (the shipped apple model's
    colour head alone gave green textures for red apples): the texture holds the rendered colour averaged over
    directions (``mean_colour``)."""
    from holofusion.nets.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(n_features_in=4, hidden_dim=16, n_hidden_layers=2, n_harmonics_dir=2))
    with torch.no_grad():
        dec.view_out.bias.copy_(torch.tensor([2.0, -2.0, 0.0]))  # the view branch moves red up, green down
    w = asset.world_mesh
    grid = blob_grid()
    texture, _ = bake_albedo(w, grid, dec, size=256)
    points, face, bary = _surface_samples(w, 4000, 5)
    looked_up = sample_texture(texture, np.einsum("nk,nkd->nd", bary, w.uvs[w.faces[face]].astype(np.float64)))
    with torch.no_grad():
        feats = grid.sample(torch.from_numpy(points).float()[None])[0]
        rendered, head = dec.mean_colour(feats).double().numpy(), dec.albedo(feats).double().numpy()
    assert np.abs(rendered - head).mean() > 0.1  # the two differ here ...
    assert np.abs(looked_up - rendered).mean() < 0.02  # ... and the texture is the rendered colour


def test_every_texel_a_lookup_on_the_surface_reads_was_baked_or_dilated(asset):
    """The four texels of each bilinear lookup at surface points lie in the rasterised coverage or the rings the
    baker dilates into (filled from their own chart), never in the far (push-pull) fill."""
    from scipy.ndimage import binary_dilation

    w = asset.world_mesh
    size = asset.texture.shape[0]
    texel, _, _ = rasterize_uv(w, size)
    covered = np.zeros(size * size, bool)
    covered[texel] = True
    ring = binary_dilation(covered.reshape(size, size), structure=np.ones((3, 3), bool), iterations=4)
    _, face, bary = _surface_samples(w, 10000, 3)
    uv = np.einsum("nk,nkd->nd", bary, w.uvs[w.faces[face]].astype(np.float64))
    x = np.floor(uv[:, 0] * size - 0.5).astype(int)
    y = np.floor(uv[:, 1] * size - 0.5).astype(int)
    for dx in (0, 1):
        for dy in (0, 1):
            xs, ys = np.clip(x + dx, 0, size - 1), np.clip(y + dy, 0, size - 1)
            assert bool(ring[ys, xs].all())
    # and every triangle sure to hold a texel centre got one: a disk of radius sqrt(2)/2 always holds a lattice
    # point, so a triangle whose inscribed circle is larger must own at least one texel
    uvs = w.uvs[w.faces].astype(np.float64) * size
    area = 0.5 * np.abs(np.cross(uvs[:, 1] - uvs[:, 0], uvs[:, 2] - uvs[:, 0]))
    perimeter = sum(np.linalg.norm(uvs[:, i] - uvs[:, (i + 1) % 3], axis=1) for i in range(3))
    has = np.zeros(w.n_faces, bool)
    has[rasterize_uv(w, size)[1]] = True
    sure = 2 * area / perimeter > 0.75
    assert sure.sum() > 0.5 * w.n_faces and bool(has[sure].all())


def test_fill_reaches_every_texel_and_keeps_the_baked_ones():
    img = np.zeros((32, 32, 3), np.float32)
    mask = np.zeros((32, 32), bool)
    img[4:8, 4:8] = [1.0, 0.0, 0.0]
    mask[4:8, 4:8] = True
    img[20:24, 20:28] = [0.0, 0.0, 1.0]
    mask[20:24, 20:28] = True
    out = fill_texture(img, mask, dilate=2)
    assert np.array_equal(out[mask], img[mask])
    assert (out.sum(-1) > 0.99).all()  # every texel holds a chart colour (they sum to 1 here), none left black
    assert np.allclose(out[0, 0], [1, 0, 0], atol=0.05) and np.allclose(out[31, 31], [0, 0, 1], atol=0.05)


def test_gltf_space_is_metres_up_y_on_the_ground():
    v = np.array([[0, -1, 0], [0, 1, 0], [2, 0, 0], [-2, 0, 1]], np.float32)  # world up is -Y
    out, scale = to_gltf_space(v, 0.5)
    assert np.isclose(out[:, 1].min(), 0) and np.isclose(out[0, 1], out[:, 1].max())  # world -Y is glTF +Y
    assert np.isclose(np.ptp(out, 0).max(), 0.5) and np.isclose(scale, 0.125)
    assert np.isclose(out[:, 0].min(), -out[:, 0].max())


# --------------------------------------------------------------------------------------------------------------------
# glTF


def _validator() -> tuple[str, dict[str, str]] | None:
    """(node, env) when Node.js and the gltf-validator package are present (CI installs it into .ci/gltf)."""
    node = shutil.which("node")
    if node is None:
        return None
    roots = [os.environ.get("HOLOFUSION_GLTF_VALIDATOR", ""), str(HERE.parents[1] / ".ci" / "gltf" / "node_modules")]
    for root in roots:
        if root and (Path(root) / "gltf-validator").is_dir():
            return node, dict(os.environ, NODE_PATH=root)
    return None


def test_glb_passes_the_khronos_validator(asset, tmp_path):
    found = _validator()
    if found is None:
        pytest.skip("Node.js with the gltf-validator package is not installed (.ci/run installs it)")
    node, env = found
    path = tmp_path / "a.glb"
    path.write_bytes(asset.glb(name="apple_1", extras={"holofusion": {"seed": 1}}))
    r = subprocess.run([node, str(HERE / "validate_gltf.js"), str(path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    issues = json.loads(r.stdout)["issues"]
    assert issues["numErrors"] == 0, issues["messages"]


def test_glb_round_trip_keeps_every_array(asset):
    data = read_glb(asset.glb())
    assert np.array_equal(data["positions"], asset.mesh.vertices)
    assert np.array_equal(data["uvs"], asset.mesh.uvs)
    assert np.array_equal(data["faces"], asset.mesh.faces.astype(np.uint32))
    assert np.allclose(np.linalg.norm(data["normals"], axis=1), 1, atol=1e-5)
    assert data["png"][:8] == b"\x89PNG\r\n\x1a\n"
    mat = data["json"]["materials"][0]["pbrMetallicRoughness"]
    assert mat["baseColorTexture"]["index"] == 0 and mat["metallicFactor"] == 0.0


BLENDER_IMPORT = r"""
import json, sys
import bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.import_scene.gltf(filepath=sys.argv[1])
objs = [o for o in bpy.context.scene.objects if o.type == "MESH"]
o = objs[0]
mat = o.active_material
tex = [n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"]
bsdf = [n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED"][0]
linked = bsdf.inputs["Base Color"].is_linked and bsdf.inputs["Base Color"].links[0].from_node.type == "TEX_IMAGE"
zs = [(o.matrix_world @ v.co).z for v in o.data.vertices]
xs = [(o.matrix_world @ v.co).x for v in o.data.vertices]
ys = [(o.matrix_world @ v.co).y for v in o.data.vertices]
print("RESULT" + json.dumps({"meshes": len(objs), "faces": len(o.data.polygons), "textures": len(tex),
    "size": list(tex[0].image.size) if tex else None, "linked": linked, "zmin": min(zs), "zmax": max(zs),
    "xspan": max(xs) - min(xs), "yspan": max(ys) - min(ys), "uv_layers": len(o.data.uv_layers),
    "extras": o.get("holofusion") is not None}))
"""


def test_blender_imports_the_glb_with_its_texture(asset, tmp_path):
    path = tmp_path / "a.glb"
    path.write_bytes(asset.glb(name="apple_1", extras={"holofusion": {"seed": 1}}))
    r = subprocess.run([sys.executable, "-c", BLENDER_IMPORT, str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.split("RESULT", 1)[1].strip().splitlines()[0])
    assert result["meshes"] == 1 and result["faces"] == asset.mesh.n_faces
    assert result["textures"] == 1 and result["size"] == [512, 512] and result["linked"]
    assert result["uv_layers"] == 1 and result["extras"]
    # Blender is +Z up: the object stands on z = 0 and its height is glTF's y extent
    assert abs(result["zmin"]) < 1e-4
    assert abs(result["zmax"] - float(asset.mesh.vertices[:, 1].max())) < 1e-4
    assert max(result["xspan"], result["yspan"], result["zmax"]) == pytest.approx(0.08, abs=1e-4)  # an apple
