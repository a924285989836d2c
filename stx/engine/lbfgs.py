"""L-BFGS with one objective evaluation per step, built for GPUs, whose steps do not depend on
the loss's scale and which converges on trained features.

Each ``step(closure)`` evaluates the loss once, at a trial point ``x₀ + t·d`` along a direction
``d`` from a base point ``x₀``, and then either accepts it or takes it back:

- accepted when the loss fell enough (Armijo: ``f ≤ f₀ + 1e-4·t·g₀ᵀd``): the pair
  ``(s, y) = (t·d, g − g₀)`` joins the history if its curvature is positive
  (``sᵀy > 1e-10·‖s‖‖y‖``, a scale-free form of torch's ``sᵀy > 1e-10``), the trial becomes the
  base point and the next trial is ``lr`` along ``−H·g`` (``H₀ = γI``, ``γ = sᵀy / yᵀy`` of the
  newest kept pair), as in ``torch.optim.LBFGS(max_iter=1)``;
- rejected otherwise: the next trial is shorter along the same direction from the same base
  point, at the minimiser of the quadratic through ``f₀``, ``g₀ᵀd`` and ``f`` kept within
  [0.1, 0.5] × ``t`` (a backtracking line search spread over evaluations; the history is kept).

The first trial, and any after ``−H·g`` turns uphill (the history is then forgotten), goes along
``−g`` to where the loss's linear model reaches 0 (Polyak's step, ``lr·|f| / ‖g‖²``), which the
search shortens when the loss is far from 0. Every rule is the same for ``c·f`` as for ``f`` (the
same run whatever the score weights, as a sweep over them needs), and the run never stops on its
own (torch stops moving once ``max |g| ≤ 1e-7``, an absolute threshold that large images reach).

Why a search: a Gram loss is quartic in the pixels and a trained encoder's layers span orders of
magnitude, so the step that one short step's curvature pair suggests overshoots many times over;
undoing it and forgetting the pairs (stx's rule before) cycled forever on trained weights.

``H·g`` comes from the compact representation of the inverse Hessian (Byrd, Nocedal & Schnabel
1994, eq. 3.1) instead of the two-loop recursion:

    H·g = γg + [S γY] · [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] · [Sᵀg; γYᵀg]

where the rows of ``S`` and ``Y`` are the kept pairs (oldest first), ``R`` is the upper triangle
of ``SᵀY`` and ``D`` its diagonal. The pairs live in one ``2m × n`` ring buffer, so a step reads
the history twice (one product for ``Sᵀg``, ``Yᵀg`` and the new pair's inner products, one for
``H·g``) where the two-loop recursion reads it four times, in about 60 kernels instead of ~6m.
After the first step a step never waits for the device: which pairs count, where the next one
goes, whether a trial is accepted and how far to go next are tensors, not Python branches (``torch.optim.LBFGS`` copies
a value to the host twice per pair), so a whole step can be captured in a CUDA graph
(:mod:`stx.engine.optim` does). The ``m × m`` algebra runs in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

FIRST_STEP_FALL = 1.0
"""A first trial is as long as the loss's linear model needs to fall by this fraction of |loss|."""
ARMIJO = 1e-4
"""A trial point is accepted when ``f ≤ f_base + ARMIJO·t·gᵀd`` (sufficient decrease), else the
step is taken back and retried shorter along the same direction."""
CURVATURE_EPS = 1e-10
"""A pair is kept only when ``sᵀy > CURVATURE_EPS·‖s‖‖y‖`` (its curvature is positive)."""


def _plain(method: Callable) -> Callable:
    """``method`` of ``torch.optim.Optimizer`` without torch's ``_disable_dynamo`` wrapper, whose first
    call imports ``torch._dynamo``: about 3 s of every job's start-up. stx never compiles the
    optimiser (a step is replayed from a CUDA graph instead), so the wrapper has nothing to do."""
    return getattr(method, "__wrapped__", method)


class LBFGS(Optimizer):
    """L-BFGS with one evaluation per ``step(closure)`` (see the module's docstring); the state's
    ``backtracks`` counts the trials taken back.

    ``history_size``: curvature pairs kept (each costs two parameter-sized vectors);
    ``tolerance_grad``: no step is taken while the largest gradient entry is at most this (0:
    only at a zero gradient; an absolute threshold depends on the loss's scale);
    ``tolerance_change``: a direction whose slope ``gᵀd`` is above ``−tolerance_change`` is not
    taken: the pairs are forgotten and the step is a first step along ``−g``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1.0,
        history_size: int = 100,
        tolerance_grad: float = 0.0,
        tolerance_change: float = 0.0,
    ) -> None:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r} is not valid: use a number > 0")
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise ValueError(f"history_size={history_size!r} is not valid: use a whole number >= 1")
        defaults = dict(lr=lr, history_size=history_size, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS takes one parameter group")
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]

    add_param_group = _plain(Optimizer.add_param_group)
    zero_grad = _plain(Optimizer.zero_grad)
    state_dict = _plain(Optimizer.state_dict)

    @property
    def started(self) -> bool:
        """Whether the first step was taken: every later step is free of host synchronisation."""
        return self.state[self._params[0]].get("n_iter", 0) > 0

    def reset(self) -> None:
        """Forget every pair and start again with a first step, keeping the state's tensors
        (a captured CUDA graph goes on using them)."""
        state = self.state[self._params[0]]
        if "history" in state:
            state["kept"].zero_()
            state["head"].zero_()
            state["gamma"].fill_(1.0)
        state["n_iter"] = 0

    def load_state_dict(self, state_dict: dict) -> None:
        _plain(Optimizer.load_state_dict)(self, state_dict)
        state = self.state[self._params[0]]
        if "history" in state:  # Optimizer.load_state_dict casts every tensor to the parameter's dtype
            state["kept"], state["head"] = state["kept"].bool(), state["head"].long()

    def _flat_grad(self) -> torch.Tensor:
        grads = [torch.zeros_like(p).view(-1) if p.grad is None else p.grad.reshape(-1) for p in self._params]
        return grads[0] if len(grads) == 1 else torch.cat(grads)

    @torch.no_grad()
    def _move(self, direction: torch.Tensor, length: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.add_(direction[offset:offset + n].view_as(p) * length)
            offset += n

    def _state(self, g: torch.Tensor) -> dict:
        state = self.state[self._params[0]]
        if "history" not in state:
            m = self.defaults["history_size"]
            state.update(
                n_iter=0,
                history=g.new_zeros(2 * m, g.numel()),  # rows: s of each slot, then y of each slot
                sy=g.new_zeros(m, m),  # sy[i, j] = s_i · y_j
                yy=g.new_zeros(m, m),  # yy[i, j] = y_i · y_j
                kept=torch.zeros(m, dtype=torch.bool, device=g.device),  # slots holding a kept pair
                head=torch.zeros((), dtype=torch.long, device=g.device),  # the slot the next pair goes to
                gamma=g.new_ones(()),
                direction=torch.zeros_like(g),
                length=g.new_zeros(()),
                previous_grad=torch.zeros_like(g),  # at the base point: the last accepted one
                base_loss=g.new_zeros(()),  # f at the base point
                slope=g.new_zeros(()),  # gᵀd at the base point (< 0)
                backtracks=torch.zeros((), dtype=torch.long, device=g.device),  # evaluations rejected so far
            )
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """Evaluate ``closure`` (which zeroes the gradients, computes the loss and calls
        ``backward``) once and take one step; return the loss it gave."""
        with torch.enable_grad():
            loss = closure()
        group = self.param_groups[0]
        g = self._flat_grad()
        state = self._state(g)
        if state["n_iter"] == 0:
            if g.abs().max().item() <= group["tolerance_grad"]:
                return loss
            state["direction"].copy_(-g)
            state["length"].copy_(self._first_length(loss, g))
            state["previous_grad"].copy_(g)
            state["base_loss"].copy_(loss.detach())
            state["slope"].copy_(-g.dot(g))
            self._move(state["direction"], state["length"])
        else:
            self._later_step(state, g, group, loss)
        state["n_iter"] += 1
        return loss

    def _first_length(self, loss: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Length of a first trial along ``−g``: ``lr`` × the one over which the loss's linear
        model falls by :data:`FIRST_STEP_FALL` × |loss| (Polyak's step towards 0)."""
        return self.defaults["lr"] * FIRST_STEP_FALL * loss.detach().abs().to(g.dtype) / g.dot(g)

    def _later_step(self, state: dict, g: torch.Tensor, group: dict, loss: torch.Tensor) -> None:
        """Judge the trial point just evaluated: accepted (Armijo), record its pair if its
        curvature is positive and step along ``−H·g``; rejected, backtrack along the same
        direction from the base point."""
        m = group["history_size"]
        history, sy, yy, kept, head, gamma = (state[k] for k in ("history", "sy", "yy", "kept", "head", "gamma"))
        f = loss.detach().to(g.dtype)
        base_loss, slope, length = state["base_loss"], state["slope"], state["length"]
        # Armijo: the trial fell by at least ARMIJO × what the base point's slope promised.
        sufficient = f <= base_loss + ARMIJO * length * slope
        s = state["direction"] * length
        y = g - state["previous_grad"]
        vectors = torch.stack([g, y, s], dim=1)
        old = history @ vectors  # 2m × 3: every stored row · g, y, s
        (s_g, s_y, s_s), (y_g, y_y, _) = (torch.stack([s, y]) @ vectors).unbind(0)
        converged = (g.abs().max() <= group["tolerance_grad"]) & sufficient
        accept = (s_y > CURVATURE_EPS * (s_s * y_y).sqrt()) & sufficient & ~converged
        slot = torch.arange(m, device=g.device) == head  # one-hot: where the new pair goes
        new = slot & accept
        rows = torch.stack([head, head + m])
        history.index_copy_(0, rows, torch.where(accept, torch.stack([s, y]), history.index_select(0, rows)))
        column = torch.where(slot, s_y, old[:m, 1])  # s_i · y_new
        row = torch.where(slot, s_y, old[m:, 2])  # s_new · y_j
        sy.copy_(torch.where(new[:, None], row[None, :], torch.where(new[None, :], column[:, None], sy)))
        yy_new = torch.where(slot, y_y, old[m:, 1])
        yy.copy_(torch.where(new[:, None], yy_new[None, :], torch.where(new[None, :], yy_new[:, None], yy)))
        a = torch.where(new, s_g, old[:m, 0])  # Sᵀg
        b = torch.where(new, y_g, old[m:, 0])  # Yᵀg
        kept |= new
        gamma.copy_(torch.where(accept, s_y / y_y, gamma))
        head.copy_((head + accept) % m)

        order = (head + torch.arange(m, device=g.device)) % m  # oldest slot first
        mask = kept.index_select(0, order).double()
        both = mask[:, None] * mask[None, :]
        sy_kept = sy.index_select(0, order).index_select(1, order).double() * both
        r = sy_kept.triu() + torch.diag(1.0 - mask)  # identity rows for empty slots: they contribute 0
        gamma64 = gamma.double()
        w = torch.linalg.solve_triangular(r, (a.index_select(0, order).double() * mask)[:, None], upper=True)[:, 0]
        yy_kept = yy.index_select(0, order).index_select(1, order).double() * both
        inner = sy_kept.diagonal() * w + gamma64 * (yy_kept @ w) - gamma64 * b.index_select(0, order) * mask
        u = torch.linalg.solve_triangular(r.T, inner[:, None], upper=False)[:, 0]
        coefficients = history.new_zeros(2 * m)  # of S's rows, then Y's, in slot order
        coefficients.index_copy_(0, torch.cat([order, m + order]), torch.cat([u, -gamma64 * w]).to(history.dtype))
        direction = -(gamma * g + coefficients @ history)

        # Rounding can leave H·g pointing uphill: forget the pairs, take a first step along −g.
        descent = g.dot(direction) <= -group["tolerance_change"]
        keep_history = descent | ~sufficient  # a rejected trial keeps it
        kept.logical_and_(keep_history)
        gamma.copy_(torch.where(keep_history, gamma, 1.0))
        direction = torch.where(descent, direction, -g)
        new_length = torch.where(descent, torch.full_like(length, group["lr"]), self._first_length(loss, g))
        # Rejected: the minimiser of the quadratic through f(base), its slope and f(trial), kept
        # within [0.1, 0.5] × the rejected length (Nocedal & Wright, §3.5).
        above_linear = f - base_loss - slope * length  # the trial's loss above the linear model's
        shorter = (-slope * length.square() / (2 * above_linear)).nan_to_num(0.0)
        shorter = torch.minimum(torch.maximum(shorter, 0.1 * length), 0.5 * length)
        self._move(torch.where(sufficient, direction, state["direction"]),
                   torch.where(converged, 0.0, torch.where(sufficient, new_length, shorter - length)))
        # converged: as if this evaluation had not happened; rejected: the base point stays
        step_on = sufficient & ~converged
        state["direction"].copy_(torch.where(step_on, direction, state["direction"]))
        state["length"].copy_(torch.where(step_on, new_length, torch.where(converged, length, shorter)))
        state["previous_grad"].copy_(torch.where(step_on, g, state["previous_grad"]))
        state["slope"].copy_(torch.where(step_on, g.dot(direction), slope))
        state["base_loss"].copy_(torch.where(step_on, f, base_loss))
        state["backtracks"].add_((~sufficient).long())
