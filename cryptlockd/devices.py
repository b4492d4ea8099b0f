"""LUKS device discovery. (Skeleton: the data model; discovery is filled in by the daemon-core work.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LuksDevice:
    name: str  # dm name, e.g. "cryptroot"
    uuid: str  # LUKS header UUID
    luks_type: str  # "LUKS1" or "LUKS2"
    backing_device: str  # e.g. "/dev/vda2"
    holds_root: bool  # root fs sits on it, directly or through holders
    suspended: bool  # dm reports it suspended now
    key_source: str  # "passphrase" or "keyfile:<path>" (from crypttab)
    holders: tuple[str, ...] = ()  # dm names stacked on top (LVM LVs, ...)
