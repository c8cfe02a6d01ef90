"""plans/testbed-edgepipe*.yaml: derived from the boards' published figures and one measured
time of this machine, as plans/make_testbed_edgepipe.py says, and valid testbed files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from edgezmq.testbed.config import load_config

PLANS = Path(__file__).resolve().parent.parent / "plans"
FILES = ("testbed-edgepipe.yaml", "testbed-edgepipe-slowpairs.yaml")


def _maker():
    spec = importlib.util.spec_from_file_location("make_testbed_edgepipe", PLANS / "make_testbed_edgepipe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_files_are_what_the_derivation_writes(tmp_path):
    d = json.loads((PLANS / "testbed-edgepipe.derivation.json").read_text())
    assert _maker().main(["--emulated-seconds", repr(d["emulated_rcc_s"]), "--host-seconds",
                          repr(d["host_one_thread_s"]), "--microbatch", str(d["microbatch"]),
                          "--out", str(tmp_path)]) == 0
    for name in (*FILES, "testbed-edgepipe.derivation.json"):
        assert (tmp_path / name).read_text() == (PLANS / name).read_text(), f"{name}: rerun make_testbed_edgepipe.py"


def test_the_derivation_keeps_the_boards_ratios():
    m = _maker()
    boards = m.board_seconds()
    assert boards[m.RCC] == pytest.approx(35.84, abs=0.01) and boards[m.MINNOW] == pytest.approx(44.52, abs=0.01)
    d = m.derive(30.0, 1, boards, host_s=3.0)
    # CPU shares in the boards' speed ratio, within the budget
    assert d["cpu"][m.MINNOW] / d["cpu"][m.RCC] == pytest.approx(boards[m.RCC] / boards[m.MINNOW])
    assert d["cpu_sum"] == pytest.approx(m.CPU_BUDGET)
    # the emulated RCC-VE-like device x the factor = the board (per sample)
    assert 30.0 * d["time_factor"] * 8 == pytest.approx(boards[m.RCC])
    assert d["quota_slowdown"] == pytest.approx(30.0 * d["cpu"][m.RCC] / 3.0)
    # transfer / compute as on the boards: NIC rates scaled by the same factor
    assert d["nic_mbps"][m.RCC] == pytest.approx(30 * d["time_factor"])
    assert d["nic_mbps"][m.MINNOW] == pytest.approx(10 * d["time_factor"])
    # a twice-as-fast machine gets twice the factor (the emulation is closer to the boards)
    assert m.derive(15.0, 1, boards)["time_factor"] == pytest.approx(2 * d["time_factor"])


@pytest.mark.parametrize("name", FILES)
def test_the_files_are_valid_testbeds_of_16_boards(name):
    cfg = load_config(PLANS / name)
    assert len(cfg.devices) == 16
    assert sum(dev.cpu for dev in cfg.devices) <= 1.8 + 1e-9
