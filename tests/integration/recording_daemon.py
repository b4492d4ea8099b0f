"""The real daemon with an armer that only records: `python -m tests.integration.recording_daemon
<daemon arguments>`. The host has no device-mapper and no systemd to run the helper under, so
the integration tests start the daemon this way and check what it does around the helper."""

from __future__ import annotations

import sys

from cryptlockd.daemon.main import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "--armer", "recording"]))
