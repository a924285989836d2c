import gc
import sys
import threading

import pytest

from stx.runs import startup
from stx.runs.startup import heavy_imports

PROBE = "stx_startup_probe"


@pytest.fixture(autouse=True)
def command(monkeypatch):
    """As in the stx command's process (stx as a library leaves its host's collector alone)."""
    monkeypatch.setattr(startup, "_command", True)
    yield
    sys.modules.pop(PROBE, None)
    gc.unfreeze()
    gc.enable()


def load_a_module() -> None:
    sys.modules[PROBE] = type(sys)(PROBE)


def test_the_collector_is_off_inside_and_on_after_with_the_objects_frozen():
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with heavy_imports():
        assert not gc.isenabled()
        with heavy_imports():  # nested: still off when the inner block ends
            kept = [[] for _ in range(1000)]
            load_a_module()
        assert not gc.isenabled()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(kept)


def test_a_block_that_loads_nothing_freezes_nothing():
    with heavy_imports():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_blocks_in_several_threads_turn_the_collector_on_when_the_last_ends():
    inside, releases = threading.Barrier(3), [threading.Event(), threading.Event()]

    def block(release: threading.Event) -> None:
        with heavy_imports():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=block, args=(release,)) for release in releases]
    try:
        for thread in threads:
            thread.start()
        inside.wait()
        releases[0].set()
        threads[0].join()
        assert not gc.isenabled()  # the other thread's block is still on
        releases[1].set()
        threads[1].join()
        assert gc.isenabled()
    finally:
        for release in releases:
            release.set()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with heavy_imports():
        load_a_module()
    assert not gc.isenabled()


def test_outside_the_command_the_collector_is_left_alone(monkeypatch):
    monkeypatch.setattr(startup, "_command", False)
    with heavy_imports():
        load_a_module()
        assert gc.isenabled()
    assert gc.get_freeze_count() == 0
