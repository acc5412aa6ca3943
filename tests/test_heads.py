"""Multi-head attention, `attend(q, k, v, H)`: at width n, H heads, head h the h-th block of n/H
coordinates of q, k and v with logits q_h . k_h / (n/H)^e, the heads' outputs side by side. In the
limit every head's logits are the same E[Z^q Z^k] (the coordinates are exchangeable), so H heads
are one head (Bordelon et al. 2024 find the same collapse of heads as the head dimension grows in
muP). Checked against a multi-head attention written here in torch, direct against unrolled
training, the emitted torch file, finite widths converging to the limit, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tpc
from tests.helpers import assert_direct_equals_unrolled, emitted_train_outputs, initial_weights
from tests.test_positions import LOOP, SMALL
from tpc.cli import main
from tpc.train.finite import forward

HEADS = SMALL.replace("attend(Q @ layernorm(h), K @ layernorm(h), Vv @ layernorm(h))",
                      "attend(Q @ layernorm(h), K @ layernorm(h), Vv @ layernorm(h), 4)")


def _multi_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, e: float) -> torch.Tensor:
    """(B, P, n) each: softmax(q_h k_h^T / (n/H)^e) v_h per head, concatenated, written out."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        block = slice(h * d, (h + 1) * d)
        logits = q[..., block] @ k[..., block].transpose(-1, -2) / d**e
        outs.append(torch.softmax(logits, dim=-1) @ v[..., block])
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize(("param", "e"), [("mup", 1.0), ("sp", 0.5)])
def test_heads_equal_a_multi_head_attention_written_here(param: str, e: float) -> None:
    net = tpc.loads(HEADS.format(param=param) + "output p = f(X)\n")
    width = 32
    w = initial_weights(net, width, [0, 1])
    x = torch.as_tensor(net.data["X"]).reshape(3, 4, 3)
    got = forward(net, w, torch.as_tensor(net.data["X"]))[-1]
    for s in range(2):
        h = x @ w["E"][s].T + w["b"][s]
        z = torch.nn.functional.layer_norm(h, (width,), eps=1e-5)
        att = _multi_head(z @ w["Q"][s].T, z @ w["K"][s].T, z @ w["Vv"][s].T, 4, e)
        out = torch.relu(h + att).mean(1) @ w["V"][s].T
        torch.testing.assert_close(got[s], out, rtol=1e-12, atol=1e-12)
    one = tpc.loads(SMALL.format(param=param) + "output p = f(X)\n")  # 4 heads are not one at width 32
    assert (forward(one, w, torch.as_tensor(net.data["X"]))[-1] - got).abs().max() > 1e-6


def test_one_head_is_attend_without_heads() -> None:
    one = HEADS.replace(", 4)", ", 1)")
    a = tpc.run(tpc.loads(one.format(param="mup") + LOOP), 16, 2)
    b = tpc.run(tpc.loads(SMALL.format(param="mup") + LOOP), 16, 2)
    for name in a:
        np.testing.assert_array_equal(a[name].values, b[name].values)


@pytest.mark.parametrize("param", ["mup", "sp"])
def test_direct_equals_unrolled(param: str) -> None:
    net = tpc.loads(HEADS.format(param=param) + LOOP)
    direct = assert_direct_equals_unrolled(net, 40, 2)
    assert np.abs(direct["pred"].values - direct["before"].values).max() > 1e-3  # it trained


def test_emitted_torch_reproduces_tpc_run() -> None:
    net = tpc.loads(HEADS.format(param="mup") + LOOP)
    emitted = emitted_train_outputs(net, 16)
    ours = tpc.run(net, 16, 1)
    for name, res in ours.items():
        np.testing.assert_allclose(emitted[name].detach().numpy(), res.values[0], rtol=1e-10, atol=1e-12, err_msg=name)


def test_the_limit_is_one_head_and_finite_widths_approach_it() -> None:
    """The limit of 4 heads is the limit of one (the same particles give the same numbers), and the
    4-head network's predictions approach it: 16 times the width, errors at least halved."""
    net = tpc.loads(HEADS.format(param="mup") + LOOP)
    lim = tpc.limit(net, particles=2**12, replicates=2, seed=3)
    one = tpc.limit(tpc.loads(SMALL.format(param="mup") + LOOP), particles=2**12, replicates=2, seed=3)
    np.testing.assert_array_equal(lim["pred"].value, one["pred"].value)
    errors = [float(np.sqrt(((tpc.run(net, w, 4)["pred"].values - lim["pred"].value) ** 2).mean()))
              for w in (64, 1024)]
    assert errors[1] < errors[0] / 2, errors


def test_a_width_that_does_not_split_into_the_heads_is_refused(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "heads.tp"
    path.write_text(HEADS.format(param="mup") + "output p = f(X)\n")
    assert main(["run", str(path), "--width", "30", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert "width 30 does not split into 4 heads" in err and f"{path}:12:" in err and "Traceback" not in err


def test_graph_shows_the_heads() -> None:
    from tpc.train.show import model_lines

    lines = model_lines(tpc.loads(HEADS.format(param="mup") + LOOP))
    assert any("attend(" in line and ", 4)" in line for line in lines)
