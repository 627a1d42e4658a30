"""Shares of one tensor's gradient handed from backward kernel to backward kernel, summed in
the next kernel's epilogue instead of by the autograd engine.

A tensor read by n ops gets one gradient share per reader, and autograd sums them with
n − 1 passes of their own (each reads two tensors and writes one).  Inside an IE step the
readers of the iterate x, and of the branch's hidden activation, run their backwards in a
fixed order, the reverse of the forward's, because each reader's output feeds the next one:
the update's backward, then the residual's, then the branch evaluation's at x.  A
:class:`GradientRelay` joins those readers' autograd nodes.  Each node but the last hands
its share on instead of returning it, the next node adds it to its own in its kernel
(``dx_addend`` of :func:`pyeuler.ops.primitives.affine_act_backward_apply` and
:func:`~pyeuler.ops.primitives.ie_residual_with_term_adjoint`), and the last node, the
tensor's first reader in the forward, returns the whole gradient.  Autograd sees one
gradient and sums nothing; no buffer autograd owns is written.

A relay is active only in a first-order backward: under ``create_graph`` (grad mode on in
the backward) every node returns its own share and autograd sums them differentiably.  It
is also active only when the engine will run the last reader in this backward
(``torch._C._will_engine_execute_node``), so that no share can be dropped.  Otherwise every
node returns its share as usual.  A share is held for the backward call that computed it
(the engine's graph task), so backwards of one graph that overlap (one started from a hook
of another, or from another thread) or that follow one stopped by an exception never see
each other's shares.  Host-side bookkeeping only, no device sync; not under
``torch.compile``, whose graphs sum the shares themselves.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = ["GradientRelay", "hand_on", "incoming", "mark_relaying"]


def mark_relaying(ctx) -> None:
    """Declare, in a custom op's ``setup_context``, that its backward calls :func:`incoming`
    and :func:`hand_on` for the input a relay follows (only such nodes may join one)."""
    ctx.relays_gradients = True


class GradientRelay:
    """The readers of one tensor, in forward order, whose gradient shares are relayed.

    ``GradientRelay(first)`` starts at the autograd node of the tensor's first reader (an
    output's ``grad_fn``); :meth:`join` adds the next.  If any reader cannot relay (its node
    is not a pyeuler op marked by :func:`mark_relaying`), the relay never activates.
    """

    def __init__(self, first):
        self._nodes: list[weakref.ref] = []
        # the share handed on, per backward call (graph task id); one left by a backward
        # that an exception stopped stays until the graph is freed
        self._shares: dict[int, Tensor] = {}
        self._valid = True
        self.join(first)

    def join(self, node) -> None:
        """Add ``node`` (an output's ``grad_fn``) as the tensor's next reader."""
        if node is None or not getattr(node, "relays_gradients", False) or not self._valid:
            self._valid = False
            return
        node.gradient_relay = (self, len(self._nodes))
        self._nodes.append(weakref.ref(node))

    def _active(self) -> bool:
        if not self._valid or len(self._nodes) < 2 or torch.is_grad_enabled():
            return False
        last = self._nodes[0]()
        return last is not None and torch._C._will_engine_execute_node(last)


def _relay_of(ctx) -> tuple[GradientRelay | None, int]:
    relay, position = getattr(ctx, "gradient_relay", (None, 0))
    if relay is None or not relay._active():
        return None, 0
    return relay, position


def incoming(ctx) -> Tensor | None:
    """The share handed on to this node, in this backward call, by the reader whose
    backward ran before it, to add to its own share; None when there is none or no relay
    is active."""
    relay, _ = _relay_of(ctx)
    if relay is None:
        return None
    return relay._shares.pop(torch._C._current_graph_task_id(), None)


def hand_on(ctx, grad: Tensor | None) -> Tensor | None:
    """What this node returns for the relayed input: ``grad`` (its share plus what it was
    handed) at the last reader or without an active relay; else None, having handed
    ``grad`` on to the next reader."""
    relay, position = _relay_of(ctx)
    if relay is None or position == 0:
        return grad
    if grad is not None:
        relay._shares[torch._C._current_graph_task_id()] = grad
    return None
