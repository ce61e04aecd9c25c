"""HoloFusion: generative 3D (HoloDiffusion + 2D super-resolution + distillation) for Blender.

Camera, grid and renderer code keeps PyTorch3D's conventions (row vectors, +X left, +Y up, +Z forward)
but is written in plain torch: pytorch3d has no installable build for this platform.
"""

__version__ = "0.1.0"

DEFAULT_MODEL = "apple"
"""The shipped model (a folder under models/) that ``holofusion generate`` and the server use by default."""
