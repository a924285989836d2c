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

The algebra of a later step is written for ``K`` runs at once (:func:`later_steps`, batched
products and triangular solves); a run alone is ``K = 1``. Runs optimised together
(:mod:`stx.engine.batching`) keep their states in the slots of one :class:`Bank` and take their
later steps in one call, each following the trajectory it follows alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

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
        self.together: StepsTogether | None = None
        """Set by a batch of runs (:mod:`stx.engine.batching`) before the first step: the state
        then lives in a slot of a :class:`Bank` and later steps are taken with the other runs'."""
        self._slot: tuple[Bank, int] | None = None

    add_param_group = _plain(Optimizer.add_param_group)
    zero_grad = _plain(Optimizer.zero_grad)

    def state_dict(self) -> dict:
        saved = _plain(Optimizer.state_dict)(self)
        if self._slot is not None:  # views of a bank: copies, so that saving one does not save the bank
            saved["state"] = {key: {name: value.clone() if isinstance(value, torch.Tensor) else value
                                    for name, value in state.items()} for key, state in saved["state"].items()}
        return saved

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
        if self.together is not None and self._slot is None:
            claimed = self.together.slot(self, g)
            if claimed is not None:  # this run's state becomes its slot of the bank, with what it held
                self._slot = claimed
                bank, index = claimed
                for name, view in bank.views(index).items():
                    if name in state:
                        view.copy_(state[name])
                    state[name] = view
        if "history" not in state:
            state.update(_new_state((), self.defaults["history_size"], g))
        state.setdefault("n_iter", 0)
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
            squared = g.dot(g)
            state["direction"].copy_(-g)
            state["length"].copy_(_first_length(self.defaults["lr"], loss.detach().to(g.dtype), squared))
            state["previous_grad"].copy_(g)
            state["base_loss"].copy_(loss.detach())
            state["slope"].copy_(-squared)
            self._move(state["direction"], state["length"])
        elif self._slot is not None:
            self.together.later_step(self, g, loss)
        else:
            stacked = {name: value.unsqueeze(0) for name, value in state.items()  # views: the step writes through
                       if isinstance(value, torch.Tensor)}
            direction, length = later_steps(stacked, g[None], loss.detach().reshape(1), group["lr"],
                                            group["tolerance_grad"], group["tolerance_change"])
            self._move(direction[0], length[0])
        state["n_iter"] += 1
        return loss


def _first_length(lr: float | torch.Tensor, loss: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
    """Length of a first trial along ``−g``: ``lr`` × the one over which the loss's linear model
    falls by :data:`FIRST_STEP_FALL` × |loss| (Polyak's step towards 0); ``squared`` is ``gᵀg``."""
    return lr * FIRST_STEP_FALL * loss.abs() / squared


def _new_state(leading: tuple[int, ...], history_size: int, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state's tensors before the first step for runs of ``leading`` shape (``()``: one run;
    ``(K,)``: a bank, each run's with a leading dimension), over parameters like the flat gradient ``g``."""
    m, n = history_size, g.numel()
    flags = dict(device=g.device)
    return dict(
        history=g.new_zeros(*leading, 2 * m, n),  # rows: s of each slot, then y of each slot
        sy=g.new_zeros(*leading, m, m),  # sy[i, j] = s_i · y_j
        yy=g.new_zeros(*leading, m, m),  # yy[i, j] = y_i · y_j
        kept=torch.zeros(*leading, m, dtype=torch.bool, **flags),  # slots holding a kept pair
        head=torch.zeros(leading, dtype=torch.long, **flags),  # the slot the next pair goes to
        gamma=g.new_ones(leading),
        direction=g.new_zeros(*leading, n),
        length=g.new_zeros(leading),
        previous_grad=g.new_zeros(*leading, n),  # at the base point: the last accepted one
        base_loss=g.new_zeros(leading),  # f at the base point
        slope=g.new_zeros(leading),  # gᵀd at the base point (< 0)
        backtracks=torch.zeros(leading, dtype=torch.long, **flags),  # evaluations rejected so far
    )


def _rows_and_columns(matrices: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``matrices[k][order[k]][:, order[k]]`` for every ``k`` (``K×m×m``, ``order``: ``K×m``)."""
    k, m = order.shape
    rows = matrices.gather(1, order[:, :, None].expand(k, m, m))
    return rows.gather(2, order[:, None, :].expand(k, m, m))


def later_steps(state: dict[str, torch.Tensor], g: torch.Tensor, loss: torch.Tensor,
                lr: float | torch.Tensor, tolerance_grad: float | torch.Tensor,
                tolerance_change: float | torch.Tensor,
                active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A step after the first for each of ``K`` runs, in one set of batched operations: judge the
    trial point each run just evaluated (gradient ``g``, ``K×n``; ``loss``, ``K``): accepted
    (Armijo), record its pair if its curvature is positive and step along ``−H·g``; rejected,
    backtrack along the same direction from the base point.

    ``state`` holds the runs' stacked tensors (those of :func:`_new_state`, leading dimension ``K``) and is
    updated in place; ``lr`` and the tolerances are numbers or ``K``-vectors; runs where
    ``active`` is false are left as they were. Returns each run's move (``direction``, ``K×n``,
    times ``length``, ``K``), which the caller adds to its parameter.
    """
    history, sy, yy, kept, head, gamma = (state[k] for k in ("history", "sy", "yy", "kept", "head", "gamma"))
    k, n = g.shape
    m = sy.shape[-1]
    f = loss.to(g.dtype)
    base_loss, slope, length = state["base_loss"], state["slope"], state["length"]
    # Armijo: the trial fell by at least ARMIJO × what the base point's slope promised.
    sufficient = f <= base_loss + ARMIJO * length * slope
    s = state["direction"] * length[:, None]
    y = g - state["previous_grad"]
    pair = torch.stack([s, y], dim=1)  # K×2×n
    vectors = torch.stack([g, y, s], dim=2)  # K×n×3
    old = torch.bmm(history, vectors)  # K×2m×3: every stored row · g, y, s
    products = torch.bmm(pair, vectors)  # K×2×3: s and y · g, y, s
    (s_g, s_y, s_s), (y_g, y_y, _) = products[:, 0].unbind(1), products[:, 1].unbind(1)
    converged = (g.abs().amax(1) <= tolerance_grad) & sufficient
    hold = converged if active is None else converged | ~active  # as if this evaluation had not happened
    accept = (s_y > CURVATURE_EPS * (s_s * y_y).sqrt()) & sufficient & ~hold
    slots = torch.arange(m, device=g.device)
    slot = slots[None, :] == head[:, None]  # one-hot: where the new pair goes
    new = slot & accept[:, None]
    rows = torch.stack([head, head + m], dim=1)[:, :, None].expand(k, 2, n)
    history.scatter_(1, rows, torch.where(accept[:, None, None], pair, history.gather(1, rows)))
    column = torch.where(slot, s_y[:, None], old[:, :m, 1])  # s_i · y_new
    row = torch.where(slot, s_y[:, None], old[:, m:, 2])  # s_new · y_j
    sy.copy_(torch.where(new[:, :, None], row[:, None, :], torch.where(new[:, None, :], column[:, :, None], sy)))
    yy_new = torch.where(slot, y_y[:, None], old[:, m:, 1])
    yy.copy_(torch.where(new[:, :, None], yy_new[:, None, :], torch.where(new[:, None, :], yy_new[:, :, None], yy)))
    a = torch.where(new, s_g[:, None], old[:, :m, 0])  # Sᵀg
    b = torch.where(new, y_g[:, None], old[:, m:, 0])  # Yᵀg
    kept.logical_or_(new)
    gamma.copy_(torch.where(accept, s_y / y_y, gamma))
    head.copy_((head + accept) % m)

    order = (head[:, None] + slots[None, :]) % m  # oldest slot first
    mask = kept.gather(1, order).double()
    both = mask[:, :, None] * mask[:, None, :]
    sy_kept = _rows_and_columns(sy, order).double() * both
    r = sy_kept.triu() + torch.diag_embed(1.0 - mask)  # identity rows for empty slots: they contribute 0
    gamma64 = gamma.double()[:, None]
    w = torch.linalg.solve_triangular(r, (a.gather(1, order).double() * mask)[:, :, None], upper=True)[:, :, 0]
    yy_kept = _rows_and_columns(yy, order).double() * both
    inner = (sy_kept.diagonal(dim1=1, dim2=2) * w + gamma64 * torch.bmm(yy_kept, w[:, :, None])[:, :, 0]
             - gamma64 * b.gather(1, order) * mask)
    u = torch.linalg.solve_triangular(r.transpose(1, 2), inner[:, :, None], upper=False)[:, :, 0]
    coefficients = history.new_zeros(k, 2 * m)  # of S's rows, then Y's, in slot order
    coefficients.scatter_(1, torch.cat([order, m + order], dim=1), torch.cat([u, -gamma64 * w], dim=1).to(history.dtype))
    direction = -(gamma[:, None] * g + torch.bmm(coefficients[:, None, :], history)[:, 0])

    # Rounding can leave H·g pointing uphill: forget the pairs, take a first step along −g.
    descent = (g * direction).sum(1) <= -tolerance_change
    keep_history = descent | ~sufficient | hold  # a rejected trial keeps it
    kept.logical_and_(keep_history[:, None])
    gamma.copy_(torch.where(keep_history, gamma, 1.0))
    direction = torch.where(descent[:, None], direction, -g)
    new_length = torch.where(descent, lr, _first_length(lr, f, (g * g).sum(1)))
    # Rejected: the minimiser of the quadratic through f(base), its slope and f(trial), kept
    # within [0.1, 0.5] × the rejected length (Nocedal & Wright, §3.5).
    above_linear = f - base_loss - slope * length  # the trial's loss above the linear model's
    shorter = (-slope * length.square() / (2 * above_linear)).nan_to_num(0.0)
    shorter = torch.minimum(torch.maximum(shorter, 0.1 * length), 0.5 * length)
    move = torch.where(sufficient[:, None], direction, state["direction"])
    move_length = torch.where(hold, 0.0, torch.where(sufficient, new_length, shorter - length))
    # held: as if this evaluation had not happened; rejected: the base point stays
    step_on = sufficient & ~hold
    state["direction"].copy_(torch.where(step_on[:, None], direction, state["direction"]))
    state["length"].copy_(torch.where(step_on, new_length, torch.where(hold, length, shorter)))
    state["previous_grad"].copy_(torch.where(step_on[:, None], g, state["previous_grad"]))
    state["slope"].copy_(torch.where(step_on, (g * direction).sum(1), slope))
    state["base_loss"].copy_(torch.where(step_on, f, base_loss))
    state["backtracks"].add_((~sufficient & ~hold).long())
    return move, move_length


class Bank:
    """The stacked states of up to ``capacity`` runs' :class:`LBFGS` (one history size, parameters
    like the flat gradient ``g``), so that their later steps are one set of batched operations
    (:meth:`later_steps`) instead of one set per run. Each run's state holds views of its slot
    (:meth:`views`); a run claims a slot before its first step and releases it when it ends."""

    def __init__(self, capacity: int, history_size: int, g: torch.Tensor) -> None:
        self.state = _new_state((capacity,), history_size, g)
        self.settings = g.new_zeros(3, capacity)
        """Each slot's ``lr``, ``tolerance_grad`` and ``tolerance_change``."""
        self.grad = g.new_zeros(capacity, g.numel())
        self.loss = g.new_zeros(capacity)
        self.free = list(range(capacity))
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    def claim(self, optimizer: LBFGS) -> int | None:
        """A slot for ``optimizer``'s state, as before its first step (None: the bank is full)."""
        if not self.free:
            return None
        index = self.free.pop(0)
        for view in self.views(index).values():
            view.zero_()
        self.state["gamma"][index] = 1.0
        group = optimizer.param_groups[0]  # what a run alone takes its later steps with
        self.settings[:, index] = torch.tensor([group[name] for name in ("lr", "tolerance_grad", "tolerance_change")],
                                               dtype=self.settings.dtype)
        return index

    def release(self, index: int) -> None:
        self.free.append(index)

    def _active(self, slots: list[int]) -> torch.Tensor:
        """The mask of ``slots`` on the device, made once per set of slots: a copy from the host
        would wait for the device's queued work at every step."""
        key = tuple(sorted(slots))
        if key not in self._masks:
            mask = torch.zeros(len(self.loss), dtype=torch.bool)
            mask[list(key)] = True
            self._masks[key] = mask.to(self.loss.device)
        return self._masks[key]

    def views(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.state.items()}

    @torch.no_grad()
    def later_steps(self, arrivals: Sequence[tuple[LBFGS, torch.Tensor, torch.Tensor]]) -> None:
        """Take the later step of each ``(optimizer, flat gradient, loss)`` (optimizers holding
        slots of this bank) at once, and move their parameters."""
        slots = [optimizer._slot[1] for optimizer, _, _ in arrivals]
        for index, (_, g, loss) in zip(slots, arrivals):
            self.grad[index].copy_(g)
            self.loss[index].copy_(loss.detach())
        direction, length = later_steps(self.state, self.grad, self.loss, *self.settings, active=self._active(slots))
        for index, (optimizer, _, _) in zip(slots, arrivals):
            optimizer._move(direction[index], length[index])


class StepsTogether(Protocol):
    """Where an :class:`LBFGS` among runs optimised together (:mod:`stx.engine.batching`) keeps its
    state and takes its later steps."""

    def slot(self, optimizer: LBFGS, g: torch.Tensor) -> tuple[Bank, int] | None:
        """A slot of a :class:`Bank` shared with the other runs for ``optimizer``, whose flat
        gradient is like ``g`` (None: none; the optimiser keeps its own state)."""

    def later_step(self, optimizer: LBFGS, g: torch.Tensor, loss: torch.Tensor) -> None:
        """Take ``optimizer``'s later step with the others' (:meth:`Bank.later_steps`), returning when
        it is taken."""
