"""pyeuler modules: Euler residual blocks with step factor h, and IE-Skips."""

from pyeuler.nn.blocks import EulerBasicBlock, PreActBlock, PreActBottleneck, PreActBottleneckBranch
from pyeuler.nn.branch import PreActBranch
from pyeuler.nn.ie_skip import IESkip

__all__ = ["EulerBasicBlock", "IESkip", "PreActBlock", "PreActBottleneck", "PreActBottleneckBranch",
           "PreActBranch"]
