"""Exercise set 07 (sharing one GPU): memory per server, servers that fit."""

from __future__ import annotations

import math

from labkit.course.answers.verdict import (
    CheckResult,
    _compare,
    _finish,
    _positive,
    _rows,
    _whole,
)


def _memory_line(rows, memory_key: str) -> tuple[float, dict, dict]:
    """(memory per extra server, the row with the fewest servers, the row with the most) of the
    sequential set-ups in `rows` (rows of `experiments.share_one_gpu`): the slope of memory
    between the fewest and the most servers measured."""
    table = _rows([r for r in rows if r.get("mode", "sequential") == "sequential"],
                  ("servers", memory_key))
    fewest = min(table, key=lambda r: r["servers"])
    most = max(table, key=lambda r: r["servers"])
    if most["servers"] == fewest["servers"]:
        raise ValueError("measure at least two different server counts")
    slope = (most[memory_key] - fewest[memory_key]) / (most["servers"] - fewest["servers"])
    if not slope > 0:
        raise ValueError(f"{memory_key} did not grow with the server count; measure again")
    return slope, fewest, most


def memory_per_server(answer, rows, memory_key: str = "gpu_memory_used_gb") -> CheckResult:
    """GB each extra server process adds: the slope of memory against the server count."""
    slope, _, most = _memory_line(rows, memory_key)
    mistakes = [(most[memory_key] / most["servers"], "That divides everything in use by the "
                 "server count, including memory that was in use without any of them; take "
                 "the difference between two set-ups instead.")]
    return _finish(_compare(
        "memory_per_server", answer, slope, unit="GB", rel_tol=0.02, mistakes=mistakes,
        hint="(memory with the most servers − memory with the fewest) ÷ (the difference in "
             "server count)."))


def servers_that_fit(answer, rows, capacity_gb: float,
                     memory_key: str = "gpu_memory_used_gb") -> CheckResult:
    """How many server processes fit in `capacity_gb`, each extra one adding the measured
    memory per server to the smallest set-up's. A whole number: ✅ only when exact, 🟡 when only
    the rounding is off."""
    exercise = "servers_that_fit"
    capacity = _positive("capacity_gb", capacity_gb)
    slope, fewest, _ = _memory_line(rows, memory_key)
    servers, used = fewest["servers"], fewest[memory_key]
    if used > capacity:
        raise ValueError(f"the smallest set-up already uses {used:g} GB of {capacity:g} GB")
    expected = int(servers + math.floor((capacity - used) / slope + 1e-9))  # 1e-9: float noise
    rounding = [(expected + 1, "one too many; round down, as a server that does not fully "
                               "fit cannot start")]
    mistakes = [(math.floor(capacity / slope + 1e-9), "That ignores what the first set-up "
                 "already holds beyond one server's share; start from its measured memory and "
                 "add servers until the capacity is reached.")]
    return _finish(_whole(exercise, answer, expected, noun="servers", rounds="down",
                          rounding=rounding, mistakes=mistakes,
                          hint="start from the smallest set-up's memory and add one server's "
                               "memory at a time: servers + (capacity − memory) ÷ memory per "
                               "server, rounded down."))


def servers_to_match(answer, rows) -> CheckResult:
    """Sequential servers needed to match the batched server's throughput, if each added one
    lone server's throughput (the best case): ceil(batched req/s ÷ one server's req/s).
    A whole number: ✅ only when exact, 🟡 when only the rounding is off."""
    exercise = "servers_to_match"
    table = _rows(rows, ("servers", "requests_per_second"))
    single = [r for r in table if r.get("mode") == "sequential" and r["servers"] == 1]
    batched = [r for r in table if r.get("mode") == "batched"]
    if not single or not batched:
        raise ValueError("rows need a one-server sequential set-up and a batched one")
    ratio = batched[0]["requests_per_second"] / single[0]["requests_per_second"]
    expected = math.ceil(ratio - 1e-9)
    rounding = [(math.floor(ratio + 1e-9), "one too few; round up, as a fraction of a server "
                                           "cannot run")]
    mistakes = [(math.ceil(1 / ratio - 1e-9), "That is one server's requests/s over the "
                 "batched server's: divide the other way round.")]
    return _finish(_whole(exercise, answer, expected, noun="servers", rounds="up",
                          rounding=rounding, mistakes=mistakes,
                          hint="divide the batched server's requests/s by one sequential "
                               "server's, and round up."))
