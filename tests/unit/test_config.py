"""Config: precedence, masking, merging, and errors that name the file and the key."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from cryptlockd.daemon.config import (
    Config,
    config_files,
    load_config,
    render_default_config,
    settings_table,
    toml_value,
)
from cryptlockd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MAIN = "etc/cryptlockd/cryptlockd.conf"
ETC_D = "etc/cryptlockd/cryptlockd.conf.d"
RUN_D = "run/cryptlockd/cryptlockd.conf.d"
LIB_D = "usr/lib/cryptlockd/cryptlockd.conf.d"


def test_no_files_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path)
    assert cfg == Config()
    assert cfg.enabled is True
    assert cfg.prompt.max_failures_before_poweroff == 0
    assert cfg.devices.exclude == ()


def test_main_file_is_read(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "enabled = false\n[prompt]\nmax_failures_before_poweroff = 5\n")
    cfg = load_config(tmp_path)
    assert cfg.enabled is False
    assert cfg.prompt.max_failures_before_poweroff == 5


def test_dropins_apply_after_main_in_name_order(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[prompt]\nbackoff_initial_sec = 2\nbackoff_max_sec = 5\n")
    write(tmp_path, f"{LIB_D}/20-b.conf", "[prompt]\nbackoff_initial_sec = 3\n")
    write(tmp_path, f"{ETC_D}/10-a.conf", "[prompt]\nbackoff_initial_sec = 4\nvt = 9\n")
    write(tmp_path, f"{RUN_D}/30-c.conf", "[prompt]\nvt = 7\n")
    files = config_files(tmp_path)
    assert [f.name for f in files] == ["cryptlockd.conf", "10-a.conf", "20-b.conf", "30-c.conf"]
    cfg = load_config(tmp_path)
    # 20-b (from /usr/lib) sorts after 10-a (from /etc): name order, not directory order.
    assert cfg.prompt.backoff_initial_sec == 3.0
    assert cfg.prompt.backoff_max_sec == 5.0  # untouched keys of a table survive a merge
    assert cfg.prompt.vt == 7


def test_etc_masks_run_masks_usr_lib(tmp_path: Path) -> None:
    write(tmp_path, f"{LIB_D}/50-x.conf", "enabled = false\n[prompt]\nvt = 1\n")
    write(tmp_path, f"{RUN_D}/50-x.conf", "[prompt]\nvt = 2\n")
    assert load_config(tmp_path).prompt.vt == 2
    # /run masked /usr/lib entirely: its enabled = false is gone, not merged.
    assert load_config(tmp_path).enabled is True
    write(tmp_path, f"{ETC_D}/50-x.conf", "[cycle]\nfreeze_timeout_sec = 4\n")
    cfg = load_config(tmp_path)
    assert cfg.prompt.vt == 0
    assert cfg.cycle.freeze_timeout_sec == 4.0
    assert config_files(tmp_path)[1] == tmp_path / ETC_D / "50-x.conf"


def test_empty_file_in_etc_masks_vendor_dropin(tmp_path: Path) -> None:
    write(tmp_path, f"{LIB_D}/60-vendor.conf", "enabled = false\n")
    assert load_config(tmp_path).enabled is False
    os.makedirs(tmp_path / ETC_D)
    os.symlink("/dev/null", tmp_path / ETC_D / "60-vendor.conf")
    assert load_config(tmp_path).enabled is True


def test_arrays_are_replaced_not_appended(tmp_path: Path) -> None:
    write(tmp_path, MAIN, '[devices]\nexclude = ["a", "b"]\n')
    write(tmp_path, f"{ETC_D}/10.conf", '[devices]\nexclude = ["c"]\n')
    assert load_config(tmp_path).devices.exclude == ("c",)


def test_non_conf_files_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, f"{ETC_D}/10.conf.bak", "this is not toml [\n")
    write(tmp_path, f"{ETC_D}/.20.conf", "this is not toml [\n")
    write(tmp_path, f"{ETC_D}/30.conf", "enabled = false\n")
    assert load_config(tmp_path).enabled is False


def error_of(root: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(root)
    return str(exc.value)


def assert_error(root: Path, start: str, inside: str) -> None:
    """The config error starts with `start` (the file and the key) and says `inside`."""
    msg = error_of(root)
    assert msg.startswith(start) and inside in msg, msg


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"{ETC_D}/10-x.conf", "[prompt]\nretries = 3\n")
    assert error_of(tmp_path) == f"{path}: prompt.retries: unknown setting"


def test_unknown_table_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN, "[helper]\nx = 1\n")
    assert error_of(tmp_path) == f"{path}: helper: unknown setting"


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"{ETC_D}/10-x.conf", '[prompt]\nmax_failures_before_poweroff = "3"\n')
    assert error_of(tmp_path) == (
        f"{path}: prompt.max_failures_before_poweroff: Input should be a valid integer"
    )


def test_strings_are_not_coerced_to_bool(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN, 'enabled = "yes"\n')
    assert error_of(tmp_path) == f"{path}: enabled: Input should be a valid boolean"


def test_out_of_range_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"{RUN_D}/10.conf", "[prompt]\nmax_failures_before_poweroff = -1\n")
    assert_error(
        tmp_path, f"{path}: prompt.max_failures_before_poweroff: ", "greater than or equal to 0"
    )


def test_array_element_of_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN, '[devices]\nexclude = ["ok", 3]\n')
    assert error_of(tmp_path) == f"{path}: devices.exclude[1]: Input should be a valid string"


def test_scalar_where_table_expected(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN, "prompt = 3\n")
    assert error_of(tmp_path) == f"{path}: prompt: should be a table"


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "enabled = true\n")
    path = write(tmp_path, f"{LIB_D}/10-x.conf", "[prompt]\nvt = 1\nvt = = 2\n")
    assert_error(tmp_path, f"{path}: invalid TOML: ", "line 3")


def test_duplicate_key_is_bad_toml(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN, "enabled = true\nenabled = false\n")
    assert_error(tmp_path, f"{path}: invalid TOML: ", "line 2")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"{ETC_D}/10-x.conf", "enabled = false\n")
    path.chmod(0)
    assert error_of(tmp_path) == f"{path}: cannot read: Permission denied"


def test_symlink_loop_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / ETC_D).mkdir(parents=True)
    loop = tmp_path / ETC_D / "10-loop.conf"
    os.symlink(loop.name, loop)
    assert error_of(tmp_path) == f"{loop}: cannot read: Too many levels of symbolic links"


def test_directory_named_like_a_dropin(tmp_path: Path) -> None:
    (tmp_path / ETC_D / "10-x.conf").mkdir(parents=True)
    assert error_of(tmp_path) == f"{tmp_path / ETC_D / '10-x.conf'}: cannot read: is a directory"


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / MAIN
    path.parent.mkdir(parents=True)
    path.write_bytes(b"enabled = true\n# \xff\n")
    assert error_of(tmp_path) == f"{path}: not valid UTF-8 (byte 17)"


def test_error_in_later_file_names_that_file(tmp_path: Path) -> None:
    write(tmp_path, MAIN, "[prompt]\nvt = 1\n")
    write(tmp_path, f"{ETC_D}/10.conf", "[prompt]\nvt = 2\n")
    bad = write(tmp_path, f"{ETC_D}/20.conf", "[cycle]\narm_timeout_sec = true\n")
    assert error_of(tmp_path) == f"{bad}: cycle.arm_timeout_sec: Input should be a valid number"


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.enabled = False  # type: ignore[misc]


def test_shipped_default_file_is_generated_from_the_table() -> None:
    shipped = (REPO / "packaging" / "cryptlockd.conf").read_text()
    assert shipped == render_default_config(), (
        "packaging/cryptlockd.conf is stale: regenerate it with "
        "`python -m cryptlockd.daemon.config > packaging/cryptlockd.conf`"
    )


def test_default_file_uncommented_gives_the_defaults(tmp_path: Path) -> None:
    text = render_default_config()
    # Uncommenting every setting line must yield valid TOML equal to the defaults.
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.MULTILINE)
    assert uncommented != text
    data = tomllib.loads(uncommented)
    assert Config.model_validate(data) == Config()
    write(tmp_path, MAIN, uncommented)
    assert load_config(tmp_path) == Config()


def test_every_setting_is_in_the_man_page() -> None:
    page = (REPO / "man" / "cryptlockd.conf.5").read_text()
    # roff escapes hyphens and may break lines; compare on the plain text.
    plain = page.replace("\\-", "-").replace("\\&", "").replace("\\fB", "").replace("\\fR", "")
    for s in settings_table():
        if s.table:
            assert f'.SS "[{s.table}]"' in plain, f"table [{s.table}] has no section"
        assert re.search(rf"^\.TP\n{re.escape(s.key)} = ", plain, re.MULTILINE), (
            f"{s.dotted} is not documented in man/cryptlockd.conf.5"
        )
        default = f"Defaults to {toml_value(s.default)}"
        assert default in plain, f"{s.dotted}: man page does not say '{default}'"


def test_man_page_documents_no_unknown_setting() -> None:
    page = (REPO / "man" / "cryptlockd.conf.5").read_text()
    documented = set(re.findall(r"^\.TP\n\\fB(\w+)\\fR = ", page, re.MULTILINE))
    assert documented == {s.key for s in settings_table()}
