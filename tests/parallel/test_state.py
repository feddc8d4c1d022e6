from parallel.state import TensorParallelGroup, split_evenly


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert split_evenly(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_single_rank_exchange_is_the_identity() -> None:
    import torch

    block = torch.arange(12.0).reshape(3, 4)
    assert TensorParallelGroup.single().rows_to_columns(block, 3) is block
