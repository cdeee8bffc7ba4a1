"""What idle time costs: the price of useful GPU compute, of 1,000 requests and of a million
output tokens; the GPUs a traffic needs and what they cost a month.

Utilization is a **fraction** in (0, 1] (0.18 for 18 %), e.g. ``summary["mean_util"] / 100`` from
`labkit.measure.utilization.UtilizationSampler`. A value above 1 is rejected rather than guessed
at: 18 could mean 18 % or a mistake, and a silent ×100 error in a cost figure is worse than an
error message.

NVML's utilization counts any running kernel as busy, so "useful" here is generous: the real cost
of useful work is higher still (see SM activity in ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def _check_price(hourly_price: float) -> float:
    price = float(hourly_price)
    if not (math.isfinite(price) and price > 0):
        raise ValueError(f"hourly_price must be a positive number of dollars per hour, "
                         f"got {hourly_price!r}")
    return price


def _check_rate(name: str, value: float) -> float:
    rate = float(value)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{name} must be > 0 (a measured throughput), got {value!r}")
    return rate


def _check_utilization(utilization: float) -> float:
    util = float(utilization)
    if not math.isfinite(util):
        raise ValueError(f"utilization must be a number, got {utilization!r}")
    if util > 1:
        raise ValueError(
            f"utilization must be a fraction in (0, 1], got {utilization!r}: if you meant "
            f"{util:g} %, pass {util / 100:g} (e.g. summary['mean_util'] / 100)"
        )
    if util <= 0:
        raise ValueError(
            f"utilization must be > 0, got {utilization!r}: at 0 % no compute is useful and its "
            "cost per useful hour is unbounded"
        )
    return util


@dataclass(frozen=True)
class EffectiveCost:
    hourly_price: float  # $ per hour paid for the GPU
    utilization: float  # fraction of the time the GPU was busy
    per_useful_hour: float  # $ per hour of actual compute: price / utilization
    idle_cost_per_hour: float  # $ of each paid hour that buys idle time: price × (1 − utilization)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"At ${self.hourly_price:.2f}/h and {self.utilization:.1%} utilization: "
            f"${self.per_useful_hour:.2f} per hour of actual compute; "
            f"${self.idle_cost_per_hour:.2f} of every hour pays for idle time"
        )


def effective_cost(hourly_price: float, utilization: float) -> EffectiveCost:
    """The seed's example: effective_cost(3.0, 0.18) -> $16.67 per useful hour, $2.46/h idle."""
    price, util = _check_price(hourly_price), _check_utilization(utilization)
    return EffectiveCost(price, util, price / util, price * (1 - util))


def cost_per_1000_requests(hourly_price: float, requests_per_second: float) -> float:
    """Dollars per 1,000 requests at a measured throughput (successful requests / s)."""
    price = _check_price(hourly_price)
    return price / (_check_rate("requests_per_second", requests_per_second) * 3600) * 1000


HOURS_PER_MONTH = 730  # a year's 8,760 hours ÷ 12


def cost_per_million_tokens(hourly_price: float, tokens_per_second: float) -> float:
    """Dollars per million output tokens from one GPU at `hourly_price` that generates
    `tokens_per_second` (a measured point's output tok/s per GPU)."""
    price = _check_price(hourly_price)
    return price / (_check_rate("tokens_per_second", tokens_per_second) * 3600) * 1e6


def gpus_needed(demand_tokens_per_second: float, tokens_per_second_per_gpu: float) -> int:
    """Whole GPUs that generate `demand_tokens_per_second` at a measured per-GPU throughput."""
    demand = _check_rate("demand_tokens_per_second", demand_tokens_per_second)
    return math.ceil(demand / _check_rate("tokens_per_second_per_gpu", tokens_per_second_per_gpu)
                     - 1e-9)


def monthly_cost(gpus: int, hourly_price: float, hours: float = HOURS_PER_MONTH) -> float:
    """Dollars a month for `gpus` GPUs rented around the clock at `hourly_price` each."""
    return gpus * _check_price(hourly_price) * hours
