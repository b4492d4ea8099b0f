"""The daemon process (cryptlockd.service): org.cryptlockd1 on the system bus, device
discovery, self-checks, the helper's RAM filesystem, and arming the helper."""
