"""``ready_line``: a target that accepts before its workers are ready is waited for until it says so."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from fdcluster_server.config import READY_TAG
from pytest_fdcluster.readiness import parse_ready_line
from pytest_fdcluster.target import TargetSpec, TargetStartupError, start_target

#: Serves ping at once, but announces readiness only once the test creates the go file.
LATE_ANNOUNCER = Path(__file__).resolve().parents[1] / "support" / "late_announcer.py"


def spec(tmp_path, ready_line, timeout=10.0):
    return TargetSpec([sys.executable, str(LATE_ANNOUNCER), "{port}", str(tmp_path / "go")], workers=0,
                      startup_timeout=timeout, ready_line=ready_line, grace=0)


def test_waits_for_the_line_when_asked(tmp_path):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("target", start_target(spec(tmp_path, True))))
    thread.start()
    try:
        thread.join(0.5)  # room for a wrong implementation to return on port and ping alone
        (tmp_path / "go").touch()
        thread.join(15)
        assert "target" in outcome, "start_target did not return after the readiness line"
        # The line is printed only after the go file exists: returning earlier leaves this None.
        assert outcome["target"].ready_info is not None
        assert outcome["target"].ready_info["port"] == outcome["target"].port
    finally:
        thread.join(15)
        if "target" in outcome:
            assert outcome["target"].stop().clean


def test_without_it_the_port_and_ping_suffice(tmp_path):
    target = start_target(spec(tmp_path, False))
    try:
        assert target.ready_info is None
    finally:
        assert target.stop().clean


def test_missing_line_is_named_in_the_timeout(tmp_path):
    with pytest.raises(TargetStartupError, match="no fdcluster-ready line on stdout"):
        start_target(spec(tmp_path, True, timeout=1.0))


@pytest.mark.parametrize(
    "line, expected",
    [
        (f'{READY_TAG} {{"port": 5000}}', {"port": 5000}),
        (f'{READY_TAG}   {{"port": 5000}}', {"port": 5000}),
        (f'{READY_TAG}{{"port": 5000}}', None),
        (f'{READY_TAG}-2 {{"port": 5000}}', None),
        (f'log: {READY_TAG} {{"port": 5000}}', None),
        (f"{READY_TAG} [5000]", None),
        (f"{READY_TAG} not json", None),
        (READY_TAG, None),
        ("", None),
    ],
)
def test_ready_line_is_the_server_tag_a_space_and_a_json_object(line, expected):
    assert parse_ready_line(line) == expected
