"""The prologue-fused convolution experiment (conv_prologue.py) computes what cuDNN does.

On a CPU the kernels run in Triton's interpreter at small odd shapes; on a GPU, compiled.
Reference: ``torch``'s convolution (and its weight gradient) of ``relu(scale·x + shift)``
rounded to x's dtype, evaluated in float64.  Tolerance: the kernel rounds the activation
to x's dtype (the interpreter truncates where the GPU rounds to nearest), which moves each
product by at most 2·u·|a|·|w| (u the unit roundoff), and a 16-bit output adds u·|y|.
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


def _unit_roundoff(dtype: torch.dtype) -> float:
    # float32 on a GPU multiplies in TF32 (10 explicit mantissa bits), as cuDNN may
    return 2.0**-11 if dtype == torch.float32 else torch.finfo(dtype).eps


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("prologue", [True, False], ids=["prologue", "plain"])
def test_forward_and_weight_gradient_match_torch(dtype, stride, prologue):
    x, weight, scale, shift, a = _inputs(2, 20, 5, 7, 24, dtype, stride, prologue)
    u = _unit_roundoff(dtype)
    y = cp.conv3x3(x, cp.gemm_weight(weight), scale, shift, stride, tiles=SMALL)
    expected = F.conv2d(a, weight.double(), padding=1, stride=stride)
    bound = 2 * u * F.conv2d(a.abs(), weight.double().abs(), padding=1, stride=stride)
    bound += (u if dtype != torch.float32 else 0) * expected.abs() + 1e-6
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
    bound_dw = 2 * u * weight_grad(a.abs(), dy.double().abs()) + 1e-6
    assert dw.shape == weight.shape and dw.dtype == torch.float32
    assert ((dw.double() - expected_dw).abs() <= bound_dw).all()


def test_padding_is_zero_after_the_prologue():
    """relu(shift) > 0 where x is 0: a kernel that padded x instead of the activation would
    add shift's ReLU at every border tap."""
    x = torch.zeros(1, 16, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)
    weight = torch.ones(16, 16, 3, 3, device=DEVICE)
    scale, shift = torch.ones(16, device=DEVICE), torch.ones(16, device=DEVICE)
    y = cp.conv3x3(x, cp.gemm_weight(weight), scale, shift, tiles=SMALL)
    taps = F.conv2d(torch.ones(1, 1, 3, 3, device=DEVICE), torch.ones(1, 1, 3, 3, device=DEVICE),
                    padding=1)  # how many taps of each output fall inside the image
    assert torch.equal(y, (16 * taps).expand(1, 16, 3, 3))


@pytest.mark.parametrize("call, message", [
    (lambda x, w, s: cp.conv3x3(x.contiguous(), cp.gemm_weight(w)), "x: expected a channels-last"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), s, None), "scale and shift: give both"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), s.double(), s),
     "scale: expected float32 of shape"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w), stride=3), "stride: expected 1 or 2"),
    (lambda x, w, s: cp.conv3x3(x, cp.gemm_weight(w.float())), "weight_rsck: expected contiguous"),
    (lambda x, w, s: cp.conv3x3(x, w), "weight_rsck: expected contiguous"),
    (lambda x, w, s: cp.conv3x3_weight_grad(x, x, s, s, stride=2), "dy: expected channels-last"),
    (lambda x, w, s: cp.gemm_weight(w[..., :2]), "weight: expected \\(K, C, 3, 3\\)"),
])
def test_bad_arguments_are_named(call, message):
    x = torch.randn(1, 16, 4, 4, device=DEVICE).to(torch.bfloat16).to(
        memory_format=torch.channels_last)
    weight = torch.randn(16, 16, 3, 3, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        call(x, weight, torch.ones(16, device=DEVICE))


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
