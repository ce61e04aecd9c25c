"""Grid -> Blender-ready asset: extract.py (marching cubes, cleanup, decimation), uv.py (xatlas), bake.py
(albedo into a texture), gltf.py (binary glTF 2.0), asset.py (the whole chain)."""
