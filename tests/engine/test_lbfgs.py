"""stx.engine.lbfgs.LBFGS: the steps of a textbook two-loop L-BFGS, by another route, whatever the loss's scale."""

import copy
import threading

import pytest
import torch

from stx.engine.lbfgs import LBFGS, Bank, later_steps


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def trajectory(make, steps: int, objective=rosenbrock, start=None):
    """Losses and final point of ``steps`` steps from ``start`` (float64)."""
    x = (torch.linspace(-1.5, 1.2, 40, dtype=torch.float64) if start is None else start.clone()).requires_grad_(True)
    optimizer = make([x])
    losses = []

    def closure():
        optimizer.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(optimizer.step(closure).item())
    return torch.tensor(losses, dtype=torch.float64), x.detach(), optimizer


def two_loop_lbfgs(objective, start, steps, lr, history):
    """Textbook L-BFGS (two-loop recursion, float64, backtracking along a rejected direction)
    with stx.engine.lbfgs's rules: losses, final point, pairs kept, pairs rejected and backtracks."""
    x, pairs, losses, rejected, backtracks, gamma, base = start.clone(), [], [], 0, 0, 1.0, None
    for _ in range(steps):
        point = x.clone().requires_grad_(True)
        loss = objective(point)
        (g,) = torch.autograd.grad(loss, point)
        f = loss.item()
        losses.append(f)
        polyak = lr * abs(f) / g.dot(g)  # the step along −g to where the linear model reaches 0
        if base is None:
            base = (x, f, g, -g, polyak)
            x = x + polyak * -g
            continue
        x0, f0, g0, d, t = base
        slope = g0.dot(d)
        if f > f0 + 1e-4 * t * slope:  # not a sufficient decrease: back, shorter along d
            backtracks += 1
            shorter = min(max(-slope * t * t / (2 * (f - f0 - slope * t)), 0.1 * t), 0.5 * t)
            base = (x0, f0, g0, d, shorter)
            x = x0 + shorter * d
            continue
        s, y = t * d, g - g0
        if s.dot(y) > 1e-10 * s.norm() * y.norm():
            pairs = (pairs + [(s, y)])[-history:]
            gamma = s.dot(y) / y.dot(y)
        else:
            rejected += 1
        q, alphas = g.clone(), []
        for s_i, y_i in reversed(pairs):
            alphas.append(s_i.dot(q) / s_i.dot(y_i))
            q -= alphas[-1] * y_i
        r = gamma * q
        for (s_i, y_i), alpha in zip(pairs, reversed(alphas)):
            r += s_i * (alpha - y_i.dot(r) / s_i.dot(y_i))
        d, t = -r, lr
        if g.dot(d) > 0:  # not downhill: forget the pairs, take a first step
            pairs, gamma, d, t = [], 1.0, -g, polyak
        base = (x, f, g, d, t)
        x = x + t * d
    return torch.tensor(losses, dtype=torch.float64), x, len(pairs), rejected, backtracks


START = torch.linspace(-1.5, 1.2, 40, dtype=torch.float64)


@pytest.mark.parametrize("history", [3, 10, 100])
def test_same_steps_as_the_two_loop_recursion(history):
    # history 3 wraps the ring of pairs many times; Rosenbrock's negative curvature makes some
    # pairs fail the curvature test, so both must skip the same ones
    ours, x_ours, optimizer = trajectory(lambda p: LBFGS(p, lr=0.5, history_size=history), 80)
    reference, x_reference, kept, rejected, backtracks = two_loop_lbfgs(rosenbrock, START, 80, 0.5, history)
    torch.testing.assert_close(ours, reference, rtol=1e-7, atol=0)
    torch.testing.assert_close(x_ours, x_reference, rtol=1e-5, atol=1e-6)  # rounding grows over 80 steps
    assert next(iter(optimizer.state.values()))["kept"].sum() == kept
    assert ours[-1] < 0.05 * ours[0]


@pytest.mark.parametrize("start, lr", [(0.5, 0.2), (0.3, 1.0)])
def test_skips_a_pair_of_negative_curvature_and_backtracks_like_the_reference(start, lr):
    # a concave start: a pair has sᵀy < 0 and must not enter the history; at lr=1 trial points
    # that do not fall enough are taken back and retried shorter (twice in 8 evaluations)
    objective = lambda x: (torch.cos(x).sum() + 0.01 * (x ** 4).sum() + 10)
    begin = torch.full((5,), start, dtype=torch.float64)
    ours, x_ours, optimizer = trajectory(lambda p: LBFGS(p, lr=lr, history_size=5), 8, objective, begin)
    reference, x_reference, kept, rejected, backtracks = two_loop_lbfgs(objective, begin, 8, lr, 5)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=0)
    torch.testing.assert_close(x_ours, x_reference, rtol=1e-9, atol=1e-12)
    state = next(iter(optimizer.state.values()))
    assert state["n_iter"] == 8 and state["kept"].sum() == kept and rejected > 0
    assert state["backtracks"] == backtracks and backtracks == (2 if lr == 1.0 else 0)


def test_a_quartic_loss_converges_without_cycling():
    # A Gram loss is quartic in the pixels: one short step's curvature makes the next step
    # overshoot. The old rule (undo, forget the pairs, tiny first step again) cycled; the
    # backtracking search keeps the history and rarely rejects.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(30, 60, generator=generator, dtype=torch.float64)
    target = (a @ torch.randn(60, generator=generator, dtype=torch.float64)) ** 2
    objective = lambda x: ((a @ x) ** 2 - target).square().sum()
    start = torch.randn(60, generator=generator, dtype=torch.float64)
    losses, _, optimizer = trajectory(lambda p: LBFGS(p, lr=1.0, history_size=20), 100, objective, start)
    assert losses.min() < 1e-6 * losses[0]
    assert next(iter(optimizer.state.values()))["backtracks"] <= 5


def test_no_step_at_a_stationary_point():
    x = torch.zeros(4, requires_grad=True)
    optimizer = LBFGS([x])

    def closure():
        optimizer.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    assert torch.equal(x, torch.zeros(4))
    assert next(iter(optimizer.state.values()))["n_iter"] == 0


def test_state_dict_round_trip_continues_identically():
    _, _, optimizer = trajectory(lambda p: LBFGS(p, lr=0.5, history_size=4), 9)
    x = optimizer.param_groups[0]["params"][0]
    saved_x, saved_state = x.detach().clone(), copy.deepcopy(optimizer.state_dict())

    def steps(opt, param, n):
        out = []
        for _ in range(n):
            def closure():
                opt.zero_grad()
                loss = rosenbrock(param)
                loss.backward()
                return loss
            out.append(opt.step(closure).item())
        return out

    expected = steps(optimizer, x, 5)
    fresh_x = saved_x.clone().requires_grad_(True)
    fresh = LBFGS([fresh_x], lr=0.5, history_size=4)
    fresh.load_state_dict(saved_state)
    assert steps(fresh, fresh_x, 5) == expected


@pytest.mark.parametrize("kwargs", [{"lr": 0}, {"history_size": 0}, {"history_size": 2.5}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LBFGS([torch.zeros(1, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("scale", [1e-12, 1e4])
def test_steps_do_not_depend_on_the_losss_scale(scale):
    # torch.optim.LBFGS's absolute curvature test (sᵀy > 1e-10) freezes it on small losses: at
    # 1e-12 × Rosenbrock every pair fails it and every step is a gradient step of length ≤ 1
    _, x_one, _ = trajectory(lambda p: LBFGS(p, lr=0.5, history_size=10), 60)
    _, x_scaled, _ = trajectory(lambda p: LBFGS(p, lr=0.5, history_size=10), 60, lambda x: scale * rosenbrock(x))
    torch.testing.assert_close(x_scaled, x_one, rtol=1e-6, atol=1e-9)
    frozen, _, _ = trajectory(lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=1, history_size=10), 60,
                              lambda x: 1e-12 * rosenbrock(x))
    assert frozen[-1] > 0.99 * frozen[0]


class Together:
    """A bank shared by ``runs`` optimisers stepping in lockstep: each later step waits for the
    others', and the last to arrive takes them all at once (what stx.engine.batching does)."""

    def __init__(self, runs, capacity, history_size, like):
        self.bank = Bank(capacity, history_size, like)
        self.arrivals, self.taken = [], []
        self.barrier = threading.Barrier(runs, action=self.take)

    def take(self):
        self.taken.append(len(self.arrivals))
        self.bank.later_steps(self.arrivals)
        self.arrivals = []

    def slot(self, optimizer, g):
        index = self.bank.claim(optimizer)
        return None if index is None else (self.bank, index)

    def later_step(self, optimizer, g, loss):
        self.arrivals.append((optimizer, g, loss))
        self.barrier.wait()


def test_runs_of_a_bank_take_the_steps_each_takes_alone(device="cpu"):
    # three runs with their own scale, start and lr share one bank (a slot spare); history 4 wraps
    # the ring of pairs many times, and Rosenbrock makes some pairs fail the curvature test
    runs = [(1.0, START.to(device), 0.5), (1e-6, START.flip(0).to(device), 1.0), (1e3, START.to(device) * 0.5, 0.3)]
    steps = 40
    alone = [trajectory(lambda p, lr=lr: LBFGS(p, lr=lr, history_size=4), steps, lambda x, c=c: c * rosenbrock(x), start)
             for c, start, lr in runs]
    together = Together(len(runs), capacity=4, history_size=4, like=START.to(device))
    results = [None] * len(runs)

    def run(index):
        c, start, lr = runs[index]

        def make(params):
            optimizer = LBFGS(params, lr=lr, history_size=4)
            optimizer.together = together
            return optimizer

        results[index] = trajectory(make, steps, lambda x: c * rosenbrock(x), start)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together.taken == [3] * (steps - 1)  # every later step in one batched set of operations
    for (losses, x, _), (banked_losses, banked_x, optimizer) in zip(alone, results):
        torch.testing.assert_close(banked_losses, losses, rtol=1e-9, atol=0)
        torch.testing.assert_close(banked_x, x, rtol=1e-9, atol=1e-12)
        state = optimizer.state_dict()["state"][0]
        assert state["history"].untyped_storage().data_ptr() != together.bank.state["history"].untyped_storage().data_ptr()
        assert torch.equal(state["history"], together.bank.views(optimizer._slot[1])["history"])
    assert sorted(optimizer._slot[1] for _, _, optimizer in results) == [0, 1, 2] and together.bank.free == [3]


def test_later_steps_leave_runs_that_are_not_active_as_they_were():
    _, _, optimizer = trajectory(lambda p: LBFGS(p, lr=0.5, history_size=4), 6)
    one = {name: value for name, value in optimizer.state_dict()["state"][0].items() if name != "n_iter"}
    state = {name: torch.stack([value, value]) for name, value in one.items()}
    g = torch.stack([torch.ones(40, dtype=torch.float64), torch.ones(40, dtype=torch.float64)])
    before = copy.deepcopy(state)
    direction, length = later_steps(state, g, torch.tensor([3.0, 3.0], dtype=torch.float64), 0.5, 0.0, 0.0,
                                    active=torch.tensor([True, False]))
    assert length[1] == 0
    for name, value in state.items():
        assert torch.equal(value[1], before[name][1]), name
    assert length[0] != 0 and any(not torch.equal(value[0], before[name][0]) for name, value in state.items())
