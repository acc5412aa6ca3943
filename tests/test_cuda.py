"""`--device cuda`: finite runs and the limit's kernels and particles on a GPU. These run where CUDA
is present and are skipped elsewhere (CI has no GPU; a session lent one runs them there).

The limit draws its particles from CPU generators and moves them, so a CUDA limit must equal the
CPU one to round-off; a finite run on CUDA draws its weights from CUDA's generators (other numbers
than the CPU's for the same seed), so it must agree with the CPU run in distribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tpc
from tests.conftest import PROGRAMS
from tpc.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FORWARD = ["kernels/relu_mlp.tp", "kernels/erf_mlp.tp", "kernels/gelu_mlp.tp", "kernels/rnn_tanh.tp",
           "netsor/moments.tp", "netsor/normalized.tp", "netsor/transpose_tanh.tp", "netsor/wishart.tp"]
TRAINED = ["train/linear_mup.tp", "train/relu2_mup.tp", "train/relu2_ntk.tp", "train/momentum_relu2_mup.tp",
           "train/relu2_ntk_loop.tp"]


def _same(cpu: dict, gpu: dict, rtol: float) -> None:
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        a, b = cpu[name], gpu[name]
        assert a.method == b.method, name
        scale = max(1.0, float(np.abs(a.value).max()))
        np.testing.assert_allclose(b.value, a.value, rtol=0, atol=rtol * scale, err_msg=name)
        if a.stderr is not None:
            np.testing.assert_allclose(b.stderr, a.stderr, rtol=1e-6, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("name", FORWARD)
def test_forward_limit_on_cuda_equals_cpu(name: str) -> None:
    prog = tpc.load(PROGRAMS / name)
    _same(tpc.limit(prog, particles=2**14), tpc.limit(prog, particles=2**14, device="cuda"), 1e-9)


@pytest.mark.parametrize("name", TRAINED)
def test_training_limit_on_cuda_equals_cpu(name: str) -> None:
    net = tpc.load(PROGRAMS / name)
    _same(tpc.limit(net, particles=2**14), tpc.limit(net, particles=2**14, device="cuda"), 1e-8)


def _agree_in_distribution(cpu: dict, gpu: dict) -> None:
    """Means over independent seeds within 5 standard errors of their difference (plus round-off)."""
    for name in cpu:
        a, b = cpu[name], gpu[name]
        se = np.sqrt(a.stderr**2 + b.stderr**2)
        assert np.all(np.abs(a.mean - b.mean) <= 5 * se + 1e-9), name


@pytest.mark.parametrize("name", ["train/relu2_mup.tp", "train/wd_cosine_tanh_mup.tp", "netsor/moments.tp"])
def test_finite_run_on_cuda_agrees_with_cpu(name: str) -> None:
    prog = tpc.load(PROGRAMS / name)
    cpu = tpc.run(prog, 256, 16)
    gpu = tpc.run(prog, 256, 16, device="cuda")
    _agree_in_distribution(cpu, gpu)
    again = tpc.run(prog, 256, 16, device="cuda")  # a seed is a seed on CUDA too
    for k in gpu:
        np.testing.assert_allclose(again[k].values, gpu[k].values, rtol=0, atol=1e-12)


def test_float32_on_cuda_is_close_to_float64() -> None:
    net = tpc.load(PROGRAMS / "train/relu2_mup.tp")
    hi = tpc.run(net, 512, 4, device="cuda")
    lo = tpc.run(net, 512, 4, device="cuda", dtype="float32")
    for k in hi:  # CUDA's generator draws float32 and float64 differently: compare in distribution
        se = np.sqrt(hi[k].stderr ** 2 + lo[k].stderr ** 2)
        assert np.all(np.abs(hi[k].mean - lo[k].mean) <= 5 * se + 1e-4), k


def test_cli_limit_and_run_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    relu = str(PROGRAMS / "kernels/relu_mlp.tp")
    assert main(["limit", relu, "--device", "cuda", "--json"]) == 0
    on_gpu = json.loads(capsys.readouterr().out)
    assert main(["limit", relu, "--json"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    for k in on_cpu["outputs"]:
        np.testing.assert_allclose(on_gpu["outputs"][k]["value"], on_cpu["outputs"][k]["value"], atol=1e-10)
    assert main(["run", str(PROGRAMS / "train/relu2_mup.tp"), "--width", "128", "--seeds", "2",
                 "--device", "cuda:0", "--quiet"]) == 0
    assert "on cuda:0" in capsys.readouterr().out
    bad = f"cuda:{torch.cuda.device_count()}"
    assert main(["limit", relu, "--device", bad]) == 2
    assert "numbered from 0" in capsys.readouterr().err


def test_cuda_budget_is_the_devices_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpc.backends.device import memory_gb

    monkeypatch.delenv("TPC_MEMORY_GB", raising=False)
    half = torch.cuda.get_device_properties(0).total_memory / 2**31
    assert abs(memory_gb("cuda", None) - half) < 0.1
    assert memory_gb("cuda", 3.0) == 3.0 and memory_gb("cpu", None) is None
    monkeypatch.setenv("TPC_MEMORY_GB", "8")
    assert memory_gb("cuda", None) is None  # the environment's budget wins, as on the CPU

