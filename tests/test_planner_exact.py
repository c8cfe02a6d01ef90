"""The solver against brute force on random small problems (the planner's exactness claim).

The brute force lives here, not in the product: an exhaustive recursion over every
plan — which unused devices (any subset when replication is on) run the next stage, and
where it ends — memoised on (units covered, devices used, devices of the last stage),
with the cost model written out again from its definition (issue 3, and issue 12's NIC
per device), not taken from the planner. It minimises the bottleneck, then the latency at
that bottleneck. A few tiny problems are also checked against plain enumeration, to keep
the brute force honest.
"""

from __future__ import annotations

import functools
import itertools
import math
import random

import numpy as np
import pytest
from helpers import NO_CLOCK

from edgezmq.planner import Problem, evaluate, solve
from edgezmq.planner.cost import stage_memory_bytes

SEEDS = range(300)
RTOL = 1e-9
IO_ROOM = 200_000


def random_problem(seed: int, *, max_devices: int = 6, max_units: int = 10,
                   pair_overrides: bool = True) -> dict:
    """Random speeds, memories, per-pair bandwidths and latencies, replication on or off.
    Without pair overrides, devices of a type stay alike (big classes, mixed stages)."""
    rng = random.Random(seed)
    n_units = rng.randint(max(1, max_units - 5), max_units)
    n_dev = rng.randint(max(1, max_devices - 3), max_devices)
    units = [{"name": f"u{i}", "out_bytes": rng.randint(1, 50) * 1000, "param_bytes": rng.randint(1, 60),
              "work_bytes": rng.randint(0, 20)} for i in range(n_units)]
    total = sum(u["param_bytes"] for u in units)
    types = {}
    for t in range(rng.randint(1, 3)):
        times = [round(rng.uniform(0.05, 2.0), 3) for _ in range(n_units)]
        # activation buffers take up to 2 x 2 x 50 kB; parameters decide the rest
        types[f"t{t}"] = {"memory_bytes": IO_ROOM + rng.randint(total // 4, total + 60),
                          "reserved_bytes": rng.choice([0, 25]), "unit_times_s": times}
    if rng.random() < 0.3:     # an unprofiled unit (like a head): free everywhere
        free_unit = rng.randrange(n_units)
        for t in types.values():
            t["unit_times_s"][free_unit] = 0.0
    devices = []
    for i in range(n_dev):
        d = {"name": f"d{i}", "type": rng.choice(sorted(types))}
        if rng.random() < 0.2:
            d["speed"] = rng.choice([0.5, 1.5, 2.0])
        devices.append(d)
    names = ["client"] + [d["name"] for d in devices]
    overrides = []
    for a, b in itertools.combinations(names, 2):
        if pair_overrides and rng.random() < 0.35:
            overrides.append({"a": a, "b": b, "mbps": rng.choice([0.1, 0.2, 0.5, 1.0, 3.0]),
                              "latency_ms": rng.choice([0, 1, 20])})
    if rng.random() < 0.3 and len(types) > 1:
        ta, tb = rng.sample(sorted(types), 2)
        overrides.append({"a": ta, "b": tb, "mbps": 0.3, "latency_ms": 5})
    # receive/send costs, large enough (up to 0.5 s per 50 kB) that a stage's time may fall
    # as it grows past a unit with a small output
    for holder in [*types.values(), *devices]:
        if rng.random() < (0.5 if holder in types.values() else 0.15):
            holder["recv_ms_per_mb"] = rng.choice([0, 1000, 10_000])
            holder["send_ms_per_mb"] = rng.choice([0, 1000, 10_000])
    return {
        "model": {"name": "rand", "microbatch": rng.choice([1, 8]), "input_bytes": rng.randint(1, 50) * 1000,
                  "units": units},
        "device_types": types, "devices": devices,
        "links": {"default": {"mbps": rng.choice([0.5, 1.0, 2.0]), "latency_ms": 1}, "overrides": overrides},
        "options": {"replication": rng.random() < 0.6, "buffers": rng.choice([0, 1, 2])},
    }


NIC_RATES = (0.1, 0.2, 0.5, 1.0, 2.0)   # Mbit/s: 50 kB take 4 s down to 0.2 s, like the links


def with_nics(d: dict, seed: int, *, per_device: bool = True) -> dict:
    """``d`` with random NIC limits (issue 12): on some device types, devices (overriding
    their type's; only with ``per_device``) and the client; one rate both ways, or
    ``{up, down}`` with either one possibly omitted. Its own generator: the problem's
    other figures stay as ``seed`` made them."""
    rng = random.Random(10_000 + seed)

    def nic():
        kind = rng.random()
        if kind < 0.4:
            return rng.choice(NIC_RATES)
        out = {"up": rng.choice(NIC_RATES), "down": rng.choice(NIC_RATES)}
        if kind > 0.85:
            del out[rng.choice(["up", "down"])]
        return out

    for t in d["device_types"].values():
        if rng.random() < 0.6:
            t["nic_mbps"] = nic()
    if per_device:
        for dev in d["devices"]:
            if rng.random() < 0.25:
                dev["nic_mbps"] = nic()
    if rng.random() < 0.4:
        d["client"] = {"nic_mbps": nic()}
    return d


def dominance_problem(seed: int) -> dict:
    """Board types that are faster, bigger and better connected in order (a dominance chain),
    a few devices each: stages mixing types, which the solver restricts by dominance."""
    rng = random.Random(seed)
    n_units = rng.randint(2, 8)
    base = [round(rng.uniform(0.1, 2), 3) for _ in range(n_units)]
    n_types = rng.randint(2, 3)
    link_mbps = (2.0, 1.0, 0.5)
    types = {f"t{t}": {"memory_bytes": IO_ROOM + rng.randint(100, 400) * (n_types - t), "reserved_bytes": 0,
                       "unit_times_s": [round(x * (1.0, 1.7, 3.0)[t], 4) for x in base]}
             for t in range(n_types)}
    overrides = []
    for a in range(n_types):
        overrides.append({"a": "client", "b": f"t{a}", "mbps": link_mbps[a], "latency_ms": 1})
        for b in range(a, n_types):
            overrides.append({"a": f"t{a}", "b": f"t{b}", "latency_ms": 1,
                              "mbps": min(link_mbps[a], link_mbps[b]) * rng.choice([1, 0.5])})
    return {
        "model": {"name": "chain", "microbatch": 8, "input_bytes": 20_000,
                  "units": [{"name": f"u{i}", "out_bytes": rng.randint(1, 50) * 1000,
                             "param_bytes": rng.randint(10, 100), "work_bytes": rng.randint(0, 10)}
                            for i in range(n_units)]},
        "device_types": types,
        "devices": [{"name": f"d{i}", "type": f"t{rng.randrange(n_types)}"} for i in range(rng.randint(3, 6))],
        "links": {"default": {"mbps": 1}, "overrides": overrides},
        "options": {"replication": True, "buffers": 1},
    }


class BruteForce:
    """Every plan of a problem, costed from the definitions; (bottleneck, latency) minimal."""

    def __init__(self, problem: Problem) -> None:
        self.p = problem
        self.devs = problem.devices
        self.L = problem.num_units
        self.rep = problem.options.replication
        # per-instance memo tables (a method-level cache would keep every problem alive)
        self.stage = functools.cache(self._stage)
        self.link = functools.cache(self._link)
        self.bottleneck = functools.cache(self._bottleneck)
        self.latency = functools.cache(self._latency)

    def cut_bytes(self, u: int) -> int:
        return self.p.model.input_bytes if u == 0 else self.p.units[u - 1].out_bytes

    def names(self, mask: int) -> list[str]:
        return [d.name for i, d in enumerate(self.devs) if mask >> i & 1] if mask else ["client"]

    def _stage(self, mask: int, a: int, b: int) -> tuple[float, float] | None:
        """(compute, unreplicated) of units [a, b) on the devices of mask, None if memory fails."""
        units = self.p.units[a:b]
        need = (sum(u.param_bytes + u.cache_bytes for u in units) + max(u.work_bytes for u in units)
                + self.p.options.buffers * (self.cut_bytes(a) + units[-1].out_bytes))
        members = [d for i, d in enumerate(self.devs) if mask >> i & 1]
        if any(need + d.reserved_bytes > d.memory_bytes for d in members):
            return None
        slowest = max(sum(d.unit_times_s[a:b]) + d.recv_s_per_byte * self.cut_bytes(a)
                      + d.send_s_per_byte * units[-1].out_bytes for d in members)
        return slowest / len(members), slowest

    def _link(self, src: int, dst: int, nbytes: int) -> tuple[float, float]:
        """(bottleneck time, latency) of a link between two device sets (0 = the client).

        Each pair carries its share of the bytes; each sender's one uplink carries its
        share n / |X| of what the link carries, each receiver's downlink n / |Y|; a
        microbatch crosses at the slowest of its pair's rate, the sender's up, the
        receiver's down. A NIC not given is unlimited (inf: its terms are 0)."""
        xs, ys = self.names(src), self.names(dst)
        worst_t = worst_l = 0.0
        for x in xs:
            for y in ys:
                link = self.p.link(x, y)
                transfer = nbytes * 8 / (link.mbps * 1e6)
                worst_t = max(worst_t, transfer / (len(xs) * len(ys)))
                rate = min(link.mbps, self.p.nic(x).up_mbps, self.p.nic(y).down_mbps)
                worst_l = max(worst_l, link.latency_ms / 1000 + nbytes * 8 / (rate * 1e6))
        for x in xs:
            worst_t = max(worst_t, nbytes / len(xs) * 8 / (self.p.nic(x).up_mbps * 1e6))
        for y in ys:
            worst_t = max(worst_t, nbytes / len(ys) * 8 / (self.p.nic(y).down_mbps * 1e6))
        return worst_t, worst_l

    def next_sets(self, used: int):
        free = [i for i in range(len(self.devs)) if not used >> i & 1]
        sizes = range(1, len(free) + 1) if self.rep else [1]
        for k in sizes:
            for combo in itertools.combinations(free, k):
                yield sum(1 << i for i in combo)

    def _bottleneck(self, u: int, used: int, last: int) -> float:
        if u == self.L:
            return self.link(last, 0, self.p.units[-1].out_bytes)[0]
        best = math.inf
        for s in self.next_sets(used):
            lk = self.link(last, s, self.cut_bytes(u))[0]
            for b in range(u + 1, self.L + 1):
                st = self.stage(s, u, b)
                if st is not None:
                    best = min(best, max(lk, st[0], self.bottleneck(b, used | s, s)))
        return best

    def _latency(self, u: int, used: int, last: int, bound: float) -> tuple[float, tuple]:
        """Least latency to finish with every cost <= bound, and the stages that do it."""
        if u == self.L:
            t, lat = self.link(last, 0, self.p.units[-1].out_bytes)
            return (lat, ()) if t <= bound else (math.inf, ())
        best: tuple[float, tuple] = (math.inf, ())
        for s in self.next_sets(used):
            lt, ll = self.link(last, s, self.cut_bytes(u))
            if lt > bound:
                continue
            for b in range(u + 1, self.L + 1):
                st = self.stage(s, u, b)
                if st is None or st[0] > bound:
                    continue
                rest, stages = self.latency(b, used | s, s, bound)
                total = ll + st[1] + rest
                if total < best[0]:
                    best = (total, (((u, b), tuple(self.names(s))), *stages))
        return best

    def solve(self) -> tuple[float, float, list] | None:
        b = self.bottleneck(0, 0, 0)
        if math.isinf(b):
            return None
        lat, stages = self.latency(0, 0, 0, b * (1 + RTOL))
        return b, lat, list(stages)


def enumerate_all(problem: Problem) -> tuple[float, float] | None:
    """Plain enumeration of every plan (tiny problems only), via evaluate."""
    names = [d.name for d in problem.devices]
    n_units = problem.num_units
    sizes = range(1, len(names) + 1) if problem.options.replication else [1]
    best = None

    def sequences(avail: list[str], k: int):
        if k == 0:
            yield []
            return
        for size in sizes:
            for sub in itertools.combinations(avail, size):
                rest = [x for x in avail if x not in sub]
                for tail in sequences(rest, k - 1):
                    yield [sub, *tail]

    for k in range(1, min(len(names), n_units) + 1):
        for cuts in itertools.combinations(range(1, n_units), k - 1):
            edges = [0, *cuts, n_units]
            for seq in sequences(names, k):
                plan = evaluate(problem, [((edges[i], edges[i + 1]), seq[i]) for i in range(k)])
                if plan.feasible:
                    key = (plan.bottleneck_s, plan.latency_s)
                    best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(12))
def test_brute_force_matches_enumeration(seed):
    problem = Problem.from_dict(random_problem(1000 + seed, max_devices=4, max_units=5))
    bf = BruteForce(problem).solve()
    en = enumerate_all(problem)
    assert (bf is None) == (en is None)
    if bf is not None:
        assert math.isclose(bf[0], en[0], rel_tol=RTOL)
        assert math.isclose(bf[1], en[1], rel_tol=RTOL)
        # the brute force's own plan, priced by the product's cost model, agrees with it
        plan = evaluate(problem, bf[2])
        assert plan.feasible
        assert math.isclose(plan.bottleneck_s, bf[0], rel_tol=RTOL)
        assert math.isclose(plan.latency_s, bf[1], rel_tol=RTOL)


def assert_optimal_as_brute_force(plan, expected) -> None:
    """The solver's plan is proven optimal and has the brute force's bottleneck and latency."""
    assert plan.optimal
    assert math.isclose(plan.bottleneck_s, expected[0], rel_tol=RTOL), (plan.bottleneck_s, expected[0])
    assert math.isclose(plan.latency_s, expected[1], rel_tol=RTOL), (plan.latency_s, expected[1])


def assert_exact_or_refused(problem: Problem):
    """solve (no clock) against the brute force: when no plan fits, a refusal naming memory;
    else a feasible plan, proven optimal, with the brute force's bottleneck and latency and a
    lower bound at that bottleneck. The plan (None when refused)."""
    expected = BruteForce(problem).solve()
    if expected is None:
        with pytest.raises(ValueError, match="memory|needs|fit"):
            solve(problem, time_limit_s=NO_CLOCK)
        return None
    plan = solve(problem, time_limit_s=NO_CLOCK)
    assert plan.feasible
    assert_optimal_as_brute_force(plan, expected)
    assert plan.lower_bound_s == pytest.approx(expected[0], rel=RTOL)
    return plan


@pytest.mark.parametrize("seed", SEEDS)
def test_solve_is_exact(seed):
    assert_exact_or_refused(Problem.from_dict(random_problem(seed)))


@pytest.mark.parametrize("seed", range(60))
def test_solve_is_exact_with_caches(seed):
    """Units that keep state (a decoder layer's KV caches: `cache_bytes`) take memory beside
    their parameters in every stage holding them, as the brute force's definition counts it."""
    d = random_problem(3000 + seed)
    rng = random.Random(seed)
    for u in d["model"]["units"]:
        u["cache_bytes"] = rng.randint(0, 30)
    problem = Problem.from_dict(d)
    assert [u.resident_bytes for u in problem.units] == [u["param_bytes"] + u["cache_bytes"] for u in d["model"]["units"]]
    plan = assert_exact_or_refused(problem)
    for st in plan.stages if plan is not None else []:  # every stage holds its units' caches
        need = stage_memory_bytes(problem, *st.units)
        assert all(need + dev.reserved_bytes <= dev.memory_bytes for dev in problem.devices if dev.name in st.devices)


@pytest.mark.parametrize("seed", range(30))
def test_solve_is_exact_on_tiny_problems(seed):
    """1-3 units on 1-3 devices: the edges (one unit, one device, everything replicated)."""
    problem = Problem.from_dict(random_problem(2000 + seed, max_devices=3, max_units=3))
    expected = BruteForce(problem).solve()
    if expected is None:
        with pytest.raises(ValueError):
            solve(problem)
        return
    assert_optimal_as_brute_force(solve(problem), expected)


def assert_solves_as_brute_force(problem: Problem, time_limit_s: float = 30) -> None:
    """solve's plan has the brute force's bottleneck and latency (nothing to check when no plan fits)."""
    expected = BruteForce(problem).solve()
    if expected is None:
        return
    assert_optimal_as_brute_force(solve(problem, time_limit_s=time_limit_s), expected)


@pytest.mark.parametrize("seed", range(40))
def test_solve_is_exact_with_big_classes(seed):
    """Type-level links only: classes of several devices, stages mixing them (deferred splits)."""
    d = random_problem(3000 + seed, pair_overrides=False)
    d["options"]["replication"] = True
    problem = Problem.from_dict(d)
    assert_solves_as_brute_force(problem)


@pytest.mark.parametrize("seed", range(40))
def test_solve_is_exact_with_dominance(seed):
    """Types ordered by speed, memory and links: the dominance restriction loses nothing."""
    problem = Problem.from_dict(dominance_problem(seed))
    assert_solves_as_brute_force(problem)


@pytest.mark.parametrize("seed", range(8))
def test_replication_flag_changes_only_the_space(seed):
    """Solving with replication forced on or off still matches brute force for that option."""
    d = random_problem(500 + seed, max_devices=5, max_units=8)
    for rep in (False, True):
        d["options"]["replication"] = rep
        problem = Problem.from_dict(d)
        expected = BruteForce(problem).solve()
        if expected is None:
            continue
        plan = solve(problem, time_limit_s=NO_CLOCK)
        assert math.isclose(plan.bottleneck_s, expected[0], rel_tol=RTOL)
        assert all(len(s.devices) == 1 for s in plan.stages) or rep


# --- a NIC per device (issue 12) ------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_brute_force_matches_enumeration_with_nics(seed):
    """The brute force's NIC terms agree with evaluate's, on every plan of tiny problems."""
    d = with_nics(random_problem(4000 + seed, max_devices=4, max_units=5), seed)
    d["options"]["replication"] = True
    problem = Problem.from_dict(d)
    bf, en = BruteForce(problem).solve(), enumerate_all(problem)
    assert (bf is None) == (en is None)
    if bf is not None:
        assert math.isclose(bf[0], en[0], rel_tol=RTOL) and math.isclose(bf[1], en[1], rel_tol=RTOL)
        plan = evaluate(problem, bf[2])
        assert math.isclose(plan.bottleneck_s, bf[0], rel_tol=RTOL)
        assert math.isclose(plan.latency_s, bf[1], rel_tol=RTOL)


@pytest.mark.parametrize("seed", range(120))
def test_solve_is_exact_with_nics(seed):
    """NIC limits on types, devices and the client, with replication, memory and pair
    overrides: the solver's fold of the NIC terms into each device's stage cost is exact."""
    problem = Problem.from_dict(with_nics(random_problem(5000 + seed), seed))
    assert_solves_as_brute_force(problem)


@pytest.mark.parametrize("seed", range(40))
def test_solve_is_exact_with_nics_and_big_classes(seed):
    """Type-level links and NICs: big classes, mixed stages whose NICs differ per class."""
    d = with_nics(random_problem(6000 + seed, pair_overrides=False), seed, per_device=False)
    d["options"]["replication"] = True
    problem = Problem.from_dict(d)
    assert_solves_as_brute_force(problem)


@pytest.mark.parametrize("seed", range(30))
def test_solve_is_exact_with_nics_and_dominance(seed):
    """Dominance chains of board types whose NICs are drawn at random, the best board's among
    the slowest: a board better in times, memory and links is then not better in all (seed
    14 loses the optimum if the dominance rule ignores NICs)."""
    d = dominance_problem(7000 + seed)
    rng = random.Random(seed)
    for t, name in enumerate(sorted(d["device_types"])):
        d["device_types"][name]["nic_mbps"] = rng.choice(NIC_RATES[:3] if t == 0 else NIC_RATES)
    problem = Problem.from_dict(d)
    assert_solves_as_brute_force(problem)


# --- every device different: the device search (issue 14) ------------------------------------------

def distinct_problem(seed: int, *, max_devices: int = 5, max_units: int = 8) -> dict:
    """Every device its own type: random times (one of two board profiles over a speed
    factor), memory and NIC per device, per-pair links, client links and a client NIC;
    replication on or off."""
    d = random_problem(8000 + seed, max_devices=max_devices, max_units=max_units)
    rng = random.Random(9000 + seed)
    n_units = len(d["model"]["units"])
    boards = [[round(rng.uniform(0.05, 2.0), 3) for _ in range(n_units)] for _ in range(2)]
    total = sum(u["param_bytes"] for u in d["model"]["units"])
    types = {}
    for dev in d["devices"]:
        speed = rng.choice([0.5, 0.8, 1.0, 1.3, 2.0])
        t = {"memory_bytes": IO_ROOM + rng.randint(total // 4, total + 60), "reserved_bytes": rng.choice([0, 25]),
             "unit_times_s": [round(x / speed, 4) for x in rng.choice(boards)]}
        if rng.random() < 0.6:
            t["nic_mbps"] = rng.choice(NIC_RATES)
        types[dev["name"]] = t
        dev.clear()
        dev.update({"name": f"d{len(types) - 1}", "type": f"d{len(types) - 1}"})
    d["device_types"] = {f"d{i}": t for i, t in enumerate(types.values())}
    d["links"]["overrides"] = [o for o in d["links"]["overrides"] if o["a"] not in ("t0", "t1", "t2")]
    if rng.random() < 0.5:
        d["client"] = {"nic_mbps": rng.choice(NIC_RATES)}
    return d


def assert_device_search_is_exact(problem: Problem) -> None:
    """The device search's plan has the brute force's bottleneck, proven (it has no latency
    search of its own: its latency is at least the optimum's)."""
    expected = BruteForce(problem).solve()
    if expected is None:
        with pytest.raises(ValueError):
            solve(problem, engine="devices")
        return
    plan = solve(problem, engine="devices")
    assert plan.feasible and plan.optimal and plan.stats["stopped_by"] == "proven"
    assert math.isclose(plan.bottleneck_s, expected[0], rel_tol=RTOL), (plan.bottleneck_s, expected[0])
    assert plan.latency_s >= expected[1] * (1 - RTOL)


@pytest.mark.parametrize("seed", range(120))
def test_device_search_is_exact_on_distinct_devices(seed):
    """All-different devices (speeds, memory, NICs, per-pair and client links, replication
    on or off): bisection with the exact decision search finds the brute force's B."""
    assert_device_search_is_exact(Problem.from_dict(distinct_problem(seed)))


@pytest.mark.parametrize("seed", range(40))
def test_device_search_is_exact_with_twins_and_nics(seed):
    """Devices of a few types (twins: B-dominance ties broken by index) with NICs."""
    assert_device_search_is_exact(Problem.from_dict(with_nics(random_problem(8500 + seed), seed)))


@pytest.mark.parametrize("seed", range(20))
def test_device_search_is_exact_with_dominance(seed):
    """Dominance chains of board types: the closed-stage rule loses nothing."""
    assert_device_search_is_exact(Problem.from_dict(dominance_problem(8700 + seed)))


@pytest.mark.parametrize("seed", range(20))
def test_device_search_is_exact_with_replication_forced(seed):
    """Replication on, every device different, tiny: mixed stages of every size."""
    d = distinct_problem(300 + seed, max_devices=4, max_units=6)
    d["options"]["replication"] = True
    assert_device_search_is_exact(Problem.from_dict(d))


def replicated_problem(seed: int, replication: bool = True) -> dict:
    """Replication on, every device different, slow NICs on most devices (stages need
    replicas for them) and slow pairs: the capacity bound's stage sizes (window_m) and the
    failure memo's loose last stages matter here."""
    d = distinct_problem(600 + seed, max_devices=6, max_units=7)
    rng = random.Random(9600 + seed)
    d["options"]["replication"] = replication
    for t in d["device_types"].values():
        if rng.random() < 0.8:
            t["nic_mbps"] = rng.choice(NIC_RATES[:3])
    names = [dev["name"] for dev in d["devices"]]
    taken = {frozenset((o["a"], o["b"])) for o in d["links"]["overrides"]}
    for _ in range(rng.randint(1, 3)):
        a, b = rng.sample(names, 2)
        if frozenset((a, b)) not in taken:
            taken.add(frozenset((a, b)))
            d["links"]["overrides"].append({"a": a, "b": b, "mbps": rng.choice([0.05, 0.1, 0.3]), "latency_ms": 1})
    return d


@pytest.mark.parametrize("seed", range(40))
def test_device_search_is_exact_with_replica_windows(seed):
    """Replicated stages forced by NICs, slow pairs: the capacity bound counting a stage's
    size as at least window_m, and failures shared by loose last stages, lose nothing."""
    assert_device_search_is_exact(Problem.from_dict(replicated_problem(seed)))


@pytest.mark.parametrize("seed", range(80))
def test_device_search_is_exact_with_slow_pairs(seed):
    """As above without replication: many states at one cut differ only in their last
    stage, so sharing failures between loose last stages is exercised."""
    assert_device_search_is_exact(Problem.from_dict(replicated_problem(100 + seed, replication=False)))


@pytest.mark.parametrize("seed", range(40))
def test_replicated_greedy_meets_its_bound(seed):
    """greedy_replicated's plans cost at most the bound they were built for (priced by
    ``evaluate``) and fit memory; it is no decision procedure, so None is not checked."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.parametric import GREEDY_RULES, Tables, greedy_replicated
    from edgezmq.planner.plan import Stage

    problem = Problem.from_dict(replicated_problem(seed))
    tables = Tables(device_arrays(problem))
    names = [dev.name for dev in problem.devices]
    best = solve(problem, engine="devices").bottleneck_s
    for factor, rule in itertools.product((1.0, 1.1, 1.5, 3.0), GREEDY_RULES):
        steps = greedy_replicated(tables, best * factor, rule)
        if steps is None:
            continue
        plan = evaluate(problem, [Stage((a, b), tuple(names[x] for x in devs)) for a, b, devs in steps])
        assert not plan.violations
        assert plan.bottleneck_s <= best * factor * (1 + RTOL), (plan.bottleneck_s, best * factor)


def _decide(tables, bound: float, prices=(), hint=None, memo=None) -> bool:
    from edgezmq.planner.parametric import Level
    from edgezmq.planner.search import Effort

    return Level(tables, bound, prices=prices, hint=hint).search(Effort(), memo=memo) is not None


@pytest.mark.parametrize("seed", range(40))
def test_prices_never_change_the_decision(seed):
    """The price bound (lagrange.py) holds for *any* prices mu >= 0: D(B) with random
    prices (and with the LP's) pruning and ordering its states answers as D(B) without,
    at B on both sides of the brute force's optimum."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.lagrange import farkas_prices
    from edgezmq.planner.parametric import Level, Tables
    from edgezmq.planner.search import Effort

    problem = Problem.from_dict(replicated_problem(200 + seed, replication=seed % 4 != 0))
    expected = BruteForce(problem).solve()
    if expected is None:
        return
    tables = Tables(device_arrays(problem))
    rng = np.random.default_rng(seed)
    for factor in (0.9, 0.99, 1.0 + 1e-6, 1.05):
        bound = expected[0] * factor
        truth = bound >= expected[0] * (1 - RTOL)
        assert _decide(tables, bound) == truth
        _, lp, _ = farkas_prices(Level(tables, bound * 0.97).stages, Effort())
        for prices in ([rng.random(tables.N)], [rng.integers(0, 3, tables.N).astype(float)], [lp]):
            assert _decide(tables, bound, prices) == truth, (factor, prices)
        # the LP's solution as the search's first choices (solver's hint): order only
        primal: list = []
        farkas_prices(Level(tables, bound * 1.03).stages, Effort(), primal=primal)
        hint: dict = {}
        for (a, b, R), x in primal:
            hint[(a, b, R)] = hint.get((a, b, R), 0.0) + x
            hint[(a, b)] = hint.get((a, b), 0.0) + x
        assert _decide(tables, bound, [lp], hint) == truth, factor


@pytest.mark.parametrize("seed", range(40))
def test_failures_carry_to_lower_bounds(seed):
    """The failed states of an exact decision search at B (``memo``), even one stopped by
    its effort limit, hold at every lower B: D(B') started from them answers as the brute
    force, for B' below and above the optimum (the solver's bisection reuses them)."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.parametric import Level, Tables
    from edgezmq.planner.search import Effort, Timeout

    problem = Problem.from_dict(replicated_problem(400 + seed, replication=seed % 4 != 0))
    expected = BruteForce(problem).solve()
    if expected is None:
        return
    tables = Tables(device_arrays(problem))
    for top, stop in ((1.5, None), (1.05, 5), (1.0 + 1e-6, None), (0.995, 40)):
        memo: dict = {}
        try:
            Level(tables, expected[0] * top).search(Effort(stop=math.inf if stop is None else stop), memo=memo)
        except Timeout:
            pass
        for factor in (0.9, 0.99, 1.0 + 1e-6, 1.05):
            if factor <= top:
                truth = factor >= 1.0
                assert _decide(tables, expected[0] * factor, memo={k: list(v) for k, v in memo.items()}) == truth, (
                    top, factor)


@pytest.mark.parametrize("seed", range(20))
def test_lp_primal_is_a_fractional_plan(seed):
    """Where the configuration LP is feasible, its solution (``primal``) is a fractional path
    of stages from cut 0 to L, each stage feasible at B, each device used at most once in
    sum (the solver bounds the LP's bisection by its stages' largest cost)."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.lagrange import farkas_prices
    from edgezmq.planner.parametric import Level, Tables
    from edgezmq.planner.search import Effort

    problem = Problem.from_dict(replicated_problem(500 + seed))
    expected = BruteForce(problem).solve()
    if expected is None:
        return
    tables = Tables(device_arrays(problem))
    level = Level(tables, expected[0] * 1.1)
    primal: list = []
    overuse, _, _ = farkas_prices(level.stages, Effort(), primal=primal)
    assert overuse <= 1e-9
    flow = np.zeros(tables.L + 1)
    use = np.zeros(tables.N)
    for (a, b, R), x in primal:
        assert len(R) >= level.window_m[a, b] and all(level.M[d, a, b] <= len(R) for d in R)
        assert max(tables.eff[d, a, b] for d in R) / len(R) <= level.B
        flow[a] += x
        flow[b] -= x
        use[list(R)] += x
    assert flow[0] == pytest.approx(1.0) and flow[-1] == pytest.approx(-1.0)
    assert np.allclose(flow[1:-1], 0.0, atol=1e-9)
    assert (use <= 1 + 1e-9).all()


@pytest.mark.parametrize("seed", range(40))
def test_lp_prices_certify_only_below_the_optimum(seed):
    """The configuration LP's prices prove D(B) infeasible only below the brute force's
    optimum (never at or above it), and they do prove it well below on some problems."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.lagrange import certifies, farkas_prices
    from edgezmq.planner.parametric import Level, Tables
    from edgezmq.planner.search import Effort

    problem = Problem.from_dict(replicated_problem(300 + seed))
    expected = BruteForce(problem).solve()
    if expected is None:
        return
    tables = Tables(device_arrays(problem))
    for factor in (0.5, 0.8, 0.95, 1.0 + 1e-6, 1.2):
        st = Level(tables, expected[0] * factor).stages
        overuse, mu, _ = farkas_prices(st, Effort())
        if factor >= 1.0:
            assert not certifies(st, mu)
            assert overuse <= 1e-6
        elif certifies(st, mu):
            CERTIFIED.add(seed)


CERTIFIED: set[int] = set()


def test_lp_prices_certify_somewhere():
    """Run after the above: the prices are not vacuous (they certify on many problems)."""
    if not CERTIFIED:
        for seed in range(40):
            test_lp_prices_certify_only_below_the_optimum(seed)
    assert len(CERTIFIED) >= 10, CERTIFIED


# --- the device search's speed-ups change no answer (issue 14, round 3) -----------------------------

def _all_size_prices(st, mu):
    """Stages.prices by its definition: every size m from 1 to N tried (the reference)."""
    sizes = st.sizes
    ms = np.arange(1, sizes + 1)[:, None]
    cnt = np.zeros((sizes, st.a.size), dtype=np.int64)
    tot = np.zeros((sizes, st.a.size))
    for d in np.argsort(mu, kind="stable").tolist():
        take = (st.M[d][None, :] <= ms) & (cnt < ms)
        cnt += take
        tot += take * float(mu[d])
    tot = np.where((cnt == ms) & (ms >= st.window[None, :]), tot, np.inf)
    best = np.argmin(tot, axis=0)
    cost = tot[best, np.arange(st.a.size)]
    return cost, np.where(np.isfinite(cost), best + 1, 0)


@pytest.mark.parametrize("seed", range(20))
def test_prices_on_useful_sizes_match_all_sizes(seed, monkeypatch):
    """Stages.prices tries only the sizes from a stage's window to its largest replica need:
    the same least price and size as trying every size, for random, integer, tied and zero
    prices, at bounds where stages need from one to many replicas; with its table of replica
    needs per (stage, size) pair, and without (large problems gather them per call)."""
    from edgezmq.planner import lagrange
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.parametric import Tables, stages_at

    problem = Problem.from_dict(replicated_problem(700 + seed))
    tables = Tables(device_arrays(problem))
    rng = np.random.default_rng(seed)
    big = float(np.nanmax(np.where(np.isfinite(tables.eff), tables.eff, np.nan)))
    for bound in (big * 0.05, big * 0.2, big * 0.5, big * 1.01):
        st = stages_at(tables, bound)
        monkeypatch.setattr(lagrange, "MAX_PAIR_TABLE", 0)
        bare = stages_at(tables, bound)
        monkeypatch.undo()
        assert st.Mq is not None and (bare.Mq is None or not bare.pair_k.size)
        for mu in (rng.random(tables.N), rng.integers(0, 3, tables.N).astype(float), np.zeros(tables.N),
                   np.full(tables.N, 0.5)):
            ref_cost, ref_size = _all_size_prices(st, mu)
            for stages in (st, bare):
                cost, size = stages.prices(mu)
                assert np.array_equal(cost, ref_cost) and np.array_equal(size, ref_size), bound


@pytest.mark.parametrize("seed", range(20))
def test_stages_at_is_the_levels_stages(seed):
    """stages_at (the LP's bisection: no bounds built) gives the level's stages exactly."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.parametric import Level, Tables, stages_at

    problem = Problem.from_dict(replicated_problem(720 + seed, replication=seed % 3 != 0))
    tables = Tables(device_arrays(problem))
    best = solve(problem, engine="devices").bottleneck_s
    for factor in (0.3, 0.9, 1.0, 2.0):
        a, b = Level(tables, best * factor).stages, stages_at(tables, best * factor)
        for name in ("a", "b", "M", "window", "pair_k", "pair_m", "Mq"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_min_replicas_is_the_least_count():
    """_min_replicas: the least m in [1, top) with eff / m <= B by the float comparison the
    checks use, top when there is none or eff is inf (ceil of a float quotient can be one
    off: it is settled exactly)."""
    from edgezmq.planner.parametric import _min_replicas

    rng = np.random.default_rng(5)
    top = 6
    for _ in range(200):
        eff = rng.random((3, 12)) * rng.choice([1e-3, 1.0, 10.0])
        eff[rng.random(eff.shape) < 0.2] = np.inf
        eff[rng.random(eff.shape) < 0.1] = 0.0
        for bound in (eff[0, 0] / 3 if np.isfinite(eff[0, 0]) else 0.7, 0.1, 1.0, 3.3):
            got = _min_replicas(eff, bound, top)
            for e, m in zip(eff.ravel().tolist(), got.ravel().tolist()):
                want = next((k for k in range(1, top) if e / k <= bound), top) if math.isfinite(e) else top
                assert m == want, (e, bound, m, want)


@pytest.mark.parametrize("seed", range(30))
def test_closed_sets_caps_drop_only_sets_above_them(seed):
    """closed_sets with caps (the search's waste and reduced-price tests moved into the
    enumeration) returns exactly the sets of the uncapped enumeration whose weights stay
    within every cap (up to its rounding margin), in the same order."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.parametric import Level, Tables

    problem = Problem.from_dict(replicated_problem(740 + seed))
    tables = Tables(device_arrays(problem))
    best = solve(problem, engine="devices").bottleneck_s
    rng = np.random.default_rng(seed)
    level = Level(tables, best * rng.choice([0.7, 1.0, 1.3]))
    level._dominance()
    n = tables.N
    for _ in range(20):
        elig = sorted(rng.choice(n, size=rng.integers(1, n + 1), replace=False).tolist())
        m = int(rng.integers(1, len(elig) + 1))
        w1, w2 = rng.random(n).tolist(), rng.integers(0, 3, n).astype(float).tolist()
        full = level.closed_sets(elig, m, 1)
        sums = [(sum(w1[d] for d in R), sum(w2[d] for d in R)) for R in full]
        if not full:
            continue
        cap1 = float(np.quantile([s for s, _ in sums], rng.random()))
        cap2 = float(np.quantile([s for _, s in sums], rng.random()))
        got = level.closed_sets(elig, m, 1, ((w1, cap1), (w2, cap2)))
        want = [R for R, (s1, s2) in zip(full, sums) if s1 <= cap1 and s2 <= cap2]
        assert [R for R in got if R in want] == want            # none within the caps is lost
        assert all(R in full for R in got)                       # only closed sets, in order
        for R in got:                                            # the rest only by the margin
            s1, s2 = sums[full.index(R)]
            assert s1 <= cap1 + 1e-6 and s2 <= cap2 + 1e-6
        assert got == [R for R in full if R in got]


@pytest.mark.parametrize("seed", range(30))
def test_warm_started_lp_certifies_only_below_the_optimum(seed):
    """farkas_prices started from the previous solve's basis (``warm``), over bounds up and
    down as the solver's bisection goes: its prices certify only below the brute force's
    optimum, it is feasible (no overuse) at and above it, and its solution there is a
    fractional plan of stages feasible at that bound (columns of an earlier bound that are
    infeasible here never appear in it)."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.lagrange import Basis, certifies, farkas_prices
    from edgezmq.planner.parametric import Level, Tables
    from edgezmq.planner.search import Effort

    problem = Problem.from_dict(replicated_problem(300 + seed))
    expected = BruteForce(problem).solve()
    if expected is None:
        return
    tables = Tables(device_arrays(problem))
    warm = Basis()
    pool: list = []
    for factor in (0.8, 1.2, 0.95, 1.0 + 1e-6, 0.5, 1.05, 0.99, 1.5):
        level = Level(tables, expected[0] * factor)
        st = level.stages
        primal: list = []
        overuse, mu, pool = farkas_prices(st, Effort(), pool, primal=primal, warm=warm)
        if factor >= 1.0:
            assert not certifies(st, mu)
            assert overuse <= 1e-6, factor
            flow = np.zeros(tables.L + 1)
            for (a, b, R), x in primal:
                assert len(R) >= level.window_m[a, b] and all(level.M[d, a, b] <= len(R) for d in R)
                flow[a] += x
                flow[b] -= x
            assert flow[0] == pytest.approx(1.0) and np.allclose(flow[1:-1], 0.0, atol=1e-9)
        elif certifies(st, mu):
            WARM_CERTIFIED.add(seed)
    for a, b, R in pool:
        assert len(R) >= level.window_m[a, b] and all(level.M[d, a, b] <= len(R) for d in R)


WARM_CERTIFIED: set[int] = set()


def test_warm_started_lp_certifies_somewhere():
    """Run after the above: warm-started prices certify on many problems too."""
    if not WARM_CERTIFIED:
        for seed in range(30):
            test_warm_started_lp_certifies_only_below_the_optimum(seed)
    assert len(WARM_CERTIFIED) >= 8, WARM_CERTIFIED


@pytest.mark.parametrize("seed", range(30))
def test_ascent_prices_certify_only_below_the_optimum(seed):
    """ascend (subgradient steps on SP_mu(0) - mu(all), from any prices) returns prices
    only when they certify, so only below the brute force's optimum; from the master's
    duals of a few pricing rounds it certifies on some problems. ``usage`` is a cheapest
    path's device counts: its price at mu is SP_mu(0)."""
    from edgezmq.planner.classes import device_arrays
    from edgezmq.planner.lagrange import ascend, certifies, farkas_prices
    from edgezmq.planner.parametric import Tables, stages_at
    from edgezmq.planner.search import Effort

    problem = Problem.from_dict(replicated_problem(300 + seed))
    expected = BruteForce(problem).solve()
    if expected is None:
        return
    tables = Tables(device_arrays(problem))
    rng = np.random.default_rng(seed)
    for factor in (0.5, 0.8, 0.95, 1.0 + 1e-6, 1.2):
        st = stages_at(tables, expected[0] * factor)
        overuse, lp, _ = farkas_prices(st, Effort(), max_rounds=2)
        for mu in (lp, rng.random(tables.N), np.full(tables.N, 0.5)):
            cost, size = st.prices(mu)
            sp = st.path(cost)
            if np.isfinite(sp[0]):
                assert float(st.usage(mu, cost, size, sp) @ mu) == pytest.approx(sp[0])
            got = ascend(st, mu, max(overuse, 1.0), Effort())
            if got is not None:
                assert certifies(st, got) and factor < 1.0
                ASCENDED.add(seed)


ASCENDED: set[int] = set()


def test_ascent_certifies_somewhere():
    """Run after the above: the ascent is not vacuous."""
    if not ASCENDED:
        for seed in range(30):
            test_ascent_prices_certify_only_below_the_optimum(seed)
    assert len(ASCENDED) >= 5, ASCENDED


@pytest.mark.parametrize("seed", range(20))
def test_device_search_is_exact_with_early_ascent(seed, monkeypatch):
    """The solver with the ascent tried from the first pricing round on (the default waits
    for 30 rounds, which these small LPs never reach), so that its prices, the stretch it
    drives and the searches they prune run on every solve: still the brute force's B."""
    from edgezmq.planner import lagrange

    monkeypatch.setattr(lagrange, "ASCENT_START", 1)
    monkeypatch.setattr(lagrange, "ASCENT_EVERY", 1)
    assert_device_search_is_exact(Problem.from_dict(replicated_problem(seed)))
