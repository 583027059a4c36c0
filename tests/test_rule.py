"""seqkern.testing: the correctness rule itself (the floor scales with the oracle's magnitude above 1)."""
import torch

from seqkern.testing import FLOOR, max_abs_error, rule_bound, rule_floor


def test_floor_is_absolute_at_unit_scale_and_relative_above():
    small = torch.tensor([0.5, -0.25], dtype=torch.float64)
    large = torch.tensor([26.0, -3.0], dtype=torch.float64)
    assert rule_floor(torch.float32, small) == FLOOR[torch.float32]
    assert rule_floor(torch.float32, large) == FLOOR[torch.float32] * 26.0
    assert rule_floor(torch.float32, torch.empty(0, dtype=torch.float64)) == FLOOR[torch.float32]


def test_bound_is_twice_torch_error_plus_floor():
    oracle = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    theirs = torch.tensor([1.0, 2.0 + 2**-20, 3.0], dtype=torch.float32)
    assert max_abs_error(theirs, oracle) == 2**-20
    assert rule_bound(theirs, oracle) == 2 * 2**-20 + FLOOR[torch.float32] * 3.0
    assert max_abs_error(torch.empty(0), torch.empty(0, dtype=torch.float64)) == 0.0
