"""Model builders: CIFAR ResNets with step factor h, PreAct-ResNets, WideResNets, a residual MLP.

Every builder takes the step factor and IE-Skip arguments the same way: ``h``, ``h_mode``,
``ie_steps``, ``ie_step_size``, ``theta``, ``grad``, ``bn_update``, ``backend``
(:func:`resnet_cifar` is the post-activation net of the step-factor paper: h only).
"""

from pyeuler.models.preact import PreActNet, mlp_resnet, preact_resnet, wide_resnet
from pyeuler.models.resnet_cifar import ResNetCifar, resnet_cifar

__all__ = ["PreActNet", "ResNetCifar", "mlp_resnet", "preact_resnet", "resnet_cifar", "wide_resnet"]
