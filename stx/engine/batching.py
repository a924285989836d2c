"""Several image optimisations sharing each evaluation: one encoder pass for a batch of runs.

Each run is a thread running :func:`~stx.engine.optim.optimise_image` as it would alone, with its
own objective (loss terms, weights, targets), parameter, optimiser and history. While a
:class:`Batch` is :func:`active` in the thread, every evaluation of a level whose objective is a
plain :class:`~stx.engine.losses.PerceptualObjective` reading encoder layers goes through
:meth:`Batch.member`'s evaluator instead of running alone: the runs evaluating the same encoder at the same image shape,
precision and device (a *group*) wait for each other; the last to arrive stacks their images into
one ``B×3×H×W`` batch, runs the encoder once, scores the runs (together when their objectives
have the same terms, :class:`ScoredTogether`; else each from its own sample of every layer,
:meth:`~stx.engine.losses.PerceptualObjective.score`), and back-propagates the runs' totals at
once, which leaves each run's gradient in its own parameter. Samples never mix (the encoders have
no batch statistics in eval mode), so a run follows the trajectory it follows alone, up to float
rounding, and a NaN in one run stays in that run. A run that finishes, fails or moves to another
level leaves its group and the others go on without it; the rise guard and the best image stay
each run's own.

Runs optimised by :class:`~stx.engine.lbfgs.LBFGS` keep their states in one
:class:`~stx.engine.lbfgs.Bank` per group (each run's history a slot of one stacked tensor) and
meet once more after each shared evaluation: the last to arrive takes all their later steps in
one set of batched operations (:meth:`~stx.engine.lbfgs.Bank.later_steps`), where each run had
taken some 60 operations of its own. A run on a first step (its first, or after its rise guard
restarted it) takes it alone and arrives without a step; a run that leaves arrives without one.

:meth:`Batch.reserve` keeps the runs' planned memory within what the device had free; :meth:`Batch.stop`
makes every run raise at its next evaluation (Ctrl-C of a batched sweep).

On the CPU, a batch given a ``cpu_thread`` runs its encoder passes and banked steps there: one thread with the
process's intra-op threads, while the runs' own threads use one each (:func:`cpu_evaluator`).
Every thread that runs a parallel region keeps its own team of OpenMP threads, and eight runs'
teams spinning on two cores slowed every pass by a third.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from stx.engine.lbfgs import LBFGS, Bank
from stx.engine.losses import EncodingLoss, PerceptualObjective

Evaluation = tuple[torch.Tensor, dict[str, torch.Tensor]]
"""``(total, {term: value})`` detached, as :class:`~stx.engine.losses.PerceptualObjective` returns them."""
Evaluator = Callable[[torch.Tensor], Evaluation]
"""Evaluates the objective at an image computed from a leaf parameter (``1×3×H×W``, with its
graph) and back-propagates the total into that parameter's gradient."""


@dataclass(eq=False)
class _Request:
    objective: PerceptualObjective
    image: torch.Tensor
    autocast: Callable[[], contextlib.AbstractContextManager]
    steps_together: bool = False
    """Whether its run's optimiser steps with the group's others after it (:class:`Member`)."""
    result: Evaluation | None = None
    error: BaseException | None = None
    done: bool = False
    owes: bool = False
    """Set when it is evaluated with ``steps_together``: its run then owes the group's step meeting an arrival."""


@dataclass(eq=False)
class _Arrival:
    """A run's later L-BFGS step, waiting for the others' (:meth:`Member.later_step`)."""
    bank: Bank
    optimizer: LBFGS
    grad: torch.Tensor
    loss: torch.Tensor
    error: BaseException | None = None
    done: bool = False


class ScoredTogether:
    """The objectives of several runs with the same terms (names, classes and layers, each scored per
    sample: :meth:`~stx.engine.losses.EncodingLoss.scored_per_sample`), scored at once from their
    features in one batch: each term's layer values for every run by one set of operations, instead
    of one set per run (the Python and kernel launches a run's scoring costs, some 40 operations).
    Their targets are concatenated once and each run's cached targets become views of them (no
    second copy); their weights are vectors. Each run gets the total and values its objective's
    :meth:`~stx.engine.losses.PerceptualObjective.score` gives it alone, up to float rounding."""

    def __init__(self, objectives: Sequence[PerceptualObjective]) -> None:
        self.objectives = list(objectives)
        first = objectives[0]
        self.targets: dict[str, dict[str, torch.Tensor]] = {}
        self.score_weights: dict[str, torch.Tensor] = {}
        self.layer_weights: dict[str, dict[str, torch.Tensor]] = {}
        self.scales: dict[str, dict[str, torch.Tensor]] = {}
        """Each run's :attr:`~stx.engine.losses.EncodingLoss.scales` (1 where not relative), by term and layer."""
        for name, loss in first.losses.items():
            terms = [objective.losses[name] for objective in objectives]
            device = loss.targets[next(iter(loss.layer_weights))].device
            self.score_weights[name] = torch.tensor([term.score_weight for term in terms], device=device)
            self.layer_weights[name], self.targets[name], self.scales[name] = {}, {}, {}
            for layer in loss.layer_weights:
                self.layer_weights[name][layer] = torch.tensor([term.layer_weights[layer] for term in terms], device=device)
                self.scales[name][layer] = torch.tensor([term.scales.get(layer, 1.0) for term in terms], device=device)
                stacked = torch.cat([term.targets[layer] for term in terms])
                for index, term in enumerate(terms):
                    term.targets[layer] = stacked[index:index + 1]
                self.targets[name][layer] = stacked

    @staticmethod
    def applies(objectives: Sequence[PerceptualObjective]) -> bool:
        """Whether the objectives have the same terms, all scored per sample, with targets of the same shapes."""
        def structure(objective: PerceptualObjective) -> list[tuple]:
            return [(name, type(loss), tuple(loss.layer_weights), isinstance(loss, EncodingLoss)
                     and loss.scored_per_sample() and bool(loss.targets)
                     and all(isinstance(target, torch.Tensor) for target in loss.targets.values()),
                     [tuple(target.shape) for target in getattr(loss, "targets", {}).values()])
                    for name, loss in objective.losses.items()]

        first = structure(objectives[0])
        return all(shared for *_, shared, _ in first) and all(structure(o) == first for o in objectives[1:])

    def __call__(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(totals, values)`` of the runs from their ``features`` (``{layer: B×C×H×W}``, run ``b`` at
        index ``b``): ``B`` totals, and each value of :meth:`~stx.engine.losses.PerceptualObjective.score`
        as ``B`` values."""
        values: dict[str, torch.Tensor] = {}
        totals = self.score_weights[next(iter(self.score_weights))].new_zeros(len(self.objectives))
        for name, loss in self.objectives[0].losses.items():
            per_layer = {layer: loss.sample_values(features[layer], self.targets[name][layer]) * self.scales[name][layer]
                         for layer in loss.layer_weights}
            weighted = self.score_weights[name] * sum(self.layer_weights[name][layer] * value
                                                      for layer, value in per_layer.items())
            totals = totals + weighted
            values.update({f"{name}/{layer}": value for layer, value in per_layer.items()})
            values[name] = weighted
        return totals, values


def identity(objectives: Sequence[PerceptualObjective]) -> tuple[int, ...]:
    """The objectives and their current targets, by identity: a :class:`ScoredTogether` made for
    them holds while it is unchanged (a run that moves to another level sets new targets)."""
    return tuple(id(item) for objective in objectives for item in
                 (objective, *(target for loss in objective.losses.values()
                               for target in getattr(loss, "targets", {}).values())))


def _bank_key(optimizer: LBFGS) -> tuple:
    """What the L-BFGS states sharing a :class:`~stx.engine.lbfgs.Bank` have in common: the history size
    and the parameters' dtype (their size is the group's image shape)."""
    return optimizer.defaults["history_size"], optimizer.param_groups[0]["params"][0].dtype


@dataclass(eq=False)
class _Group:
    members: int = 0
    waiting: list[_Request] = field(default_factory=list)
    scored: ScoredTogether | None = None
    """The last runs' objectives scored together (None: none yet, or they could not be)."""
    scored_for: tuple[int, ...] = ()
    """:func:`identity` of the objectives :attr:`scored` was decided for."""
    banks: dict[tuple, Bank] = field(default_factory=dict)
    """The L-BFGS states of its runs, by :func:`_bank_key`."""
    banked: Counter[tuple] = field(default_factory=Counter)
    """How many of its members step with an :class:`~stx.engine.lbfgs.LBFGS` of each :func:`_bank_key`."""
    owed: int = 0
    """Arrivals the step meeting waits for: one per run evaluated with ``steps_together`` in the last round."""
    arrivals: list[_Arrival] = field(default_factory=list)

    def scored_together(self, requests: list[_Request]) -> ScoredTogether | None:
        """The :class:`ScoredTogether` of the requests' objectives, decided again only when they
        changed; None when they cannot be scored together (each is then scored alone)."""
        objectives = [request.objective for request in requests]
        if len(objectives) < 2:
            return None
        if identity(objectives) != self.scored_for:
            self.scored = ScoredTogether(objectives) if ScoredTogether.applies(objectives) else None
            self.scored_for = identity(objectives)  # after the targets became views of the stacked ones
        return self.scored


class Batch:
    """Where the runs of one batch meet; thread-safe. See the module's docstring."""

    def __init__(self, cpu_thread: Executor | None = None, size: int = 0) -> None:
        self.size = size
        """How many runs the launcher runs in this batch at once (0: not said)."""
        self._cpu_thread = cpu_thread
        """Where encoder passes on the CPU run (:func:`cpu_evaluator`); None: in the run that leads them."""
        self._changed = threading.Condition()
        self._groups: dict[tuple, _Group] = {}
        self._reserved: dict[str, int] = {}
        self._budget: dict[str, int] = {}
        self._stop: Callable[[], BaseException] | None = None
        self._starting = 0
        self._arrived = threading.local()
        self._turn = threading.Lock()
        """Held by the member running its own work between evaluations (its optimiser's step, its
        reporting): members take turns instead of all waking at once and trading the interpreter
        lock at every tensor operation (a convoy that cost more than the work itself on the CPU).
        Never taken while holding ``_changed``."""
        self.evaluations = 0
        """Batched encoder passes run so far (one per group and round)."""

    def expect(self) -> None:
        """A run is starting in this thread. Until the batch's first evaluation, no group evaluates
        until it has joined one, started alone, or :meth:`arrive` was called for it, so that the runs
        started together share their first evaluation instead of the first ones running ahead
        alone; a run starting later does not hold the others back."""
        with self._changed:
            self._arrived.done = bool(self.evaluations)
            if not self._arrived.done:
                self._starting += 1

    def arrive(self) -> None:
        """This thread's run no longer holds the groups back (idempotent)."""
        with self._changed:
            self._arrive_locked()

    def stop(self, error: Callable[[], BaseException]) -> None:
        """Make every run raise ``error()`` at its next evaluation, or now if it is waiting in a group."""
        with self._changed:
            self._stop = error
            self._changed.notify_all()

    @contextlib.contextmanager
    def reserve(self, needed: int, device: torch.device, free: Callable[[torch.device], int]) -> Iterator[None]:
        """Hold ``needed`` bytes of ``device`` while the run lasts, waiting while the runs already
        holding some leave less than that of ``free(device)`` (measured when the first run arrived). A run
        alone always goes (it has passed its own fit check)."""
        key = str(device)
        with self._changed:
            budget = self._budget.setdefault(key, free(device))
            while self._reserved.get(key, 0) and self._reserved[key] + needed > budget:
                self._raise_if_stopped()
                self._arrive_locked()
                self._changed.wait()
            self._reserved[key] = self._reserved.get(key, 0) + needed
        try:
            yield
        finally:
            with self._changed:
                self._reserved[key] -= needed
                self._changed.notify_all()

    @contextlib.contextmanager
    def member(self, objective: PerceptualObjective, shape: torch.Size, device: torch.device,
               autocast: Callable[[], contextlib.AbstractContextManager], precision: str,
               optimizer: torch.optim.Optimizer | None = None) -> Iterator[Member]:
        """Join the group of ``objective``'s encoder at images of ``shape`` on ``device`` in
        ``precision`` (``autocast()`` enters it) for as long as the block lasts; yields the run's
        :class:`Member`. An :class:`~stx.engine.lbfgs.LBFGS` ``optimizer`` (before its first step)
        steps with the group's others: the member becomes its ``together``."""
        key = (id(objective.encoder), tuple(shape), str(device), precision)
        banked = _bank_key(optimizer) if isinstance(optimizer, LBFGS) else None
        with self._changed:
            group = self._groups.setdefault(key, _Group())
            group.members += 1
            if banked is not None:
                group.banked[banked] += 1
            self._arrive_locked()
        self._turn.acquire()
        member = Member(self, group, objective, autocast)
        if banked is not None:
            optimizer.together = member
        try:
            yield member
        finally:
            try:
                member.settle()
            finally:
                if member.claimed is not None:
                    with self._changed:
                        member.claimed[0].release(member.claimed[1])
                self._turn.release()
            with self._changed:
                group.members -= 1
                if banked is not None:
                    group.banked[banked] -= 1
                ready = self._take_if_ready(group)
                if not group.members:
                    self._groups.pop(key, None)
            if ready:
                self._run(group, ready)

    def _slot(self, group: _Group, optimizer: LBFGS, g: torch.Tensor) -> tuple[Bank, int] | None:
        """A slot of the group's bank for ``optimizer``'s history size and dtype, made for as many
        runs as the group has members with such an optimiser (None: every slot is taken)."""
        key = _bank_key(optimizer)
        with self._changed:
            bank = group.banks.get(key)
            if bank is None:
                bank = group.banks[key] = Bank(group.banked[key], optimizer.defaults["history_size"], g)
            index = bank.claim(optimizer)
        return None if index is None else (bank, index)

    def _meet(self, group: _Group, arrival: _Arrival | None) -> None:
        """Arrive at the group's step meeting, with a later step to take (``arrival``) or without
        (None: the run took a first step, or ends, or evaluates again after its rise guard). The
        last run to arrive takes every waiting step at once (:meth:`Bank.later_steps`); one with a
        step returns when it is taken."""
        with self._changed:
            group.owed -= 1
            if arrival is not None:
                group.arrivals.append(arrival)
            ready = self._take_steps_if_ready(group)
        if arrival is not None and not ready:
            self._turn.release()
            try:
                while not ready:
                    with self._changed:
                        if arrival.done:
                            break
                        if self._stop is not None and arrival in group.arrivals:
                            group.arrivals.remove(arrival)  # not taken: its parameter stays as it was
                            self._raise_if_stopped()
                        self._changed.wait()  # taken: its step is being taken; the next evaluation raises
                        ready = self._take_steps_if_ready(group)
            finally:
                self._turn.acquire()
        if ready:
            self._take_steps(ready)

    @staticmethod
    def _take_steps_if_ready(group: _Group) -> list[_Arrival]:
        if group.arrivals and group.owed <= 0:
            ready, group.arrivals = group.arrivals, []
            return ready
        return []

    def _take_steps(self, arrivals: list[_Arrival]) -> None:
        """The arrivals' later steps, bank by bank; each arrival gets done or its error, then every
        waiting run is woken."""
        try:
            by_bank: dict[int, list[_Arrival]] = {}
            for arrival in arrivals:
                by_bank.setdefault(id(arrival.bank), []).append(arrival)
            for same in by_bank.values():
                bank = same[0].bank
                steps = [(arrival.optimizer, arrival.grad, arrival.loss) for arrival in same]
                if self._cpu_thread is not None and bank.loss.device.type == "cpu":
                    self._cpu_thread.submit(bank.later_steps, steps).result()
                else:
                    bank.later_steps(steps)
        except BaseException as exc:  # e.g. out of memory: every run gets it
            for arrival in arrivals:
                arrival.error = exc
        finally:
            with self._changed:
                for arrival in arrivals:
                    arrival.done = True
                self._changed.notify_all()

    def _raise_if_stopped(self) -> None:
        if self._stop is not None:
            raise self._stop()

    def _arrive_locked(self) -> None:
        """:meth:`arrive`, with the lock held."""
        if not getattr(self._arrived, "done", True):
            self._arrived.done = True
            self._starting -= 1
            if not self._starting:
                self._changed.notify_all()

    def _take_if_ready(self, group: _Group) -> list[_Request]:
        """The group's waiting requests when every member has one in and no run is still starting
        (under the lock)."""
        if group.waiting and len(group.waiting) >= group.members and not self._starting:
            ready, group.waiting = group.waiting, []
            return ready
        return []

    def _evaluate(self, group: _Group, request: _Request) -> Evaluation:
        with self._changed:
            self._raise_if_stopped()
            group.waiting.append(request)
            ready = self._take_if_ready(group)
        if not ready:
            self._turn.release()
            try:
                while not ready:
                    with self._changed:
                        if request.done:
                            break
                        if self._stop is not None and request in group.waiting:
                            group.waiting.remove(request)  # not taken by a round yet: the others need not run it
                        self._raise_if_stopped()
                        self._changed.wait()
                        ready = self._take_if_ready(group)  # the last run starting has arrived: someone leads
            finally:
                self._turn.acquire()
        if ready:
            self._run(group, ready)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _run(self, group: _Group, requests: list[_Request]) -> None:
        """One encoder pass for ``requests`` and one backward pass of their totals; each request
        gets its result or its error, then every waiting run is woken."""
        requests = sorted(requests, key=lambda request: id(request.objective))  # the same runs, the same order
        try:
            scored = group.scored_together(requests)
            if self._cpu_thread is not None and requests[0].image.device.type == "cpu":
                self._cpu_thread.submit(evaluate_together, requests, scored).result()
            else:
                evaluate_together(requests, scored)
        except BaseException as exc:  # the encoder's pass failed (e.g. out of memory): every run gets it
            for request in requests:
                if request.result is None and request.error is None:
                    request.error = exc
        finally:
            with self._changed:
                self.evaluations += 1
                for request in requests:
                    request.done = True
                    if request.steps_together:
                        request.owes = True
                        group.owed += 1
                self._changed.notify_all()


class Member:
    """A run's place in its group, for as long as :meth:`Batch.member`'s block lasts: calling it
    evaluates the run's objective at an image with the group's other runs (an :data:`Evaluator`).
    An :class:`~stx.engine.lbfgs.LBFGS` whose ``together`` it is also keeps its state in the
    group's bank and takes its later steps with the other runs' (after each shared evaluation, the
    runs meet once more, and the last to arrive takes every waiting step at once)."""

    def __init__(self, batch: Batch, group: _Group, objective: PerceptualObjective,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        self._batch, self._group = batch, group
        self._objective, self._autocast = objective, autocast
        self.claimed: tuple[Bank, int] | None = None
        """The bank slot holding this run's L-BFGS state, if any."""
        self._owes = False

    def __call__(self, image: torch.Tensor) -> Evaluation:
        self.settle()  # evaluating again without a step since the last evaluation (the rise guard)
        request = _Request(self._objective, image, self._autocast, steps_together=self.claimed is not None)
        try:
            return self._batch._evaluate(self._group, request)
        finally:
            self._owes = request.owes

    def settle(self) -> None:
        """Arrive at the step meeting without a step, if this run owes it an arrival."""
        if self._owes:
            self._owes = False
            self._batch._meet(self._group, None)

    def slot(self, optimizer: LBFGS, g: torch.Tensor) -> tuple[Bank, int] | None:
        if self.claimed is None:
            self.claimed = self._batch._slot(self._group, optimizer, g)
        return self.claimed

    def later_step(self, optimizer: LBFGS, g: torch.Tensor, loss: torch.Tensor) -> None:
        arrival = _Arrival(self.claimed[0], optimizer, g, loss)
        if self._owes:
            self._owes = False
            self._batch._meet(self._group, arrival)
        else:  # not evaluated with the others since its last step: alone
            self._batch._take_steps([arrival])
        if arrival.error is not None:
            raise arrival.error


def evaluate_together(requests: list[_Request], scored: ScoredTogether | None = None) -> None:
    """Evaluate every request's objective at its image with one pass of their (shared) encoder,
    scored together when ``scored`` (made for these requests' objectives) is given, else one by one;
    back-propagate; store each result, or the error of a run whose loss terms failed."""
    encoder = requests[0].objective.encoder
    layers = frozenset().union(*(request.objective.layers for request in requests))
    totals: list[torch.Tensor] = []
    with torch.enable_grad(), requests[0].autocast():
        features = encoder(torch.cat([request.image for request in requests]), layers)
        if scored is not None:
            together, values = scored(features)
            columns = {name: value.detach().unbind() for name, value in values.items()}
            for index, (request, total) in enumerate(zip(requests, together.detach().unbind())):
                request.result = total, {name: column[index] for name, column in columns.items()}
            totals.append(together.sum())
        else:
            for request, sample in zip(requests, zip(*(value.split(1) for value in features.values()))):
                try:
                    total, values = request.objective.score(dict(zip(features, sample)), request.image)
                except Exception as exc:
                    request.error = exc
                    continue
                request.result = total.detach(), {name: value.detach() for name, value in values.items()}
                totals.append(total)
    if totals:
        torch.autograd.backward(totals)


def use_threads(threads: int) -> None:
    """Give the calling thread ``threads`` intra-op threads for good. torch's count is each thread's,
    taken from a process-wide default when the thread first uses it, which ``set_num_threads`` also
    changes: reading the count right after fixes this thread's before another thread changes the default."""
    torch.set_num_threads(threads)
    torch.get_num_threads()


def cpu_evaluator(threads: int) -> ThreadPoolExecutor:
    """One thread for a batch's encoder passes on the CPU, with ``threads`` intra-op threads of its
    own (:func:`use_threads`). Shut it down after the runs."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="stx-encoder", initializer=use_threads,
                              initargs=(threads,))


_active: contextvars.ContextVar[Batch | None] = contextvars.ContextVar("stx_batch", default=None)


def active() -> Batch | None:
    """The batch the optimisations of this thread (context) join, if any."""
    return _active.get()


@contextlib.contextmanager
def joining(batch: Batch) -> Iterator[None]:
    """Within the block, this thread's run evaluates in ``batch`` (:meth:`Batch.expect` at its start,
    :meth:`Batch.arrive` at its end)."""
    token = _active.set(batch)
    batch.expect()
    try:
        yield
    finally:
        batch.arrive()
        _active.reset(token)
