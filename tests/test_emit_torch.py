"""`tpc emit-torch` writes a file that stands alone: imported in a fresh process where tpc cannot
be imported, it reproduces `tpc run` at the same seeds to round-off (Netsor programs: forward()
on the program's data; network programs: the model, its optimizer and its training loop)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tpc.cli import main

ROOT = Path(__file__).resolve().parent.parent

# run in a fresh interpreter: tpc is made unimportable before the emitted file is loaded
NETSOR_SCRIPT = """
import sys, json, importlib.util
sys.modules["tpc"] = None
import numpy as np, torch
spec = importlib.util.spec_from_file_location("emitted", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
data = {k: torch.tensor(v) for k, v in np.load(sys.argv[2]).items()}
module = mod.TensorProgram(width=int(sys.argv[3]), seeds=[0, 1, 2])
with torch.no_grad():
    out = module(**data)
np.savez(sys.argv[4], **{k: v.numpy() for k, v in out.items()})
"""

NETWORK_SCRIPT = """
import sys, importlib.util
sys.modules["tpc"] = None
import numpy as np, torch
spec = importlib.util.spec_from_file_location("emitted", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
data = {k: torch.tensor(v) for k, v in np.load(sys.argv[2]).items()}
curves, preds = [], []
for seed in (0, 1):
    model = mod.Network(width=int(sys.argv[3]), seed=seed)
    curves.append(mod.train(model, data["X"], data["Y"]))
    with torch.no_grad():
        preds.append(model(data["Xt"]).numpy()[:, 0])
np.savez(sys.argv[4], curve=np.array(curves), pred=np.array(preds))
"""


def _run_isolated(script: str, source: str, data: dict[str, np.ndarray], width: int, tmp: Path) -> dict:
    (tmp / "emitted.py").write_text(source)
    np.savez(tmp / "data.npz", **data)
    subprocess.run([sys.executable, "-c", script, str(tmp / "emitted.py"), str(tmp / "data.npz"), str(width),
                    str(tmp / "out.npz")], check=True, cwd=tmp, timeout=300)
    return dict(np.load(tmp / "out.npz"))


@pytest.mark.parametrize("program", ["kernels/relu_mlp.tp", "kernels/rnn_tanh.tp", "netsor/transpose_tanh.tp",
                                     "netsor/normalized.tp"])
def test_emitted_netsor_module_stands_alone(program: str, tmp_path: Path) -> None:
    prog = tpc.load(ROOT / "programs" / program)
    from tpc.backends.torch.codegen import program_data

    out = _run_isolated(NETSOR_SCRIPT, tpc.torch_source(prog), program_data(prog), 64, tmp_path)
    ref = tpc.run(prog, 64, 3)
    assert set(out) == set(ref)
    for name, res in ref.items():
        np.testing.assert_allclose(out[name], res.values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("body", ["x = relu(U @ X)\noutput B = U.T @ x / n\n",
                                  "c = 2\nx = relu(U @ X) * c\noutput m = mean(x)\n"])
def test_emitted_module_takes_only_the_programs_data(body: str) -> None:
    """tpc's own numbers are built inside forward(): the identity whose product with U gives U's
    columns (`U.T @ x / n`), and a named constant. They were forward() arguments with no default
    (`module(X, t4)`), so the emitted file could not run on the program's data alone."""
    x = [[1, 0.5, -0.3], [0.2, -0.8, 0.5]]
    prog = tpc.loads(f"width n\ndata X = {x}\nmatrix U : n x 3 ~ N(0, 1)\n" + body)
    source = tpc.torch_source(prog)
    namespace: dict = {}
    exec(compile(source, "<emitted>", "exec"), namespace)  # noqa: S102 - tpc's own output
    params = list(inspect.signature(namespace["TensorProgram"].forward).parameters)
    assert params == ["self", "X"], params
    module = namespace["TensorProgram"](64, seeds=[0, 1])
    out = module(torch.tensor(x, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"data \['x'\]: forward\(\) takes \['X'\]"):  # not silently ignored
        namespace["TensorProgram"](64, data={"x": torch.tensor(x)})
    ref = tpc.run(prog, 64, 2)
    for name, res in ref.items():
        np.testing.assert_allclose(out[name].detach().numpy(), res.values, rtol=1e-12, atol=1e-12)


def test_autodiffs_ones_follow_the_batch_forward_is_given() -> None:
    """d f / d h for f = mean(relu(h)) seeds the backward pass with ones shaped like f's batch: sized by
    the batch forward() is given (they were the program's two, so one row gave a 1 x 2 x 2 kernel and
    three rows an error; found by a reviewer)."""
    src = "width n\ndata X = {x}\nmatrix U : n x 2 ~ N(0, 1.11/2)\nh = U @ X\nf = mean(relu(h))\n" \
          "output k = gram(grad(f, h))\n"
    module = tpc.torch_module(tpc.loads(src.format(x="[[-0.9, -0.7], [-1.2, 1]]")), width=64, seeds=[0])
    rows = [[0.5, 0.5], [1.0, 2.0], [3.0, -1.0]]
    for x in (rows[:1], rows):
        got = module(X=torch.tensor(x, dtype=torch.float64))["k"].detach().numpy()
        want = tpc.run(tpc.loads(src.format(x=x)), 64, 1)["k"].values
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_emitted_netsor_module_takes_other_inputs() -> None:
    prog = tpc.load(ROOT / "programs" / "kernels" / "relu_mlp.tp")
    module = tpc.torch_module(prog, width=32, seeds=[0])
    full = module()["nngp"]
    X = torch.tensor(np.loadtxt(ROOT / "programs" / "kernels" / "data" / "inputs8x3.csv", delimiter=","))  # noqa: N806
    few = module(X=X[:3])["nngp"]  # a smaller batch: the first rows of the same kernel
    assert few.shape == (1, 3, 3)
    torch.testing.assert_close(few, full[:, :3, :3])
    with pytest.raises(ValueError, match="has 1 axes"):
        module(X=X[0])


@pytest.mark.parametrize("program", ["relu2_mup.tp", "tanh_mup.tp", "relu2_sp.tp"])
def test_emitted_network_trains_like_tpc_run(program: str, tmp_path: Path) -> None:
    net = tpc.load(ROOT / "programs" / "train" / program)
    data = {k: net.data[k] for k in ("X", "Y", "Xt")}
    out = _run_isolated(NETWORK_SCRIPT, tpc.torch_source(net), data, 128, tmp_path)
    ref = tpc.run(net, 128, 2)
    np.testing.assert_allclose(out["curve"], ref["curve"].values, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["pred"], ref["pred"].values, rtol=1e-10, atol=1e-12)


def test_torch_module_of_a_network_is_the_emitted_model() -> None:
    net = tpc.load(ROOT / "programs" / "train" / "relu2_mup.tp")
    model = tpc.torch_module(net, width=64, seeds=1)
    assert type(model).__name__ == "Network" and isinstance(model, torch.nn.Module)
    assert {name for name, _ in model.named_parameters()} == {"U", "W", "V"}
    assert model(torch.tensor(net.data["Xt"])).shape == (3, 1)
    assert len(tpc.torch_module(net, width=64, seeds=[0, 1])) == 2


def test_emit_torch_command_prints_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emit-torch", str(ROOT / "programs" / "train" / "relu2_mup.tp")]) == 0
    src = capsys.readouterr().out
    compile(src, "<emitted>", "exec")
    assert "class Network(torch.nn.Module):" in src and "def train(" in src and "def optimizer(" in src
    assert "import tpc" not in src and "from tpc" not in src
    json.dumps(src)  # plain text


FOMAML_SCRIPT = """
import sys, importlib.util
sys.modules["tpc"] = None
import numpy as np, torch
spec = importlib.util.spec_from_file_location("emitted", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
d = {k: torch.tensor(v) for k, v in np.load(sys.argv[2]).items()}
preds = []
for seed in (0, 1):
    model = mod.Network(width=int(sys.argv[3]), seed=seed)
    mod.train(model, d["P"], d["S"], d["SY"], d["Q"], d["QY"])
    with torch.no_grad():
        preds.append(model(d["P"]).numpy())
np.savez(sys.argv[4], p=np.array(preds))
"""


@pytest.mark.parametrize("hidden", ["layer W : hidden n x n", "matrix W : n x n ~ N(0, 1/n)"])
def test_emitted_fomaml_trains_like_tpc_run(hidden: str, tmp_path: Path) -> None:
    """(A fixed `matrix` W: the emitted inner loop adapts U and V only, as tpc's does.)"""
    from tests.test_training import MAML

    net = tpc.loads(MAML.replace("model f(x) = V @ (U @ x)", f"{hidden}\nmodel f(x) = V @ tanh(W @ "
                                 "relu(U @ x))"), "<maml>")
    data = {k: net.data[k] for k in ("P", "S", "SY", "Q", "QY")}
    out = _run_isolated(FOMAML_SCRIPT, tpc.torch_source(net), data, 64, tmp_path)
    np.testing.assert_allclose(out["p"], tpc.run(net, 64, 2)["p"].values, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["getattr", "len", "dtype", "training", "seeds", "forward", "check",
                                  "matmul", "z", "S", "__e0", "torch_"])
def test_emitted_netsor_module_with_awkward_names(name: str) -> None:
    # a program name shadowed a builtin that forward() calls, or an attribute nn.Module sets
    prog = tpc.loads(f"width n\ndata X = [[1, 0], [0, 1]]\nmatrix U : n x 2 ~ N(0, 1)\nvector u ~ N(0, 1)\n"
                     f"{name} = U @ X\nf = u @ tanh({name}) / sqrt(n)\noutput a = gram({name})\noutput k = cov(f)\n")
    out = tpc.run(prog, 64, 2)
    np.testing.assert_allclose(out["a"].values, tpc.torch_module(prog, 64, [0, 1]).eval()()["a"].detach().numpy())


NETWORK_NAMES = """width n
parametrization mup
data {x} = [[1, 0.5], [-0.3, 0.8], [0.2, -0.4]]
data {y} = [1, -1, 0.5]
layer {u} : input n x 2
layer {w} : hidden n x n
layer {v} : readout 1 x n
model f(x) = {v} @ tanh({w} @ tanh({u} @ x))
loss L = mean({deep}(f({x}) - {y}){close} ^ 2)
train sgd(lr = 0.5, steps = 2) minimize L
output p = f({x})
"""


@pytest.mark.parametrize("names", [
    {"x": "range", "y": "loss_L", "u": "forward", "w": "multiplier", "v": "parameters"},
    {"x": "float", "y": "train", "u": "torch", "w": "torch_", "v": "to"},
])
@pytest.mark.parametrize("depth", [0, 45])  # a user loss deeper than the code's inline limit
def test_emitted_network_with_awkward_names(names: dict[str, str], depth: int) -> None:
    net = tpc.loads(NETWORK_NAMES.format(**names, deep="tanh(" * depth, close=")" * depth))
    namespace: dict = {}
    exec(compile(tpc.torch_source(net), "<emitted>", "exec"), namespace)  # noqa: S102 - our own output
    model = namespace["Network"](64, seed=1)
    namespace["train"](model, torch.tensor(net.data[names["x"]]), torch.tensor(net.data[names["y"]]))
    with torch.no_grad():
        pred = model(torch.tensor(net.data[names["x"]]))[:, 0].numpy()
    np.testing.assert_allclose(pred, tpc.run(net, 64, 2)["p"].values[1], rtol=1e-10, atol=1e-12)


ONE_ROW_OVER_POSITIONS = """width n
parametrization mup
data X = [[0, 1.1, 0.3, -0.5], [1.4, 0.8, -0.2, 0.4], [-1.4, 1.2, 0.1, 0.9]]
data Y = [0.6, 0.5, 1]
layer U : input n x 2
layer V : readout 1 x n
model f(x[2]) = V @ pool(tanh(U @ x))
for t in range(2) {
  L = mse(f(X), Y) + 0.1 * mean(f(X[t]))
  record r = f(X[t])
  f -= 0.3 * grad(L, f)
}
output pred = f(X)
output r = r
"""


def test_emitted_loops_apply_a_model_over_positions_to_one_row() -> None:
    """One row of a model over positions: forward() reshaped it as a batch (x.shape[0] * P rows) and
    failed; one input is now a batch of one, and the training gives tpc run's values."""
    from tests.fuzzing import Harness

    with Harness() as h:
        assert h.differential(ONE_ROW_OVER_POSITIONS) == []


def test_emitted_loops_apply_the_model_to_one_row() -> None:
    """f(X[min(t, 2)]) is the model on one row (no batch): one number, which the emitted training
    took as a batch (`[:, 0]`, an IndexError); it now gives tpc run's values, record included."""
    from tests.fuzzing import Harness

    source = """width n
parametrization mup
data X = [[0, 1.1], [1.4, 0.8], [-1.4, 1.2]]
data Y = [0.6, 0.5, 1]
layer U : input n x 2
layer W : hidden n x n
layer V : readout 1 x n
model f(x) = V @ tanh(W @ tanh(U @ x))
for t in range(3) {
  L = mse(f(X), Y) + 0.1 * mean(f(X[min(t, 2)]))
  record r = f(X[min(t, 2)])
  f -= 0.3 * grad(L, f)
}
output pred = f(X)
output r = r
"""
    with Harness() as h:
        assert h.differential(source) == []
    assert "[..., 0]" in tpc.torch_source(tpc.loads(source))
