"""cryptlockd: wipe LUKS keys from RAM across suspend-to-RAM."""

__version__ = "0.1.0"
