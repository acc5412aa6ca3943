"""The device layer's parts that run without a GPU: the staging copy to the host, the device
checks and the CUDA budget's defaults (tests/test_cuda.py holds the checks that need CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import PROGRAMS
from tpc.backends import device
from tpc.cli import main


def test_staged_copy_to_host_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "STAGING_BYTES", 48)  # slices of 6 float64 or 12 float32 entries
    for dtype in (torch.float64, torch.float32):
        t = torch.arange(35, dtype=dtype).reshape(5, 7) / 3
        got = device.staged(t)
        assert got.dtype == np.float64 and got.shape == (5, 7)
        np.testing.assert_array_equal(got, t.double().numpy())


def test_normals_come_from_the_cpu_generator() -> None:
    a = device.normals((3, 4), torch.Generator().manual_seed(5), torch.float64)
    b = torch.randn((3, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(a, b)


def test_cpu_budget_is_left_to_the_host_default() -> None:
    assert device.memory_gb("cpu", None) is None and device.memory_gb("cpu", 2.5) == 2.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
@pytest.mark.parametrize("command", [["limit"], ["run", "--width", "64"], ["compare", "--widths", "64,128"]])
def test_cuda_without_a_gpu_is_a_clean_error(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = [command[0], str(PROGRAMS / "kernels/relu_mlp.tp"), *command[1:], "--device", "cuda"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "Traceback" not in err
