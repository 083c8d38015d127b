"""eecompile.passes.store.Appender: folded weights written by a background thread, in order, bounded."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from eecompile.errors import OutputDirError
from eecompile.passes import store
from eecompile.passes.store import ALIGN, ALIGN_ABOVE, Appender, FileValues, TensorStore


def test_queued_tensors_land_at_their_offsets_and_read_back(tmp_path):
    """Offsets are decided when a tensor is queued; a read of a tensor still queued waits for its write."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (ALIGN_ABOVE // 4 + 3, 20000, ALIGN_ABOVE // 4)]
    target = TensorStore(tmp_path / "scratch.bin")
    target.open_final(tmp_path / "model.onnx.data", "model.onnx.data")
    values = [target.put(f"w{i}", a) for i, a in enumerate(arrays)]
    assert all(isinstance(v, FileValues) for v in values)
    assert values[2].offset % ALIGN == 0 and values[1].offset == values[0].offset + arrays[0].nbytes
    np.testing.assert_array_equal(values[2].load(), arrays[2])  # before close: waits for the queue
    target.close()
    data = np.fromfile(tmp_path / "model.onnx.data", np.uint8)
    for v, a in zip(values, arrays):
        np.testing.assert_array_equal(data[v.offset:v.offset + a.nbytes].view(np.float32), a)


def test_the_queue_never_holds_more_than_its_limit(tmp_path, monkeypatch):
    """While the disk is slow, ``append`` blocks: at most ``limit`` bytes (or one larger array) wait in memory."""
    gate = threading.Event()
    written = []
    real_write = store._write

    def slow(handle, array):
        gate.wait(5)
        written.append(array.nbytes)
        real_write(handle, array)

    monkeypatch.setattr(store, "_write", slow)
    appender = Appender(tmp_path / "d.bin", limit=3 << 10)
    peaks = []
    done = threading.Event()

    def produce():
        for _ in range(6):
            appender.append(np.zeros(256, np.float32))  # 1 KiB each
            peaks.append(appender._queued)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert not done.wait(0.3), "appending six KiB through a 3 KiB queue must block while nothing is written"
    assert max(peaks) <= 3 << 10
    gate.set()
    producer.join(5)
    appender.close()
    assert done.is_set() and written == [1024] * 6
    assert (tmp_path / "d.bin").stat().st_size == 6 * 1024


def test_a_write_error_is_one_line_naming_the_file(tmp_path, monkeypatch):
    def full(handle, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write", full)
    appender = Appender(tmp_path / "d.bin")
    appender.append(np.zeros(16, np.float32))
    with pytest.raises(OutputDirError, match=r"no space left on device while writing .*d\.bin"):
        appender.close()
    assert not appender._thread.is_alive()


def test_discarding_drops_what_is_queued_and_stops_the_thread(tmp_path, monkeypatch):
    gate = threading.Event()
    real_write = store._write
    monkeypatch.setattr(store, "_write", lambda h, a: (gate.wait(5), real_write(h, a)))
    appender = Appender(tmp_path / "d.bin")
    for _ in range(3):
        appender.append(np.ones(1024, np.float32))
    closing = threading.Thread(target=appender.close, kwargs={"discard": True})
    closing.start()
    gate.set()
    closing.join(5)
    assert not closing.is_alive() and not appender._thread.is_alive()
    assert (tmp_path / "d.bin").stat().st_size <= 4096  # at most the one write already under way
    assert str(tmp_path / "d.bin") not in store._APPENDERS


def test_the_limit_grows_to_the_largest_array(tmp_path, monkeypatch):
    """A weight larger than the queue's bytes is let through alone, and from then on as much may wait."""
    gate = threading.Event()
    real_write = store._write
    monkeypatch.setattr(store, "_write", lambda h, a: (gate.wait(5), real_write(h, a)))
    appender = Appender(tmp_path / "d.bin", limit=1 << 10)
    appender.append(np.zeros(1024, np.float32))  # 4 KiB: above the 1 KiB limit, let through alone
    assert appender.limit == 4 << 10
    gate.set()
    appender.close()
    assert (tmp_path / "d.bin").stat().st_size == 4 << 10
