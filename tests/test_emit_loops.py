"""`tpc emit-torch` for programs whose training is written as loops: the emitted train() runs the
loops as plain PyTorch and, loaded where tpc cannot be imported, reproduces `tpc run` (records,
outputs between the loops and predictions after training) to round-off."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.test_training import MAML  # its data and model; the loop below is written out
from tpc.backends.torch.emit_network import program_arrays
from tpc.cli import main

ROOT = Path(__file__).resolve().parent.parent

MAML_LOOP = MAML[:MAML.index("output a0")] + """for i in range(rows(S)) {
  copy g = f
  for k in range(2) { g -= 1.5 * grad(xent(g(P[S[i]]), SY[i]), g) }
  record a0 = g(P[Q[i]])
}
for t in range(3) {
  state G = zeros(f)
  for j in range(2) {
    i = mod(2 * t + j, 4)
    copy g = f
    for k in range(2) { g -= 1.5 * grad(xent(g(P[S[i]]), SY[i]), g) }
    G += grad(xent(g(P[Q[i]]), QY[i]), g)
  }
  f -= 0.7 * G / 2
}
for i in range(rows(S)) {
  copy g = f
  for k in range(2) { g -= 1.5 * grad(xent(g(P[S[i]]), SY[i]), g) }
  record a = g(P[Q[i]])
}
output a0 = a0
output a = a
output p = f(P)
"""

# Python keywords and builtins, the emitted file's own helpers and locals as program names; a nested
# record, a state, a copy and the model updated twice from one forward pass, a number recorded
AWKWARD = """width n
parametrization mup
data class = [[1, 0.5], [-0.3, 0.8], [0.2, -0.4]]
data records = [1, -1, 0.5]
data v3 = [[0.3, 0.1]]
layer lambda : input n x 2
layer forward : hidden n x n
layer outputs : readout 1 x n
model f(x) = outputs @ tanh(forward @ relu(lambda @ x))
loss float = mean((f(class) - records) ^ 2)
state None = zeros(f)
for def in range(3) {
  return = mse(f(class), records)
  record import = return
  combine = grad(return, f)
  None = 0.5 * None + combine
  copy yield = f
  for scale in range(2) {
    num = mean(yield(class) ^ 2)
    yield -= 0.1 * grad(num, yield)
    yield -= 0.1 * grad(num, yield)
    record grad = yield(v3)
  }
  assign = max(def, 1) / 2
  record weights = assign
  f -= 0.3 * assign * None + 0.01 * yield
  f -= 0.01 * grad(return, f)
}
output from = import
output if = grad
output is = weights
output with = f(v3)
output n = features(f, class)
output pass = float
"""

# run in a fresh interpreter: tpc is made unimportable before the emitted files are loaded
SCRIPT = """
import sys, inspect, importlib.util
sys.modules["tpc"] = None
import numpy as np, torch

def arrays(v):
    return np.array([arrays(x) for x in v]) if isinstance(v, list) else np.asarray(v)

for k, path in enumerate(sys.argv[1:]):
    spec = importlib.util.spec_from_file_location(f"emitted{k}", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    data = {name: torch.tensor(v) for name, v in np.load(path + ".npz").items()}
    model = mod.Network(width=64, seed=0)
    outputs = {}
    names = list(inspect.signature(mod.train).parameters)[1:-1]
    records = mod.train(model, *[data[name] for name in names], outputs=outputs)
    with torch.no_grad():
        after = {name: model(x).numpy() for name, x in data.items() if x.dim() == 2 and x.shape[1] == model.U.shape[1]}
    np.savez(path + ".out.npz", **{"out_" + k: v.numpy() for k, v in outputs.items()},
             **{"record_" + k: arrays(v) for k, v in records.items()}, **{"after_" + k: v for k, v in after.items()})
"""


def _programs() -> list[tuple[str, tpc.Network]]:
    nets = [(name, tpc.load(ROOT / "programs" / "train" / name)) for name in
            ("momentum_relu2_mup.tp", "wd_cosine_tanh_mup.tp", "two_phase_linear_mup.tp", "fixed_relu2_mup.tp",
             "named_values_mup.tp")]
    from tests.test_adam import ADAM, HEADER

    adamw = tpc.loads(HEADER + "parametrization mup\n" + ADAM.replace("DECAY", " + 0.1 * f"), "<adamw loop>")
    # MAML's copies of a model with a fixed random matrix: they apply it and never adapt it
    fixed = MAML_LOOP.replace("model f(x) = V @ (U @ x)",
                              "matrix A : n x n ~ N(0, 1/n)\nmodel f(x) = V @ tanh(A @ (U @ x))")
    return [*nets, ("maml_loop", tpc.loads(MAML_LOOP, "<maml loop>")), ("adamw_loop", adamw),
            ("maml_fixed", tpc.loads(fixed, "<maml fixed>")), ("reptile_fixed", tpc.loads(REPTILE_FIXED, "<reptile>"))]


# Reptile-like arithmetic of the model and a copy (`f - g`): the fixed matrix and vector stay put (the
# emitted weights(model) and copies hold the trained parameters only)
REPTILE_FIXED = """width n
parametrization mup
data X = [[1, 0.5], [-0.3, 0.8], [0.2, -1], [0.9, 0.1]]
data Y = [1, -1, 1, 1]
data Xt = [[0.4, 0.4], [-1, 0.2]]
layer U : input n x 2, var = 2
vector y ~ N(0, 1)
matrix A : n x n ~ N(0, 2/n)
layer V : readout 1 x n
model f(x) = V @ relu(A @ relu(U @ x + y))
for t in range(3) {
  copy g = f
  g -= 0.3 * grad(mse(g(X), Y), g)
  g -= 0.5 * (g - f)
  record r = g(Xt)
  f -= 0.5 * (f - g) + 0.01 * f
}
output pred = f(Xt)
output r = r
"""


def _imports(source: str) -> set[str]:
    tree = ast.parse(source)
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names} | \
        {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_emitted_loops_reproduce_tpc_run_standalone(tmp_path: Path) -> None:
    programs = _programs()
    paths = []
    for k, (_, net) in enumerate(programs):
        source = tpc.torch_source(net)
        assert _imports(source) <= {"__future__", "math", "torch"}
        assert "import tpc" not in source and "from tpc" not in source
        assert "no training statement" not in source
        path = tmp_path / f"emitted{k}.py"
        path.write_text(source)
        np.savez(f"{path}.npz", **program_arrays(net))
        paths.append(str(path))
    subprocess.run([sys.executable, "-c", SCRIPT, *paths], check=True, cwd=tmp_path, timeout=300)
    for (name, net), path in zip(programs, paths, strict=True):
        got = dict(np.load(f"{path}.out.npz"))
        ref = tpc.run(net, 64, 1)
        assert {k[4:] for k in got if k.startswith("out_")} == set(ref), name
        for out in net.outputs:
            want = ref[out.name].values[0]
            np.testing.assert_allclose(got["out_" + out.name], want, rtol=1e-10, atol=1e-12, err_msg=name)
            if out.kind == "record":  # train()'s return value holds the same steps
                np.testing.assert_allclose(got["record_" + out.loss], want, rtol=1e-10, atol=1e-12, err_msg=name)
            if out.kind == "predict" and out.position == len(net.program.top):  # the model is left trained
                after = got["after_" + out.data]
                np.testing.assert_allclose(after[:, 0] if after.shape[1] == 1 else after, want, rtol=1e-10,
                                           atol=1e-12, err_msg=name)


def test_emitted_loops_with_awkward_names() -> None:
    net = tpc.loads(AWKWARD, "<awkward>")
    source = tpc.torch_source(net)
    namespace: dict = {}
    exec(compile(source, "<emitted>", "exec"), namespace)  # noqa: S102 - our own output
    model = namespace["Network"](64, seed=0)
    data = program_arrays(net)
    names = list(inspect.signature(namespace["train"]).parameters)[1:-1]
    assert names == ["class_", "records_", "v3_"]
    outputs: dict = {}
    records = namespace["train"](model, *[torch.tensor(data[k]) for k in names], outputs=outputs)
    assert set(records) == {"import", "grad", "weights"} and len(records["grad"][0]) == 2
    ref = tpc.run(net, 64, 1)
    assert set(outputs) == set(ref)
    for k, res in ref.items():
        np.testing.assert_allclose(outputs[k].detach().numpy(), res.values[0], rtol=1e-10, atol=1e-12, err_msg=k)


def test_torch_module_and_command_of_a_loop_program(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "programs" / "train" / "two_phase_linear_mup.tp"
    net = tpc.load(path)
    model = tpc.torch_module(net, width=32, seeds=1)
    assert type(model).__name__ == "Network"
    assert main(["emit-torch", str(path)]) == 0
    src = capsys.readouterr().out
    assert src == tpc.torch_source(net)
    assert "def train(model: Network, X: torch.Tensor, Y: torch.Tensor, Xt: torch.Tensor," in src
    assert "for t in range(4):" in src and "outputs['middle'] = " in src
    # the model is trained in place; without `outputs` train() only returns the records
    namespace: dict = {}
    exec(compile(src, "<emitted>", "exec"), namespace)  # noqa: S102 - our own output
    model = namespace["Network"](32, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    X, Y, Xt = (torch.tensor(net.data[k]) for k in ("X", "Y", "Xt"))  # noqa: N806
    records = namespace["train"](model, X, Y, Xt)
    assert set(records) == {"first", "second"} and len(records["first"]) == 4
    assert all(isinstance(v, float) for v in records["first"])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_emitted_loops_refuse_an_output_that_is_not_finite() -> None:
    """Adam with eps = 0 for one step makes W NaN (0 / 0 where a gradient entry is 0): tpc run refuses
    it at the update; the emitted train() filled `outputs` with NaN and returned."""
    src = (ROOT / "programs" / "train" / "adam_relu2_mup.tp").read_text()
    src = src.replace("+ 1e-3)", "+ 0)").replace("range(4)", "range(1)")
    net = tpc.loads(src, "adam0.tp", ROOT / "programs" / "train")
    with pytest.raises(tpc.TpcError, match="not finite"):
        tpc.run(net, 64, 1)
    namespace: dict = {}
    exec(compile(tpc.torch_source(net), "<emitted>", "exec"), namespace)  # noqa: S102 - our own output
    data = program_arrays(net)
    names = list(inspect.signature(namespace["train"]).parameters)[1:-1]
    with pytest.raises(FloatingPointError, match="output pred is not finite"):
        namespace["train"](namespace["Network"](64, seed=0), *[torch.tensor(data[k]) for k in names], outputs={})
