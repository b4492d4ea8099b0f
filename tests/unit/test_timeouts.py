"""The timeouts that callers and the daemon use must nest, or the caller sees a bare
timeout instead of the daemon's answer."""

from cryptlockd.cli import main as ctl
from cryptlockd.daemon import polkit

# sd-bus and busctl give up on a method call after 25 s unless told otherwise.
SD_BUS_DEFAULT_CALL_TIMEOUT = 25.0


def test_polkit_wait_leaves_time_for_a_password_and_fits_inside_cryptlockctl() -> None:
    # A password typed into a polkit agent, or polkitd bus-activated on a slow machine
    # (a TCG guest needed 5.1 s), must not count as "denied".
    assert polkit.DEFAULT_TIMEOUT >= SD_BUS_DEFAULT_CALL_TIMEOUT
    # cryptlockctl must still get NotAuthorized from the daemon, not a timeout of its own.
    assert polkit.DEFAULT_TIMEOUT + 5 <= ctl.PRIVILEGED_TIMEOUT
