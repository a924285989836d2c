"""L-BFGS with one objective evaluation per step, built for GPUs, whose steps do not depend on
the loss's scale.

Its steps are those of ``torch.optim.LBFGS(lr=lr, max_iter=1, history_size=m)`` without a line
search (a first step along ``−g``, then ``lr`` along ``−H·g`` with ``H₀ = γI``, ``γ = sᵀy / yᵀy``
of the newest kept pair) with three changes that make them the same for ``c·f`` as for ``f``
(the same run whatever the score weights, as a sweep over them needs):

- the first step is as long as the loss's linear model needs to fall by 0.1% of |loss| (a
  shortened Polyak step, ``0.001·lr·|f| / ‖g‖²``; torch: ``min(1, 1/‖g‖₁)·lr``, so a small
  loss takes a step too small to register in float32 pixels);
- a pair is kept when ``sᵀy > 1e-10·‖s‖‖y‖`` (torch: ``sᵀy > 1e-10``, which rejects every pair
  of a small enough loss: with ``score_weight`` × 0.01 the image never moves);
- the run never stops on its own (torch stops moving once ``max |g| ≤ 1e-7`` or
  ``gᵀd > −1e-9``, absolute thresholds that large images reach: per-pixel gradients shrink with
  the pixel count): a direction that is not downhill forgets the pairs and takes a first step.

``H·g`` comes from the compact representation of the inverse Hessian (Byrd, Nocedal & Schnabel
1994, eq. 3.1) instead of the two-loop recursion:

    H·g = γg + [S γY] · [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] · [Sᵀg; γYᵀg]

where the rows of ``S`` and ``Y`` are the kept pairs (oldest first), ``R`` is the upper triangle
of ``SᵀY`` and ``D`` its diagonal. The pairs live in one ``2m × n`` ring buffer, so a step reads
the history twice (one product for ``Sᵀg``, ``Yᵀg`` and the new pair's inner products, one for
``H·g``) where the two-loop recursion reads it four times, in about 60 kernels instead of ~6m.
After the first step a step never waits for the device: which pairs count, where the next one
goes and whether the step is taken are tensors, not Python branches (``torch.optim.LBFGS`` copies
a value to the host twice per pair), so a whole step can be captured in a CUDA graph
(:mod:`stx.optim` does). The ``m × m`` algebra runs in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

FIRST_STEP_FALL = 1e-3
"""A first step is as long as the loss's linear model needs to fall by this fraction of |loss|."""
CURVATURE_EPS = 1e-10
"""A pair is kept only when ``sᵀy > CURVATURE_EPS·‖s‖‖y‖`` (its curvature is positive)."""


class LBFGS(Optimizer):
    """L-BFGS taking one step of length ``lr`` per ``step(closure)`` (one evaluation).

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
        super().load_state_dict(state_dict)
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
                previous_grad=torch.zeros_like(g),
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
            self._move(state["direction"], state["length"])
        else:
            self._later_step(state, g, group, loss)
        state["n_iter"] += 1
        return loss

    def _first_length(self, loss: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Length of a first step along ``−g``: ``lr`` × the one over which the loss's linear
        model falls by :data:`FIRST_STEP_FALL` × |loss| (Polyak's step towards 0, shortened)."""
        return self.defaults["lr"] * FIRST_STEP_FALL * loss.detach().abs().to(g.dtype) / g.dot(g)

    def _later_step(self, state: dict, g: torch.Tensor, group: dict, loss: torch.Tensor) -> None:
        """Record the newest pair if its curvature is positive, step along ``−H·g``."""
        m = group["history_size"]
        history, sy, yy, kept, head, gamma = (state[k] for k in ("history", "sy", "yy", "kept", "head", "gamma"))
        s = state["direction"] * state["length"]
        y = g - state["previous_grad"]
        vectors = torch.stack([g, y, s], dim=1)
        old = history @ vectors  # 2m × 3: every stored row · g, y, s
        (s_g, s_y, s_s), (y_g, y_y, _) = (torch.stack([s, y]) @ vectors).unbind(0)
        converged = g.abs().max() <= group["tolerance_grad"]
        accept = (s_y > CURVATURE_EPS * (s_s * y_y).sqrt()) & ~converged
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
        kept.logical_and_(descent)
        gamma.copy_(torch.where(descent, gamma, 1.0))
        direction = torch.where(descent, direction, -g)
        first_length = self._first_length(loss, g)
        length = torch.where(descent, group["lr"], first_length)
        self._move(direction, torch.where(converged, 0.0, length))
        # converged: as if this evaluation had not happened
        state["direction"].copy_(torch.where(converged, state["direction"], direction))
        state["length"].copy_(torch.where(converged, state["length"], length))
        state["previous_grad"].copy_(torch.where(converged, state["previous_grad"], g))
