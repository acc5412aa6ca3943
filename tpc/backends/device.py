"""Where tensors live. The limit's evaluators create their tensors with torch's factory functions
(zeros, tensor, as_tensor, eye, ...), so running an evaluation inside `on(device)` moves all of it
to that device, without a device argument threaded through every rule. Random draws come from CPU
generators and are moved (`normals`): the limit's particles are then the same on every device, and
a CUDA limit equals the CPU one to round-off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from tpc import memory
from tpc.errors import TpcError


def check(device: str) -> None:
    """A clear error where CUDA is asked for and absent (or the index does not exist)."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise TpcError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise TpcError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                       f"numbered from 0")


def memory_gb(device: str, memory_gb: float | None) -> float | None:
    """The default budget on a CUDA device: half of its memory, unless $TPC_MEMORY_GB or --memory-gb
    says otherwise (the host's memory is not what bounds it)."""
    if memory_gb is not None or not device.startswith("cuda") or memory.env_gb() is not None:
        return memory_gb
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return round(total / 2**31, 1)


@contextmanager
def on(device: str) -> Iterator[None]:
    """Factory functions inside default to `device` (a no-op for the CPU)."""
    check(device)
    if device == "cpu":
        yield
        return
    with torch.device(device):
        yield


def normals(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Standard normals drawn by a CPU generator, on the current default device."""
    return torch.randn(shape, generator=generator, dtype=dtype, device="cpu").to(torch.get_default_device())


STAGING_BYTES = 2**28  # a pinned buffer of 256 MB: device-to-host copies from pageable memory are slow


def to_host(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy array of `t`. From CUDA, in slices through one pinned buffer: a copy into
    pinned memory runs at the bus's speed, and the copy out of it at memcpy's, where one pageable
    copy of a large kernel ran at a fraction of both (2.1 s for 3.2 GB on the H200 machine here)."""
    if t.device.type == "cpu":
        return t.double().numpy()
    return staged(t)


def staged(t: torch.Tensor) -> np.ndarray:
    """`to_host`'s copy through a pinned buffer (an ordinary one where CUDA is absent: the tests)."""
    out = np.empty(tuple(t.shape), dtype=np.float64)
    flat, dest = t.reshape(-1), out.reshape(-1)
    step = max(1, min(flat.numel(), STAGING_BYTES // t.element_size()))
    # the buffer in the tensor's own dtype: a copy that also converts would go through a temporary
    # (float32 took 8.1 s for the N = 20,000 NNGP+NTK against 5.1 s for float64 when it converted)
    buffer = torch.empty(step, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    for lo in range(0, flat.numel(), step):
        hi = min(flat.numel(), lo + step)
        buffer[: hi - lo].copy_(flat[lo:hi])  # synchronous: the buffer is refilled next
        dest[lo:hi] = buffer[: hi - lo].numpy()  # NumPy converts to float64 as it copies
    return out
