"""The supervisor files in deploy/: the systemd unit passes `systemd-analyze verify` and restarts
the server when it exits with an error (not after a clean stop). The container's HEALTHCHECK is
run against a live server in tests/server/test_openai_server.py."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).parent.parent / "deploy"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(DEPLOY / "tokenmill.service")
    return parser


def test_the_systemd_unit_restarts_on_failure_and_drains_on_stop():
    service = unit()["Service"]
    assert service["ExecStart"].split()[1:3] == ["serve", "--host"]
    assert service["Restart"] == "on-failure"  # an engine declared dead exits non-zero
    assert service["KillSignal"] == "SIGTERM"  # the drain path
    assert int(service["TimeoutStopSec"]) > 30  # longer than the default --drain-timeout


def test_the_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    tokenmill = Path(sys.executable).with_name("tokenmill")
    text = (DEPLOY / "tokenmill.service").read_text()
    installed = tmp_path / "tokenmill.service"  # as installed: ExecStart names a real program
    installed.write_text(text.replace("/opt/tokenmill/bin/tokenmill", str(tokenmill)))
    done = subprocess.run([analyze, "verify", str(installed)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
