"""`pruning.data.epoch_batches`: the one epoch cycling with resume of mask learning and the training loops."""

import pytest
import torch

from pruning.data import data_length, epoch_batches


class _Epochs:
    """Batches `(epoch, index)`; `set_epoch` records its calls, as a seeded loader or a crop dataset reseeds."""

    def __init__(self, length: int, sized: bool = True):
        self.length, self.sized, self.epoch, self.calls = length, sized, 0, []
        self.dataset = type("Crops", (), {"set_epoch": lambda _, epoch: self.calls.append(("dataset", epoch))})()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.calls.append(("data", epoch))

    def __iter__(self):
        return iter([(self.epoch, index) for index in range(self.length)])

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("a stream")
        return self.length


def _take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize("start", [0, 2, 3, 7])
def test_a_resume_reads_what_the_uninterrupted_run_reads_next(sized, start):
    straight = _take(epoch_batches(_Epochs(3, sized)), 10)
    resumed = _take(epoch_batches(_Epochs(3, sized), start), 10 - start)
    assert resumed == straight[start:]
    assert [batch for _, _, batch in straight] == [(epoch, index) for epoch in range(4) for index in range(3)][:10]
    assert [position for _, position, _ in straight] == list(range(10))


def test_sized_data_skips_with_skip_batches_and_both_epoch_setters_are_called():
    skipped = []

    def skip_batches(data, count):
        skipped.append(count)
        return list(data)[count:]

    data = _Epochs(3)
    assert _take(epoch_batches(data, 7, skip_batches), 3) == [(2, 7, (2, 1)), (2, 8, (2, 2)), (3, 9, (3, 0))]
    assert skipped == [1]  # whole epochs are jumped unread, the rest skipped once
    assert data.calls == [("data", 2), ("dataset", 2), ("data", 3), ("dataset", 3)]


def test_empty_data_is_an_error():
    with pytest.raises(ValueError, match="gives no batch"):
        next(epoch_batches(_Epochs(0)))
    with pytest.raises(ValueError, match="gives no batch"):
        next(epoch_batches(_Epochs(0, sized=False)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4)), batch_size=2)
    assert data_length(loader) == 2 and data_length(iter([])) is None
