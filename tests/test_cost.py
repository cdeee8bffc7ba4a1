import math

import pytest

from labkit.measure.cost import cost_per_1000_requests, effective_cost


def test_seed_example():
    cost = effective_cost(3.0, 0.18)
    assert cost.per_useful_hour == pytest.approx(16.67, abs=0.005)
    assert cost.idle_cost_per_hour == pytest.approx(2.46, abs=0.005)
    assert "$16.67 per hour of actual compute" in str(cost)
    assert "$2.46" in str(cost) and "18.0% utilization" in str(cost)
    assert cost.as_dict()["utilization"] == 0.18


def test_full_utilization_has_no_idle_cost():
    cost = effective_cost(2.5, 1)
    assert cost.per_useful_hour == 2.5 and cost.idle_cost_per_hour == 0


@pytest.mark.parametrize("bad, message", [
    (18, r"pass 0\.18"),  # a percent where a fraction is expected
    (100, r"pass 1"),
    (0, "> 0"),
    (-0.1, "> 0"),
    (math.nan, "must be a number"),
])
def test_utilization_must_be_a_fraction(bad, message):
    with pytest.raises(ValueError, match=message):
        effective_cost(3.0, bad)


@pytest.mark.parametrize("price", [0, -1, math.inf])
def test_price_must_be_positive(price):
    with pytest.raises(ValueError, match="hourly_price"):
        effective_cost(price, 0.5)
    with pytest.raises(ValueError, match="hourly_price"):
        cost_per_1000_requests(price, 1.0)


def test_cost_per_1000_requests():
    # $3/h at 71 requests/min (the seed's throughput): 4,260 requests per hour
    assert cost_per_1000_requests(3.0, 71 / 60) == pytest.approx(3.0 / 4260 * 1000)
    assert cost_per_1000_requests(3.6, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="requests_per_second"):
        cost_per_1000_requests(3.0, 0)


def test_a_million_tokens_gpus_for_a_traffic_and_their_month():
    from labkit.measure.cost import (
        HOURS_PER_MONTH,
        cost_per_million_tokens,
        gpus_needed,
        monthly_cost,
    )

    # $3/h at 560 tok/s: 2.016M tokens an hour, $1.49 per million
    assert cost_per_million_tokens(3.0, 560) == pytest.approx(3.0 / (560 * 3600) * 1e6)
    assert cost_per_million_tokens(3.0, 560) == pytest.approx(1.488, abs=0.001)
    assert gpus_needed(11_574, 560) == 21 and gpus_needed(1120, 560) == 2  # exact: no extra GPU
    assert monthly_cost(21, 3.0) == 21 * 3.0 * HOURS_PER_MONTH == 45_990
    with pytest.raises(ValueError, match="tokens_per_second must be > 0"):
        cost_per_million_tokens(3.0, 0)
    with pytest.raises(ValueError, match="tokens_per_second_per_gpu"):
        gpus_needed(100, math.nan)
    with pytest.raises(ValueError, match="hourly_price"):
        monthly_cost(2, -1)
