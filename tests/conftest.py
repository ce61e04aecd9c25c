"""Shared fixtures: a tiny procedural dataset and tiny trained models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: bit-identical results and no oversubscription of a 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"data", "holodiffusion", "superres", "pipeline"}: a 6-object apple set (8 views, 32 px), a tiny HoloDiffusion
    run trained through all its phases, a tiny super-resolution run on it, and a pipeline folder holding both."""
    from holofusion.data.synth import synthesize
    from holofusion.train import train_holodiffusion
    from holofusion.train_superres import train_superres

    root = tmp_path_factory.mktemp("tiny_models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = synthesize("apple", sequences=6, views=8, size=32, out=root / "data", workers=1, progress=False)
        hd = root / "hd"
        train_holodiffusion(str(data), "apple", "tiny", str(hd), progress=False)
        sr = root / "sr"
        train_superres(str(hd), str(data), "tiny", str(sr), progress=False)
    finally:
        torch.set_num_threads(threads)
    pipe = root / "pipe"
    pipe.mkdir()
    (pipe / "holodiffusion.safetensors").write_bytes((hd / "model.safetensors").read_bytes())
    (pipe / "superres.safetensors").write_bytes((sr / "model.safetensors").read_bytes())
    return {"data": Path(data), "holodiffusion": hd, "superres": sr, "pipeline": pipe}
