"""The prologue-fused convolution experiment (conv_prologue.py) computes what cuDNN does.

On a CPU the kernels run in Triton's interpreter at small odd shapes; on a GPU, compiled.
Reference: ``torch``'s convolution (and its weight gradient) of ``relu(scale·x + shift)``
rounded to x's dtype, evaluated in float64.  Tolerance, with ε the machine epsilon of x's
dtype (twice its unit roundoff): the kernel rounds the activation to x's dtype as the
reference does, but may round differently (the interpreter truncates where torch rounds to
nearest), which moves each product by at most ε·|a|·|w|; the bound doubles that for the
float32 sums, and rounding the forward's 16-bit output adds ε·|y|.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import conv_prologue as cp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = cp.ConvTiles(16, 16, 16, 4, 2, 3)  # several tiles and splits at the test shapes


def _inputs(n, c, h, w, k, dtype, stride, prologue):
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype).to(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, device=DEVICE).to(dtype)
    scale = torch.randn(c, device=DEVICE) if prologue else None
    shift = torch.randn(c, device=DEVICE) if prologue else None
    a = x.double()
    if prologue:
        a = torch.relu(x.float() * scale[:, None, None] + shift[:, None, None]).to(dtype).double()
    return x, weight, scale, shift, a


# channels (20) and output channels (24) not multiples of the 16-wide tiles, odd H and W
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("prologue", [True, False], ids=["prologue", "plain"])
def test_forward_and_weight_gradient_match_torch(dtype, stride, prologue):
    x, weight, scale, shift, a = _inputs(2, 20, 5, 7, 24, dtype, stride, prologue)
    eps = torch.finfo(dtype).eps
    y = cp.conv3x3(x, cp.gemm_weight(weight), scale, shift, stride, tiles=SMALL)
    expected = F.conv2d(a, weight.double(), padding=1, stride=stride)
    bound = 2 * eps * F.conv2d(a.abs(), weight.double().abs(), padding=1, stride=stride)
    bound += eps * expected.abs() + 1e-6
    assert y.shape == expected.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert ((y.double() - expected).abs() <= bound).all()

    dy = torch.randn(expected.shape, device=DEVICE).to(dtype).contiguous(
        memory_format=torch.channels_last)
    dw = cp.conv3x3_weight_grad(x, dy, scale, shift, stride, tiles=SMALL)

    def weight_grad(inp, grad_out):
        return torch.ops.aten.convolution_backward(
            grad_out, inp, weight.double(), None, [stride] * 2, [1, 1], [1, 1], False, [0, 0],
            1, [False, True, False])[1]

    expected_dw = weight_grad(a, dy.double())
    bound_dw = 2 * eps * weight_grad(a.abs(), dy.double().abs()) + 1e-6
    assert dw.shape == weight.shape and dw.dtype == torch.float32
    assert ((dw.double() - expected_dw).abs() <= bound_dw).all()


def test_padding_is_zero_after_the_prologue():
    """relu(shift) > 0 where x is 0: a kernel that padded x instead of the activation would
    add shift's ReLU at every border tap."""
    x = torch.zeros(1, 16, 3, 3, device=DEVICE, dtype=torch.bfloat16).to(
        memory_format=torch.channels_last)
    weight = torch.ones(16, 16, 3, 3, device=DEVICE, dtype=torch.bfloat16)
    scale, shift = torch.ones(16, device=DEVICE), torch.ones(16, device=DEVICE)
    y = cp.conv3x3(x, cp.gemm_weight(weight), scale, shift, tiles=SMALL)
    taps = F.conv2d(torch.ones(1, 1, 3, 3, device=DEVICE), torch.ones(1, 1, 3, 3, device=DEVICE),
                    padding=1)  # how many taps of each output fall inside the image
    assert torch.equal(y.float(), (16 * taps).expand(1, 16, 3, 3))  # ≤ 144: exact in bf16


@pytest.mark.parametrize("call, message", [
    (lambda x, w, s: cp.conv3x3(x.contiguous(), cp.gemm_weight(w)), "x: expected a channels-last"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), s, None), "scale and shift: give both"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), s.double(), s),
     "scale: expected float32 of shape"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), stride=3), "stride: expected the int 1 or 2"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w.float())), "weight_rsck: expected contiguous"),
    (lambda x, w, s: cp.conv3x3(x, w), "weight_rsck: expected contiguous"),
    (lambda x, w, s: cp.conv3x3_weight_grad(x, x, s, s, stride=2), "dy: expected channels-last"),
    (lambda x, w, s: cp.gemm_weight(w[..., :2]), "weight: expected \\(K, C, 3, 3\\)"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w)[..., None]), "weight_rsck: expected"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w)[..., 0]), "weight_rsck: expected"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), stride=2.0), "stride: expected the int"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), s.to("meta"), s),
     "scale: expected float32 of shape \\(16,\\) on"),
    (lambda x, w, s: cp.conv3x3_weight_grad(x, x.to("meta"), s, s), "dy: expected"),
])
def test_bad_arguments_are_named(call, message):
    x = torch.randn(1, 16, 4, 4, device=DEVICE).to(torch.bfloat16).to(
        memory_format=torch.channels_last)
    weight = torch.randn(16, 16, 3, 3, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        call(x, weight, torch.ones(16, device=DEVICE))


def test_float32_is_refused():
    """Only 16-bit inputs: float32 tiles would need more shared memory than a block has."""
    x = torch.randn(1, 16, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="x: expected bfloat16 or float16, got torch.float32"):
        cp.conv3x3(x, cp.gemm_weight(torch.randn(16, 16, 3, 3, device=DEVICE)))


@pytest.mark.parametrize("field, value", [("block_m", 8), ("block_k", 48), ("split_m", 0),
                                          ("num_warps", -1), ("num_stages", True)])
def test_bad_tilings_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}: expected"):
        cp.ConvTiles(**{field: value})


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_any_scale_and_shift_layout_gives_torch_result(layout):
    """The kernels index scale and shift densely: the wrappers make them so."""
    x, weight, _, _, _ = _inputs(2, 20, 5, 7, 24, torch.bfloat16, 1, False)
    if layout == "strided":
        scale, shift = torch.randn(40, device=DEVICE)[::2], torch.randn(40, device=DEVICE)[1::2]
    else:
        scale, shift = torch.tensor([0.5], device=DEVICE).expand(20), torch.randn(20, device=DEVICE)
    a = torch.relu(x.float() * scale[:, None, None] + shift[:, None, None]).to(x.dtype).double()
    eps = torch.finfo(x.dtype).eps
    y = cp.conv3x3(x, cp.gemm_weight(weight), scale, shift, tiles=SMALL)
    expected = F.conv2d(a, weight.double(), padding=1)
    bound = 2 * eps * F.conv2d(a.abs(), weight.double().abs(), padding=1) + eps * expected.abs()
    assert ((y.double() - expected).abs() <= bound + 1e-6).all()
    dy = torch.randn(expected.shape, device=DEVICE).to(x.dtype).contiguous(
        memory_format=torch.channels_last)
    dw = cp.conv3x3_weight_grad(x, dy, scale, shift, tiles=SMALL)

    def weight_grad(inp, grad_out):
        return torch.ops.aten.convolution_backward(
            grad_out, inp, weight.double(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [False, True, False])[1]

    bound_dw = 2 * eps * weight_grad(a.abs(), dy.double().abs()) + 1e-6
    assert ((dw.double() - weight_grad(a, dy.double())).abs() <= bound_dw).all()


def test_a_tile_beyond_the_shared_memory_of_a_block_is_a_failure():
    """float32 weight-gradient tiles needed 294,912 B, more than sm_90's 232,448 B per block:
    they compile, but cannot launch."""
    cp._check_launchable(232448, 90)
    with pytest.raises(RuntimeError, match="needs 294912 B of shared memory, sm_90 gives"):
        cp._check_launchable(294912, 90)


def test_the_kernels_compile_for_sm90():
    """The interpreter never lowers a kernel: compile the default tiling's variants to cubin
    in a process without TRITON_INTERPRET (the full sweep: ``--compile-check 90``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default; silences 3.9's warning
    code = ("import sys, conv_prologue as cp; failed = cp.compile_check(90, cp.TILINGS[:1]); "
            "print(*failed, sep='\\n'); sys.exit(bool(failed))")
    done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
