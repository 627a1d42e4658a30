"""Arguments that moved from positional to keyword-only (CHANGELOG 0.2.0) keep working for a
release: bound by their old names, with a DeprecationWarning that names them."""

import inspect
import warnings

import pytest
import torch

from pyeuler.models import mlp_resnet, preact_resnet, resnet_cifar, wide_resnet
from pyeuler.models.resnet_cifar import ResNetCifar
from pyeuler.nn import EulerBasicBlock, IESkip, PreActBranch
from pyeuler.nn.deprecation import keyword_only_since


@keyword_only_since("b", "c")
def _moved(a, *, b=2, c=3, d=4):
    return a, b, c, d


def test_helper_binds_moved_arguments_by_their_old_names_and_warns():
    with pytest.warns(DeprecationWarning, match=r"_moved\(\): passing b, c by position .* b=\.\.\., c=\.\.\."):
        assert _moved(1, 20, 30) == (1, 20, 30, 4)
    with pytest.warns(DeprecationWarning, match="passing b by position"):
        assert _moved(1, 20, d=40) == (1, 20, 3, 40)


def test_helper_is_silent_for_keyword_calls_and_keeps_the_new_signature():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _moved(1, c=30) == (1, 2, 30, 4)
    assert list(inspect.signature(_moved).parameters) == ["a", "b", "c", "d"]
    assert inspect.signature(_moved).parameters["b"].kind is inspect.Parameter.KEYWORD_ONLY


def test_helper_refuses_too_many_or_duplicated_arguments():
    with pytest.raises(TypeError, match="at most 3 positional arguments"):
        _moved(1, 2, 3, 4)
    with pytest.raises(TypeError, match="multiple values for b"):
        _moved(1, 2, b=5)


def test_helper_refuses_a_name_that_is_not_keyword_only():
    with pytest.raises(TypeError, match="not keyword-only"):
        keyword_only_since("a")(lambda a, *, b=1: a)


def test_the_warning_points_at_the_caller():
    with pytest.warns(DeprecationWarning) as record:
        IESkip(PreActBranch(4, norm="group"), 2)
    assert record[0].filename == __file__


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# (old positional call, the same call by keyword, attributes that must agree)
OLD_CALLS = [
    (lambda: IESkip(PreActBranch(4, norm="group"), 3, 0.2, 0.5, "detached", "first", "eager"),
     lambda: IESkip(PreActBranch(4, norm="group"), steps=3, step_size=0.2, theta=0.5,
                    grad="detached", bn_update="first", backend="eager"),
     ("steps", "step_size", "theta", "grad", "bn_update", "backend")),
    (lambda: PreActBranch(4, "group", 0.25), lambda: PreActBranch(4, norm="group", dropout=0.25),
     ("dropout",)),
    (lambda: EulerBasicBlock(4, 8, 2, 0.1), lambda: EulerBasicBlock(4, 8, 2, h=0.1), ("h",)),
    (lambda: resnet_cifar(8, 0.1, 5, 1), lambda: resnet_cifar(8, h=0.1, num_classes=5, in_channels=1),
     ()),
    (lambda: ResNetCifar(8, 0.1, 5), lambda: ResNetCifar(8, h=0.1, num_classes=5), ()),
    (lambda: preact_resnet(18, 2, 5, 1), lambda: preact_resnet(18, 2, num_classes=5, in_channels=1),
     ()),
    (lambda: wide_resnet(10, 1, 5, 1), lambda: wide_resnet(10, 1, num_classes=5, in_channels=1), ()),
    (lambda: mlp_resnet(2, 8, 2, 5), lambda: mlp_resnet(2, 8, 2, num_classes=5), ()),
]


@pytest.mark.parametrize("old, new, attributes", OLD_CALLS)
def test_old_positional_calls_build_the_same_module(old, new, attributes):
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="by position is deprecated"):
        a = old()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        b = new()
    assert _same_state(a, b)
    assert repr(a) == repr(b)
    for name in attributes:
        assert getattr(a, name) == getattr(b, name), name


def test_branch_head_tail_forward_take_backend_by_keyword_old_positional_warns():
    branch = PreActBranch(4, norm="group")
    x = torch.randn(2, 4, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        expected = branch(x, backend="reference")
        a = branch.head(x, backend="eager")
        t = branch.tail(a, backend="eager")
    with pytest.warns(DeprecationWarning, match=r"PreActBranch.head\(\): passing backend"):
        assert torch.equal(branch.head(x, "eager"), a)
    with pytest.warns(DeprecationWarning, match=r"PreActBranch.tail\(\): passing backend"):
        assert torch.equal(branch.tail(a, "eager"), t)
    with pytest.warns(DeprecationWarning, match=r"PreActBranch.forward\(\): passing backend"):
        torch.testing.assert_close(branch(x, "reference"), expected, rtol=0, atol=0)
