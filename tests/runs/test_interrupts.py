"""How stx stops: the first SIGINT/SIGTERM raises, the ones after it are held off, exit codes."""

import os
import signal

import pytest

from stx.runs import interrupts


@pytest.fixture
def job_handlers():
    previous = interrupts.stop_on_signals()
    yield
    interrupts.restore(previous)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_raises_and_later_ones_are_held_off(job_handlers, capfd, signum, code):
    closed = False
    with pytest.raises(interrupts.Interrupted) as stopped:
        try:
            os.kill(os.getpid(), signum)  # its handler runs before the next line
        finally:  # what the job does while stopping: a second signal must not cut it short
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            closed = True
    assert closed and stopped.value.signum == signum
    assert interrupts.exit_code(stopped.value) == code
    assert str(stopped.value) == f"interrupted by {signal.Signals(signum).name}"
    assert capfd.readouterr().err.count("while stopping: still writing the latest image and closing the MLflow run") == 2


def test_restore_puts_back_the_previous_handlers():
    before = {signum: signal.getsignal(signum) for signum in interrupts.STOP_SIGNALS}
    previous = interrupts.stop_on_signals()
    interrupts.hold_off()
    interrupts.restore(previous)
    assert {signum: signal.getsignal(signum) for signum in interrupts.STOP_SIGNALS} == before


def test_a_plain_keyboard_interrupt_exits_130():
    assert interrupts.exit_code(KeyboardInterrupt()) == 130


def test_a_signal_inside_an_uninterruptible_block_is_raised_when_it_ends(job_handlers, capfd):
    """A call to the store's helper process is such a block: cut between its request and its answer,
    the next call would read this one's answer (a run then left RUNNING, seen under load in CI)."""
    done = []
    with pytest.raises(interrupts.Interrupted) as stopped:
        with interrupts.uninterruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("answer read")
        done.append("not reached")
    assert done == ["answer read"] and stopped.value.signum == signal.SIGTERM
    with interrupts.uninterruptible():  # later blocks: the signal was raised once
        os.kill(os.getpid(), signal.SIGINT)  # held off now, as any signal while stopping
    assert "while stopping" in capfd.readouterr().err
