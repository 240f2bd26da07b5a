import os
import threading
import time

from kvmkit.host.loop import EventLoop


def test_call_soon_from_other_thread_and_timers():
    loop = EventLoop()
    loop.start()
    seen = []
    done = threading.Event()
    loop.call_soon(lambda: seen.append("soon"))
    loop.call_soon_later(0.02, lambda: (seen.append("later"), done.set()))
    assert done.wait(2)
    assert seen == ["soon", "later"]
    loop.close()


def test_reader_callback_and_failing_callback_is_contained():
    loop = EventLoop()
    r, w = os.pipe()
    got = []
    ev = threading.Event()

    def on_read():
        got.append(os.read(r, 100))
        ev.set()

    loop.add_reader(r, on_read)
    loop.call_soon(lambda: 1 / 0)
    loop.start()
    os.write(w, b"hi")
    assert ev.wait(2)
    assert got == [b"hi"]
    time.sleep(0.05)
    assert loop.errors == 1
    loop.close()
    os.close(r)
    os.close(w)
