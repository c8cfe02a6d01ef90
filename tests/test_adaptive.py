"""node/adaptive.py: the link policy's switch points on fed sequences of send times and paces (no sockets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgezmq.node.adaptive import LinkPolicy, Thresholds

PACE = 0.1  # s per microbatch: the stage's own compute + input wait
BYTES = [1000, 520, 270]  # a message at each rung (f16, int8, int4 of one activation)
IDLE_SEND = 1e-4  # a send that did not block: the link had room


def link(rate: float):
    """A link of ``rate`` bytes/s fed one message per PACE: a send blocks for the message's time on
    the wire only when the link cannot keep up (ZeroMQ queues the rest)."""
    def send(nbytes: int) -> float:
        t = nbytes / rate
        return t if t > PACE else IDLE_SEND
    return send


def run(policy: LinkPolicy, phases) -> list[int]:
    """Feed (microbatches, send model) phases; returns the rung each message went out on."""
    levels = []
    for n, send in phases:
        for _ in range(n):
            policy.observe_pace(PACE)
            levels.append(policy.level)
            b = BYTES[policy.level]
            policy.observe_send(b, send(b))
    return levels


def switches(p: LinkPolicy):
    return [(s.index, s.old, s.new, s.why) for s in p.switches]


def test_steps_down_when_the_link_slows_and_back_up_when_it_returns():
    p = LinkPolicy(3)
    levels = run(p, [(50, link(1e5)), (50, link(5e3)), (100, link(1e5))])
    # at 5 kB/s f16 needs 0.2 s > 1.25 x 0.1: the 3rd slow send lifts the smoothed time over the
    # threshold (EWMA 0.3); int8 needs 0.104 s: under 1.25 x pace, it stays there (no flapping);
    # the link returns at 100: once the smoothed send time is < 0.5 x pace (the 3rd fast send), with
    # 32+ microbatches on int8, it probes f16 and keeps it
    assert switches(p) == [(53, 0, 1, "down"), (103, 1, 0, "probe")]
    assert levels[:53] == [0] * 53 and set(levels[53:103]) == {1} and set(levels[103:]) == {0}
    assert p.switch_count == 2


def test_two_steps_down_for_a_link_that_cannot_carry_int8_either():
    p = LinkPolicy(3)
    run(p, [(20, link(1e5)), (60, link(3e3))])
    # f16 0.33 s, int8 0.17 s (> 0.125 after the dwell of 8): down twice; int4 (0.09 s) leaves the
    # link room, so 32 microbatches later int8 is probed, and given up again after the dwell
    assert switches(p) == [(22, 0, 1, "down"), (30, 1, 2, "down"), (62, 2, 1, "probe"), (70, 1, 2, "fail")]
    assert p.level == 2


def test_a_failed_probe_backs_off_exponentially():
    # 6 kB/s: f16 (0.167 s) is too slow, int8 (0.087 s) fits with room, which the sender cannot
    # measure: it probes f16, sees the link saturate within the dwell and steps back, with the
    # probe interval doubling (32, 64, 128 microbatches) instead of flapping
    p = LinkPolicy(3)
    run(p, [(20, link(1e5)), (400, link(6e3))])
    assert switches(p) == [(24, 0, 1, "down"), (56, 1, 0, "probe"), (64, 0, 1, "fail"),
                           (128, 1, 0, "probe"), (136, 0, 1, "fail"), (264, 1, 0, "probe"),
                           (272, 0, 1, "fail")]
    gaps = [b[0] - a[0] for a, b in zip(switches(p)[2::2], switches(p)[3::2])]
    assert gaps == [64, 128]


def test_backpressure_from_a_slower_stage_downstream_is_not_blamed_on_the_link():
    # every send takes 0.3 s whatever its size: the next stage is slower than this one
    p = LinkPolicy(3)
    levels = run(p, [(300, lambda nbytes: 0.3)])
    assert switches(p) == [(8, 0, 1, "down"), (16, 1, 0, "undo"), (48, 0, 1, "down"), (56, 1, 0, "undo"),
                           (120, 0, 1, "down"), (128, 1, 0, "undo"), (256, 0, 1, "down"), (264, 1, 0, "undo")]
    assert levels.count(0) > 0.85 * len(levels)  # mostly at the largest rung: compressing bought nothing


def test_a_link_that_slows_again_while_a_step_down_is_judged_is_not_undone():
    # the step down to int8 (at 6 kB/s) is judged 8 sends later, when the link has dropped 4x more:
    # int8 then takes longer than f16 did (0.35 s vs 0.17 s); a slower stage downstream cannot do
    # that (fewer bytes, same pace), the link did, so the step stands and the next one follows;
    # undoing it would hold f16 for 32 microbatches on a link that carries int4 at best
    p = LinkPolicy(3)
    levels = run(p, [(20, link(1e5)), (4, link(6e3)), (60, link(1.5e3))])
    assert switches(p) == [(24, 0, 1, "down"), (32, 1, 2, "down")]
    assert set(levels[32:]) == {2}


def test_one_rung_never_switches_and_a_fast_link_stays_exact():
    p = LinkPolicy(1)
    run(p, [(100, link(10.0))])
    assert p.level == 0 and p.switches == []
    p = LinkPolicy(3)
    run(p, [(200, link(1e6))])
    assert p.level == 0 and p.switches == []
    assert p.goodput is not None and p.pace == pytest.approx(PACE)


def test_an_idle_gap_does_not_count_as_a_slow_stage():
    p = LinkPolicy(2)
    for _ in range(20):
        p.observe_pace(PACE)
    p.observe_pace(600.0)  # ten minutes without input
    assert p.pace is not None and p.pace <= PACE * 2


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="up < 1 < down"):
        Thresholds(down=0.9)
    with pytest.raises(ValueError, match="settle < dwell"):
        Thresholds(settle=8, dwell=8)
    with pytest.raises(ValueError, match="rungs"):
        LinkPolicy(0)


def test_docs_state_the_thresholds_in_force():
    """docs/compression.md's rules table quotes the defaults: it must change with them."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "compression.md").read_text()
    table = text[text.index("| rule | when | does |"):text.index("Why probe rather than predict")]
    th = Thresholds()
    quoted = {float(x) for x in re.findall(r"\*\*([0-9.]+)\*\*", table)}
    assert quoted == {th.down, th.up, th.pay, th.dwell, th.settle, th.probe, th.hold, th.max_backoff}
    assert f"α = {th.alpha}" in text and f"at most {th.pace_jump:g}×" in text
