"""Models by name, for the CLI, checkpoints and the report.

Names: ``resnet-D`` (post-activation CIFAR ResNet, D = 6n+2: 20, 32, 44, 56, 110, 218),
``preact-18|34|50``, ``wrn-D-W`` (WideResNet, D = 6n+4, e.g. ``wrn-34-10``; ``wrn-10-1``
is tiny), ``mlp`` or ``mlp-WIDTH-DEPTH`` (residual MLP; default width 32, depth 4).
"""

from __future__ import annotations

import math
import re

import torch.nn as nn

__all__ = ["build_model", "default_model", "MODEL_NAMES", "is_ie_capable"]

MODEL_NAMES = ("resnet-20|32|44|56|110|218", "preact-18|34|50", "wrn-34-10 (wrn-D-W)",
               "mlp (mlp-WIDTH-DEPTH)")

_DEFAULTS = {"digits": "wrn-10-1", "moons": "mlp", "cifar10": "preact-18"}


def default_model(data: str) -> str:
    """The model the CLI uses for ``data`` when ``--model`` is not given.

    Args:
        data: a dataset name (``"digits"``, ``"moons"``, ``"cifar10"``).

    Returns:
        A model name for :func:`build_model` (``"preact-18"`` for unknown data).

    Raises:
        Nothing.
    """
    return _DEFAULTS.get(data, "preact-18")


def is_ie_capable(name: str) -> bool:
    return not name.lower().startswith("resnet-")


def build_model(name: str, input_shape: tuple, num_classes: int, *, h: float = 1.0,
                ie_steps: int = 0, ie_step_size: float = 0.1, theta: float = 1.0,
                grad: str = "unrolled", norm: str | None = None, recompute: str = "selective",
                backend: str | None = None) -> nn.Module:
    """Build a pyeuler model by name for inputs of ``input_shape`` (without batch dim).

    Args:
        name: ``resnet-D``, ``preact-18|34|50``, ``wrn-D-W``, ``mlp`` or
            ``mlp-WIDTH-DEPTH`` (module docstring), any case.
        input_shape: one input's shape: ``(C, H, W)`` for the convolutional models; any
            shape for the MLP (flattened).
        num_classes: the number of logits.
        h: the step factor, a finite number > 0.
        ie_steps: IE-Skip steps K >= 0 (0 for ``resnet-D``).
        ie_step_size: γ of the IE steps.
        theta: θ in [0, 1].
        grad: ``"unrolled"``, ``"detached"`` or ``"implicit"``.
        norm: ``"batch"``, ``"group"`` (GroupNorm(1, C), the IE authors' choice) or None:
            ``"group"`` for the IE-capable models, BatchNorm for ``resnet-D`` (which has
            only BN).
        recompute: what ``grad="unrolled"`` IE-Skips on the fused backends recompute in the
            backward: ``"selective"`` (default), ``"full"`` (least memory) or ``"none"``
            (fewest bytes moved); :class:`pyeuler.nn.IESkip`.
        backend: the pyeuler backend (None: the process default).

    Returns:
        The model (an ``nn.Module`` mapping ``(N, *input_shape)`` to ``(N, num_classes)``
        logits; for an MLP on non-flat inputs, ``nn.Sequential(nn.Flatten(), net)``).

    Raises:
        ValueError: an unknown or malformed name; image models on non-image inputs; bad
            ``h``, ``ie_steps`` or ``norm``; IE-Skips or GroupNorm asked of ``resnet-D``;
            else as the builder.
    """
    from pyeuler import models

    key = name.strip().lower()
    input_shape = tuple(int(s) for s in input_shape)
    if isinstance(ie_steps, bool) or not isinstance(ie_steps, int) or ie_steps < 0:
        raise ValueError(f"ie_steps: expected an int >= 0, got {ie_steps!r}")
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
        raise ValueError(f"h: expected a positive number, got {h!r}")
    if norm not in (None, "batch", "group"):
        raise ValueError(f"norm: expected 'batch' or 'group', got {norm!r}")
    ie = dict(ie_steps=ie_steps, ie_step_size=ie_step_size, theta=theta, grad=grad,
              norm=norm or "group", recompute=recompute, backend=backend)

    if key.startswith("mlp"):
        m = re.fullmatch(r"mlp(?:-(\d+)-(\d+))?", key)
        if not m:
            raise ValueError(f"model: expected 'mlp' or 'mlp-WIDTH-DEPTH', got {name!r}")
        width, depth = (int(m.group(1)), int(m.group(2))) if m.group(1) else (32, 4)
        in_features = math.prod(input_shape)
        net = models.mlp_resnet(in_features=in_features, width=width, depth=depth,
                                num_classes=num_classes, h=h, **ie)
        return net if len(input_shape) == 1 else nn.Sequential(nn.Flatten(), net)

    if len(input_shape) != 3:
        raise ValueError(f"model: {name!r} is convolutional and needs image inputs (C, H, W); "
                         f"the data has inputs of shape {input_shape} (use --model mlp)")
    in_channels = input_shape[0]
    if key.startswith("resnet-"):
        m = re.fullmatch(r"resnet-(\d+)", key)
        depth = int(m.group(1)) if m else -1
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model: resnet-D needs D = 6n+2 (20, 32, 44, 56, 110, 218), got {name!r}")
        if norm == "group":
            raise ValueError(f"norm: {name!r} (post-activation ResNet) has BatchNorm only")
        if ie_steps:
            raise ValueError(f"ie_steps: {name!r} (post-activation ResNet) has no IE-Skips; "
                             "use preact-*, wrn-* or mlp for ie_steps > 0")
        return models.resnet_cifar(depth=depth, h=h, num_classes=num_classes,
                                   in_channels=in_channels)
    if key.startswith("preact-"):
        m = re.fullmatch(r"preact-(18|34|50)", key)
        if not m:
            raise ValueError(f"model: expected preact-18, preact-34 or preact-50, got {name!r}")
        return models.preact_resnet(depth=int(m.group(1)), num_classes=num_classes,
                                    in_channels=in_channels, h=h, **ie)
    if key.startswith("wrn-"):
        m = re.fullmatch(r"wrn-(\d+)-(\d+)", key)
        depth = int(m.group(1)) if m else -1
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model: wrn-D-W needs D = 6n+4 (e.g. wrn-34-10, wrn-10-1), got {name!r}")
        return models.wide_resnet(depth=depth, widen_factor=int(m.group(2)),
                                  num_classes=num_classes, in_channels=in_channels, h=h, **ie)
    raise ValueError(f"model: unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
