import gc
import threading

from stx.runs.startup import heavy_imports


def test_the_collector_is_off_inside_and_on_after_with_the_objects_frozen():
    assert gc.isenabled()
    try:
        with heavy_imports():
            assert not gc.isenabled()
            with heavy_imports():  # nested: still off when the inner block ends
                kept = [[] for _ in range(1000)]
            assert not gc.isenabled()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()


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
        gc.unfreeze()
        gc.enable()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    try:
        with heavy_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
