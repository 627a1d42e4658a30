"""Shares of one tensor's gradient handed from backward kernel to backward kernel, summed in
the next kernel's epilogue instead of by the autograd engine.

A tensor read by n ops gets one gradient share per reader, and autograd sums them with
n − 1 passes of their own (each reads two tensors and writes one).  Inside an IE step the
readers of the iterate x, and of the branch's hidden activation, run their backwards in a
fixed order, the reverse of the forward's, because each reader's output feeds the next one:
the update's backward, then the residual's, then the branch evaluation's at x.  The block
input x0 likewise: the residuals read it as c, the explicit step ``x0 + f(x0)`` reads it,
and the branch evaluation at x0 read it first; and a plain block's input, read by its
branch and by the residual add.  A :class:`GradientRelay` joins those
readers' autograd nodes.  Each node but the last hands its shares on instead of returning
them: a node whose kernel can add them (``dx_addend`` of
:func:`pyeuler.ops.primitives.affine_act_backward_apply` and
:func:`~pyeuler.ops.primitives.ie_residual_with_term_adjoint`) sums what it was handed into
its own share, another passes them on beside its own.  The last node, the tensor's first
reader in the forward, returns the whole gradient.  Autograd sees one gradient and sums
nothing; no buffer autograd owns is written.

A relay is active only in a first-order backward: under ``create_graph`` (grad mode on in
the backward) every node returns its own share and autograd sums them differentiably.  It
is also active only when the engine will run the last reader in this backward
(``torch._C._will_engine_execute_node``), so that no share can be dropped.  Otherwise every
node returns its share as usual.  Shares are held for the backward call that computed them
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


def mark_relaying(ctx, *inputs: str) -> None:
    """Declare, in a custom op's ``setup_context``, the inputs (by name; default ``"x"``)
    whose gradient its backward relays with :func:`incoming` and :func:`hand_on`: only such
    nodes may join a relay of that input."""
    ctx.relayed_inputs = frozenset(inputs or ("x",))


class GradientRelay:
    """The readers of one tensor, in forward order, whose gradient shares are relayed.

    ``GradientRelay(first)`` starts at the autograd node of the tensor's first reader (an
    output's ``grad_fn``); :meth:`join` adds the next.  ``input`` names the argument through
    which the node reads the tensor.  If any reader cannot relay (its node is not a pyeuler
    op that :func:`mark_relaying` declared for that input), the relay never activates.
    """

    def __init__(self, first, input: str = "x"):
        self._nodes: list[weakref.ref] = []
        # the shares handed on, per backward call (graph task id); those left by a backward
        # that an exception stopped stay until the graph is freed
        self._shares: dict[int, list[Tensor]] = {}
        self._valid = True
        self.join(first, input)

    def join(self, node, input: str = "x") -> None:
        """Add ``node`` (an output's ``grad_fn``) as the tensor's next reader, reading it
        through its argument ``input``."""
        if (node is None or input not in getattr(node, "relayed_inputs", ())
                or not self._valid):
            self._valid = False
            return
        if not hasattr(node, "gradient_relays"):
            node.gradient_relays = {}
        node.gradient_relays[input] = (self, len(self._nodes))
        self._nodes.append(weakref.ref(node))

    def _active(self) -> bool:
        if not self._valid or len(self._nodes) < 2 or torch.is_grad_enabled():
            return False
        last = self._nodes[0]()
        return last is not None and torch._C._will_engine_execute_node(last)


def _relay_of(ctx, input: str) -> tuple[GradientRelay | None, int]:
    relay, position = getattr(ctx, "gradient_relays", {}).get(input, (None, 0))
    if relay is None or not relay._active():
        return None, 0
    return relay, position


def incoming(ctx, input: str = "x", at_most: int | None = None) -> tuple[Tensor, ...]:
    """The shares of ``input``'s gradient handed on to this node in this backward call by
    the readers whose backwards ran before it; empty when there are none or no relay is
    active.  With ``at_most`` (the addends the node's kernel takes), any surplus is summed
    into the last one by unfused adds, as autograd would have summed them."""
    relay, _ = _relay_of(ctx, input)
    if relay is None:
        return ()
    shares = relay._shares.pop(torch._C._current_graph_task_id(), [])
    if at_most is not None and len(shares) > at_most:
        shares[at_most - 1:] = [sum(shares[at_most:], shares[at_most - 1])]
    return tuple(shares)


def hand_on(ctx, *shares: Tensor | None, input: str = "x") -> Tensor | None:
    """What this node returns for ``input``: the sum of ``shares`` (its own and any it was
    handed and did not add in its kernel; None entries skipped) at the last reader or
    without an active relay; else None, having handed the shares on to the next reader."""
    shares = [share for share in shares if share is not None]
    relay, position = _relay_of(ctx, input)
    if relay is None or position == 0:
        return sum(shares[1:], shares[0]) if shares else None
    relay._shares.setdefault(torch._C._current_graph_task_id(), []).extend(shares)
    return None
