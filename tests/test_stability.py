"""``pyeuler.stability`` and ``pyeuler stability``: the two step conditions against dense
SVDs, on every backend; errors for branches that couple samples; modules left untouched.

Expected values are computed independently: ``torch.linalg.svdvals`` of the matrices
themselves, or of dense per-sample Jacobians from ``torch.func.jacrev`` through the
reference algorithm, in float64.
"""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pyeuler.checkpoint import save_checkpoint
from pyeuler.cli import main
from pyeuler.nn import PreActBranch
from pyeuler.robust import build_model
from pyeuler.stability import (DENSE_LIMIT, ConvergenceWarning, block_map_lipschitz,
                               explicit_step_lipschitz, implicit_step_lipschitz, model_stability)
from conftest import requires_cuda, requires_triton

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["dense", "iterative"]
EXACT = dict(iters=3000, tol=1e-12)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear(d=6, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, d, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(scale * torch.randn(d, d, generator=g, dtype=torch.float64))
    return layer


def _dense_jacobians(f, x):
    """Per-sample Jacobians [N, D, D] of f at x (f must not couple samples)."""
    jac = torch.func.jacrev(f)(x)  # (N, *s, N, *s)
    n, d = x.shape[0], x[0].numel()
    jac = jac.reshape(n, d, n, d)
    return torch.stack([jac[i, :, i] for i in range(n)])


def _expected(jac, theta=1.0):
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    return (torch.linalg.svdvals(eye + jac)[:, 0],
            1 / torch.linalg.svdvals(eye - theta * jac)[:, -1])


def _perturbed_branch(channels=3, norm="group", h=0.5, dtype=torch.float64, seed=0, dim=2):
    torch.manual_seed(seed)
    branch = PreActBranch(channels, norm=norm, h=h, dim=dim).to(dtype)
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if norm == "batch":
            for bn in (branch.bn1, branch.bn2):
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
    return branch.eval()


# ------------------------------------------------------------------------ linear branches


@pytest.mark.parametrize("method", METHODS)
def test_linear_branch_equals_svdvals(method):
    layer = _linear()
    w = layer.weight.detach()
    eye = torch.eye(6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    explicit = explicit_step_lipschitz(layer, x, generator=_gen(), method=method, **EXACT)
    torch.testing.assert_close(explicit, torch.linalg.svdvals(eye + w)[0].expand(3),
                               rtol=1e-8, atol=0)
    for theta in (1.0, 0.5):
        implicit = implicit_step_lipschitz(layer, x, theta=theta, generator=_gen(),
                                           method=method, **EXACT)
        torch.testing.assert_close(implicit, (1 / torch.linalg.svdvals(eye - theta * w)[-1])
                                   .expand(3), rtol=1e-8, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_singular_implicit_step_is_inf_never_nan(method):
    layer = _linear(4, scale=0.0)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))  # f(x) = x: I − J = 0
    x = torch.randn(2, 4, dtype=torch.float64)
    values, info = implicit_step_lipschitz(layer, x, method=method, generator=_gen(),
                                           return_info=True)
    assert torch.isinf(values).all() and values.gt(0).all() and info.singular.all()
    # θ = 0: the explicit step's inverse is I, exactly 1
    ones = implicit_step_lipschitz(layer, x, theta=0.0, method=method, generator=_gen())
    torch.testing.assert_close(ones, torch.ones(2, dtype=torch.float64))
    # I + J = 0 for f(x) = −x: the explicit step annihilates perturbations
    with torch.no_grad():
        layer.weight.copy_(-torch.eye(4))
    zeros = explicit_step_lipschitz(layer, x, method=method, generator=_gen())
    assert not torch.isnan(zeros).any() and zeros.abs().max() < 1e-12


# ------------------------------------------------------------------------ PreActBranch


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["eager", "reference"])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_preact_branch_equals_dense_jacobian_svd(norm, backend, method):
    branch = _perturbed_branch(norm=norm)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    jac = _dense_jacobians(lambda z: branch(z, backend="reference"), x)
    expected_e, expected_i = _expected(jac)
    explicit = explicit_step_lipschitz(branch, x, backend=backend, method=method,
                                       generator=_gen(), **EXACT)
    implicit = implicit_step_lipschitz(branch, x, backend=backend, method=method,
                                       generator=_gen(), cg_iters=200, cg_tol=1e-8, **EXACT)
    torch.testing.assert_close(explicit, expected_e, rtol=1e-7, atol=0)
    torch.testing.assert_close(implicit, expected_i, rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", ["eager", "reference",
                                     pytest.param("triton", marks=requires_triton),
                                     pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("method", METHODS)
def test_every_backend_agrees(backend, method):
    """Float32 (the fused kernels' dtype); the expected values in float64."""
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) \
        else "cpu"
    branch = _perturbed_branch(h=0.4)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    expected_e, expected_i = _expected(_dense_jacobians(lambda z: branch(z, backend="reference"),
                                                        x))
    b32, x32 = branch.float().to(device), x.float().to(device)
    explicit = explicit_step_lipschitz(b32, x32, backend=backend, method=method,
                                       generator=_gen(), iters=300, tol=1e-6)
    implicit = implicit_step_lipschitz(b32, x32, backend=backend, method=method,
                                       generator=_gen(), iters=300, tol=1e-6, cg_tol=1e-2)
    torch.testing.assert_close(explicit.double().cpu(), expected_e, rtol=2e-4, atol=0)
    torch.testing.assert_close(implicit.double().cpu(), expected_i, rtol=2e-3, atol=0)


def test_generic_module_and_block_map():
    """A non-pyeuler module goes through torch.func; a shape-changing map through
    block_map_lipschitz (the conditions of the step functions need x + f(x))."""
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    jac = torch.func.jacrev(conv)(x).reshape(2, 16, 2, 32)
    expected = torch.linalg.svdvals(torch.stack([jac[i, :, i] for i in range(2)]))[:, 0]
    for method in METHODS:
        got = block_map_lipschitz(conv, x, method=method, generator=_gen(), **EXACT)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="preserve its input's shape"):
        explicit_step_lipschitz(conv, x)


def _autograd_jacobians(f, x):
    """Per-sample Jacobians [N, D_out, D_in] by torch.autograd.functional.jacobian, one
    sample at a time (independent of pyeuler's products and of torch.func)."""
    n, d_in = x.shape[0], x[0].numel()
    return torch.stack([torch.autograd.functional.jacobian(lambda z: f(z[None])[0], x[i])
                        .reshape(-1, d_in) for i in range(n)])


def test_dense_is_the_exact_svd_without_iterating_or_warning():
    """method="dense" takes the singular values of the formed Jacobian: with iters=1 any
    power or inverse iteration would stop unconverged (and warn); dense returns the exact
    values, converged, after 0 iterations, and warns about nothing."""
    branch = _perturbed_branch(channels=2, h=1.0)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    jac = _autograd_jacobians(lambda z: branch(z, backend="reference"), x)
    eye = torch.eye(jac.shape[-1], dtype=torch.float64)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit, e_info = explicit_step_lipschitz(branch, x, method="dense", iters=1,
                                                   return_info=True)
        implicit, i_info = implicit_step_lipschitz(branch, x, method="dense", theta=0.7,
                                                   iters=1, return_info=True)
        block_map, m_info = block_map_lipschitz(conv, x, method="dense", iters=1,
                                                return_info=True)
        res = model_stability(build_model("mlp-6-2", (2,), 2, ie_steps=1).double().eval(),
                              torch.rand(4, 2, dtype=torch.float64), method="dense", iters=1)
    torch.testing.assert_close(explicit, torch.linalg.svdvals(eye + jac)[:, 0],
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(implicit, 1 / torch.linalg.svdvals(eye - 0.7 * jac)[:, -1],
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(block_map, torch.linalg.svdvals(_autograd_jacobians(conv, x))
                               [:, 0], rtol=1e-10, atol=0)
    for info in (e_info, i_info, m_info):
        assert info.converged.all() and info.iterations.eq(0).all()
    assert all(v == 1.0 for b in res.blocks for v in b.converged.values())
    # the iterative method, given the same single iteration, does warn
    with pytest.warns(ConvergenceWarning):
        explicit_step_lipschitz(branch, x, method="iterative", iters=1)


def test_dense_refuses_inputs_too_large_to_form_naming_the_size():
    side = math.isqrt(DENSE_LIMIT) + 1  # one channel of side² > DENSE_LIMIT entries
    x = torch.randn(1, 1, side, side)
    with pytest.raises(ValueError, match=rf"branch: method='dense' is limited to DENSE_LIMIT = "
                                         rf"{DENSE_LIMIT} .* has {side * side} \(shape \(1, "
                                         rf"{side}, {side}\)\).*use method='iterative'"):
        explicit_step_lipschitz(nn.Identity(), x, method="dense")
    with pytest.raises(ValueError, match=rf"{side * side}.*method='iterative'"):
        implicit_step_lipschitz(nn.Identity(), x, method="dense")
    with pytest.raises(ValueError, match=rf"block: .* the output has {DENSE_LIMIT + 1} "
                                         rf"\(shape \({DENSE_LIMIT + 1},\)\)"):
        block_map_lipschitz(nn.Linear(2, DENSE_LIMIT + 1), torch.randn(1, 2), method="dense")
    # a whole model is refused before anything is measured, naming the block: 16×17×17
    model = build_model("wrn-10-1", (1, 17, 17), 3).eval()
    with pytest.raises(ValueError, match=r"block stages\.0\.0: method='dense' .* the input "
                                         r"has 4624 \(shape \(16, 17, 17\)\)"):
        model_stability(model, torch.rand(1, 1, 17, 17), method="dense")


# ------------------------------------------------------------------- errors and side effects


@pytest.mark.filterwarnings("ignore::pyeuler.stability.ConvergenceWarning")
def test_batchnorm_or_dropout_in_training_mode_raises_naming_the_module():
    x = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"branch\.bn1 \(BatchNorm2d\) is in training mode"):
        explicit_step_lipschitz(PreActBranch(3, norm="batch").train(), x)
    with pytest.raises(ValueError, match=r"branch\.bn1 \(BatchNorm2d\) is in training mode"):
        implicit_step_lipschitz(PreActBranch(3, norm="batch").train(), x)
    with pytest.raises(ValueError, match=r"dropout=0\.2\) is in training mode"):
        explicit_step_lipschitz(PreActBranch(3, norm="group", dropout=0.2).train(), x)
    seq = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    with pytest.raises(ValueError, match=r"branch\.1 \(Dropout, p=0\.5\)"):
        explicit_step_lipschitz(seq, torch.randn(2, 4))
    model = build_model("mlp-8-2", (2,), 2, norm="batch").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.stages\.0\.0\.branch\.bn1 \(BatchNorm1d\)"):
        model_stability(model, torch.randn(4, 2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # GroupNorm in training mode treats samples independently: allowed, and stays in training
    branch = PreActBranch(3, norm="group").train()
    explicit_step_lipschitz(branch, x, iters=3)
    assert branch.training


def test_bad_arguments():
    layer = _linear()
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="theta"):
        implicit_step_lipschitz(layer, x, theta=1.5)
    with pytest.raises(ValueError, match="iters"):
        explicit_step_lipschitz(layer, x, iters=0)
    with pytest.raises(ValueError, match="method"):
        explicit_step_lipschitz(layer, x, method="svd")
    with pytest.raises(ValueError, match="NaN"):
        explicit_step_lipschitz(layer, torch.full((2, 6), math.nan, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        explicit_step_lipschitz(layer, torch.ones(2, 6, dtype=torch.int64))
    empty, info = explicit_step_lipschitz(layer, x[:0], return_info=True)
    assert empty.shape == (0,) and info.converged.shape == (0,)


@pytest.mark.filterwarnings("ignore::pyeuler.stability.ConvergenceWarning")
def test_buffers_and_modes_unchanged():
    """BatchNorm models in eval mode, as the diagnostics need them: running statistics and
    num_batches_tracked untouched (pyeuler's norm_act_module would increment it in training
    mode), parameters untouched, every module's mode unchanged."""
    torch.manual_seed(0)
    branch = _perturbed_branch(norm="batch", dtype=torch.float32)
    model = build_model("mlp-8-3", (2,), 2, norm="batch", ie_steps=1).eval()
    for module in (branch, model):
        before = {k: v.clone() for k, v in module.state_dict().items()}
        modes = [m.training for m in module.modules()]
        if module is branch:
            x = torch.randn(2, 3, 3, 3)
            for method in METHODS:
                explicit_step_lipschitz(module, x, iters=5, method=method)
                implicit_step_lipschitz(module, x, iters=5, method=method)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model_stability(module, torch.rand(4, 2), iters=5)
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert [m.training for m in module.modules()] == modes


def test_deterministic_given_generator_and_warns_naming_samples():
    branch = _perturbed_branch(h=1.0, dtype=torch.float32)
    x = torch.randn(3, 3, 3, 3)
    with pytest.warns(ConvergenceWarning, match=r"3 of 3 samples did not converge within "
                                                r"iters=2 \(tol=1e-05\): samples \[0, 1, 2\]"):
        a, info = explicit_step_lipschitz(branch, x, iters=2, generator=_gen(7),
                                          method="iterative", return_info=True)
    assert not info.converged.any() and info.iterations.tolist() == [2, 2, 2]
    with pytest.warns(ConvergenceWarning):
        b = explicit_step_lipschitz(branch, x, iters=2, generator=_gen(7), method="iterative")
    assert torch.equal(a, b)
    c, info = implicit_step_lipschitz(branch, x, generator=_gen(3), method="iterative",
                                      return_info=True)
    d = implicit_step_lipschitz(branch, x, generator=_gen(3), method="iterative")
    assert torch.equal(c, d)
    assert info.converged.dtype == torch.bool and info.iterations.dtype == torch.int64
    assert c.dtype == torch.float32 and c.shape == (3,)


# ---------------------------------------------------------------------------- whole models


def test_model_stability_on_ie_mlp():
    model = build_model("mlp-6-2", (2,), 2, ie_steps=2, h=0.5).double().eval()
    x = torch.rand(5, 2, dtype=torch.float64)
    res = model_stability(model, x, generator=_gen(), **EXACT)
    assert [b.kind for b in res.blocks] == ["ie-skip", "ie-skip"]
    assert res.noise_amplification.shape == (3, 5) and res.feature_norms.shape == (3, 5)
    torch.testing.assert_close(res.noise_amplification[0], torch.ones(5, dtype=torch.float64))
    # the per-block numbers are the standalone functions' at the block's input / IE output
    stem = model.stem(x)
    block = model.stages[0][0]
    torch.testing.assert_close(res.blocks[0].explicit_x0,
                               explicit_step_lipschitz(block.branch, stem, **EXACT))
    torch.testing.assert_close(res.blocks[0].implicit_out,
                               implicit_step_lipschitz(block.branch, block(stem), **EXACT))
    # ‖J_block‖₂ of the K-step map, against its dense Jacobian
    jac = _dense_jacobians(block, stem)
    torch.testing.assert_close(res.blocks[0].map_lipschitz, torch.linalg.svdvals(jac)[:, 0])
    torch.testing.assert_close(res.feature_norms[0], stem.norm(dim=1))
    for b in res.blocks:
        assert b.pass_rate("implicit_out") == float((b.implicit_out <= 1).double().mean())
    again = model_stability(model, x, generator=_gen(), **EXACT)
    assert torch.equal(again.noise_amplification, res.noise_amplification)
    assert all(torch.equal(a.implicit_out, b.implicit_out)
               for a, b in zip(again.blocks, res.blocks))
    d = res.to_dict()
    json.dumps(d)
    assert d["depth"] == [0, 1, 2] and d["blocks"][1]["explicit_x0"]["pass_rate"] is not None
    assert "‖J_block‖₂" in res.table() and "ie-skip" in res.table()


def test_model_stability_finds_ie_skips_in_any_module():
    from pyeuler.nn import IESkip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4, bias=False),
                          IESkip(PreActBranch(4, norm="group", dim=0, h=0.5), steps=1)).double()
    res = model_stability(model, torch.rand(3, 2, dtype=torch.float64), generator=_gen())
    assert [(b.name, b.kind, b.ie_steps) for b in res.blocks] == [("1", "ie-skip", 1)]
    assert res.blocks[0].map_lipschitz.shape == (3,)


def test_model_stability_labels_post_activation_and_down_sampling_blocks():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        wrn = model_stability(build_model("wrn-10-1", (1, 4, 4), 3).eval(), x, iters=30,
                              perturb="input")
        res = model_stability(build_model("resnet-8", (1, 4, 4), 3).eval(), x, iters=30)
    assert [b.kind for b in wrn.blocks] == ["residual", "down-sampling", "down-sampling"]
    assert wrn.blocks[1].explicit_x0 is None and wrn.blocks[1].map_lipschitz is not None
    assert [b.kind for b in res.blocks] == ["post-activation"] * 3
    assert all(b.explicit_x0 is None and b.map_lipschitz.shape == (2,) for b in res.blocks)
    assert "whole block map" in res.blocks[0].note


# --------------------------------------------------------------------------------- the CLI


def test_cli_smoke_moons(tmp_path):
    cmd = [sys.executable, "-m", "pyeuler", "stability", "--data", "moons", "--model", "mlp-6-2",
           "--ie-steps", "0", "1", "--samples", "6", "--iters", "50", "--out", str(tmp_path),
           "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "‖I+J_f‖ @x0" in proc.stdout and "ie-skip" in proc.stdout
    out = json.loads((tmp_path / "moons-mlp-6-2-K0_1-seed0.stability.json").read_text())
    assert [r["ie_steps"] for r in out["results"]] == [0, 1]
    block = out["results"][1]["blocks"][0]
    assert block["kind"] == "ie-skip" and len(block["implicit_out"]["values"]) == 6
    assert len(out["results"][1]["noise_amplification"]["values"]) == 3  # depths 0..2
    assert (tmp_path / "moons-mlp-6-2-K0_1-seed0.stability.png").stat().st_size > 1000


@pytest.mark.filterwarnings("ignore::pyeuler.stability.ConvergenceWarning")
def test_cli_checkpoint(tmp_path, capsys):
    model = build_model("mlp-6-2", (2,), 2, ie_steps=1)
    path = save_checkpoint(tmp_path / "m.pt", model, name="mlp-6-2",
                           model_kwargs={"ie_steps": 1, "norm": "group"},
                           config={"data": "moons", "seed": 0})
    rc = main(["stability", "--checkpoint", str(path), "--samples", "4", "--iters", "20",
               "--no-plot", "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "m.stability.json").read_text())["data"] == "moons"
    rc = main(["stability", "--checkpoint", str(path), "--model", "mlp"])
    assert rc == 2 and "exclude each other" in capsys.readouterr().err


def test_cli_dense_too_large_is_one_line_naming_the_block(tmp_path):
    """wrn-10-5 on 8×8 digits: the first block's output has 80·8·8 = 5120 entries."""
    cmd = [sys.executable, "-m", "pyeuler", "stability", "--data", "digits", "--model",
           "wrn-10-5", "--ie-steps", "0", "--method", "dense", "--samples", "2", "--no-plot",
           "--out", str(tmp_path), "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("pyeuler: error: digits-wrn-10-5-K0-seed0: block stages.0.0: "
                           "--method dense is limited to DENSE_LIMIT = 4096"), line
    assert "5120 (shape (80, 8, 8))" in line and "use --method iterative" in line
    assert "method=" not in line  # the command line's flag, not the Python argument
