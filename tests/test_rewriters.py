"""The pass-2 rewriters, and the progress counted around them."""

import numpy as np

from gclip_cli.formats import TensorInfo
from gclip_cli.progress import SILENT, Progress
from gclip_cli.rewriters import Scaler, counted
from gclip_cli.rounding import ScaleFactor


def _tensor(name: str, dtype) -> TensorInfo:
    return TensorInfo(name, np.dtype(dtype).name, (4,), 16, dtype=np.dtype(dtype))


def test_scaler_scales_in_place_and_measures_each_tensor_written():
    scaler = Scaler(dict.fromkeys(("a", "b"), ScaleFactor.of(0.5)), 2.0)
    a, b = _tensor("a", np.float32), _tensor("b", np.float64)
    first = np.array([3.0, 4.0], dtype=np.float32)
    written = np.empty_like(first)
    scaler(a, first, written)
    zeros = np.zeros(2, dtype=np.float32)
    scaler(a, zeros, zeros)
    in_place = np.array([6.0, 8.0])
    scaler(b, in_place, in_place)
    after = scaler.finish()
    assert first.tolist() == [3.0, 4.0] and written.tolist() == [1.5, 2.0]
    assert in_place.tolist() == [3.0, 4.0]
    assert after["a"].norm() == 2.5
    assert after["b"].norm() == 5.0


def test_counted_tells_the_bytes_of_each_chunk_written_after_writing_it():
    scaler = Scaler({"a": ScaleFactor.of(0.5)}, 2.0)
    seen = []

    def watch(event):  # each event comes once its chunk is written
        seen.append((event, written.tolist()))

    transform = counted(scaler, Progress(watch))
    source, written = np.array([2.0, 4.0, 6.0], dtype=np.float32), np.zeros(3, np.float32)
    transform(_tensor("a", np.float32), source, written)
    transform(_tensor("a", np.float32), source[:1], written[:1])
    assert seen == [(12, [1.0, 2.0, 3.0]), (4, [1.0, 2.0, 3.0])]
    assert scaler.finish()["a"].numel == 4  # the rewriter measured what it wrote


def test_nothing_is_counted_where_nobody_listens():
    scaler = Scaler({}, 2.0)
    assert counted(scaler, SILENT) is scaler


def test_a_blank_rewriter_pickles_and_comes_back_with_what_it_wrote():
    """Workers get copies of a rewriter and send theirs back: it holds no progress sink."""
    import pickle

    scaler = Scaler({"a": ScaleFactor.of(0.5)}, 2.0)
    worker = scaler.blank()
    counted(worker, Progress([].append))(
        _tensor("a", np.float32), np.ones(2, np.float32), np.ones(2, np.float32)
    )
    worker.finish()
    scaler.merge(pickle.loads(pickle.dumps(worker)))
    assert scaler.finish()["a"].numel == 2
