"""crypttab(5) parsing: what the daemon learns about key sources."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.daemon.crypttab import CrypttabEntry, parse_crypttab, read_crypttab


def test_fields_comments_and_blank_lines() -> None:
    text = """
# <target name> <source device> <key file> <options>
cryptroot UUID=1234 none luks,discard

cryptdata\tPARTUUID=abcd\t/etc/keys/data.key\tluks,nofail,keyfile-timeout=10s
   cryptswap /dev/disk/by-id/x /dev/urandom swap,cipher=aes-xts-plain64
minimal /dev/vdc
dash /dev/vdd - luks
"""
    assert parse_crypttab(text) == [
        CrypttabEntry("cryptroot", "UUID=1234", None, ("luks", "discard")),
        CrypttabEntry(
            "cryptdata",
            "PARTUUID=abcd",
            "/etc/keys/data.key",
            ("luks", "nofail", "keyfile-timeout=10s"),
        ),
        CrypttabEntry(
            "cryptswap", "/dev/disk/by-id/x", "/dev/urandom", ("swap", "cipher=aes-xts-plain64")
        ),
        CrypttabEntry("minimal", "/dev/vdc", None, ()),
        CrypttabEntry("dash", "/dev/vdd", None, ("luks",)),
    ]


def test_key_source() -> None:
    assert CrypttabEntry("a", "UUID=1", None).key_source == "passphrase"
    assert CrypttabEntry("a", "UUID=1", "/k").key_source == "keyfile:/k"
    # systemd's "keyfile:device" form is kept whole; the helper resolves it.
    assert CrypttabEntry("a", "UUID=1", "/k:UUID=9").key_source == "keyfile:/k:UUID=9"


def test_keyfile_size_and_offset() -> None:
    [entry, plain, bad] = parse_crypttab(
        "data UUID=1 /dev/sdb none,keyfile-size=64,keyfile-offset=4096,luks\n"
        "plain UUID=2 /k luks\n"
        "bad UUID=3 /k keyfile-size=64k,keyfile-offset=\n"
    )
    assert (entry.keyfile_size, entry.keyfile_offset) == (64, 4096)
    assert (plain.keyfile_size, plain.keyfile_offset) == (0, 0)
    # Not a number of bytes: read as the whole file (a prompt at worst), not an error.
    assert (bad.keyfile_size, bad.keyfile_offset) == (0, 0)


def test_line_without_device_is_skipped() -> None:
    assert parse_crypttab("lonely\nok /dev/vda none\n") == [
        CrypttabEntry("ok", "/dev/vda", None, ())
    ]


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_crypttab(tmp_path / "crypttab") == []


def test_unreadable_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "crypttab").mkdir()
    assert read_crypttab(tmp_path / "crypttab") == []


def test_read_file(tmp_path: Path) -> None:
    (tmp_path / "crypttab").write_text("x UUID=1 /key\n")
    assert read_crypttab(tmp_path / "crypttab") == [CrypttabEntry("x", "UUID=1", "/key", ())]
