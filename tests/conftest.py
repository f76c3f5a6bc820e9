"""Shared pytest setup: offline, quiet, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's fusion_bench cache out of the user's home."""
    cache = tmp_path_factory.getbasetemp() / "fb_cache"
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(cache))
    yield


def perturbed(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy of a state dict: float tensors plus seeded Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype))
            if v.is_floating_point() else v.clone() for k, v in sd.items()}
