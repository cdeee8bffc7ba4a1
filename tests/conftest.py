"""Fixtures shared by several test modules."""

import pytest

from labkit.engine.model import load_model


@pytest.fixture(scope="module")
def lm():
    """The embedded default model on the CPU (module scope: a test may adjust its config)."""
    return load_model("model", device="cpu")


@pytest.fixture(scope="module")
def lm16():
    """The embedded model on the GPU in bfloat16 (GPU tests only)."""
    import gc

    import torch

    yield load_model("model", device="cuda", dtype="bf16")
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def tiny():
    """synthetic:tiny on the CPU: the Llama architecture at toy size."""
    return load_model("synthetic:tiny", device="cpu")
