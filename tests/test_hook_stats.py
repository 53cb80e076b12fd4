"""rft.openrlhf.stats against numpy's quantile and hand-counted pass rates."""

import numpy as np
import pytest
import torch

from rft.openrlhf.stats import pass_rates, quantile_linear


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_quantile_matches_numpy(q, n):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert quantile_linear(values, q) == pytest.approx(float(np.quantile(values.double().numpy(), q)), abs=1e-12)


def test_quantile_of_nothing_is_nan():
    assert np.isnan(quantile_linear(torch.empty(0), 0.5))


def test_pass_rates_by_hand():
    # prompt 1: 2 of 4 right; prompt 2: 0 of 4; prompt 3: 4 of 4 -> pass@1 = (0.5 + 0 + 1) / 3
    hits = [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert pass_rates(hits) == pytest.approx((0.5, 2 / 3))


def test_pass_rates_refuse_empty_groups():
    with pytest.raises(ValueError):
        pass_rates([[1], []])
