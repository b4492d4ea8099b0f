"""The configuration: one table of settings, read from the main file plus drop-ins.

Files are TOML. The main file is /etc/cryptlockd/cryptlockd.conf; drop-ins are
cryptlockd.conf.d/*.conf under /usr/lib, /run and /etc. As with systemd, a drop-in in /etc
masks one of the same name in /run, which masks one in /usr/lib; the survivors are applied
in file-name order after the main file. Tables merge key by key, a later value (arrays
included) replaces an earlier one.

Each file is validated on its own before merging, so an error names the file that has it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cryptlockd.defs import CONFIG_DROPIN_DIRS, CONFIG_FILE
from cryptlockd.errors import ConfigError
from cryptlockd.helper import protocol
from cryptlockd.searchpath import merged_dir

__all__ = [
    "Config",
    "CycleSettings",
    "DevicesSettings",
    "PromptSettings",
    "Setting",
    "config_files",
    "load_config",
    "render_default_config",
    "settings_table",
    "toml_value",
]

# strict: TOML is typed, so "yes" for a bool or 3.5 for an int is a mistake to report,
# not something to coerce.
_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)


def _seconds(default: float, description: str, *, at_most: float, zero: bool = True) -> Any:
    """A duration setting, in seconds: up to `at_most`, from 0 when `zero`, else above it."""
    if zero:
        return Field(default=default, ge=0, le=at_most, description=description)
    return Field(default=default, gt=0, le=at_most, description=description)


class PromptSettings(BaseModel):
    model_config = _MODEL_CONFIG

    max_failures_before_poweroff: int = Field(
        default=protocol.DEFAULT_POWEROFF_AFTER,
        ge=0,
        description="Power the machine off after this many wrong passphrases in a row at "
        "the resume prompt; 0 never powers off.",
    )
    backoff_initial_sec: float = _seconds(
        protocol.DEFAULT_BACKOFF_INITIAL,
        "Wait this long after the first wrong passphrase before asking again.",
        at_most=3600,
    )
    backoff_max_sec: float = _seconds(
        protocol.DEFAULT_BACKOFF_MAX,
        "The wait doubles after each further wrong passphrase, up to this.",
        at_most=3600,
    )
    poweroff_after_wake_sec: float = _seconds(
        protocol.DEFAULT_POWEROFF_LOCKED_AFTER,
        "Power the machine off when the disks are still locked this long after a wake: "
        "the keys are gone already, and then the rest of RAM decays too. Whatever was not "
        "saved is lost. 0 never powers off; 1800 (30 minutes) is a sensible value.",
        at_most=7 * 24 * 3600,
    )
    unanswered_wake_sleep_sec: float = _seconds(
        protocol.DEFAULT_UNANSWERED_WAKE_AFTER,
        "Go back to sleep, the disks still locked, when a wake finds the lid shut and no "
        "key is pressed for this long (an RTC alarm, a spurious wake in a bag). 0 stays "
        "awake at the prompt.",
        at_most=3600,
    )
    vt: int = Field(
        default=protocol.DEFAULT_VT,
        ge=0,
        le=63,
        description="Virtual terminal for the prompt; 0 picks a free one.",
    )


class DevicesSettings(BaseModel):
    model_config = _MODEL_CONFIG

    # Lists arrive from TOML; a frozen model wants a tuple, so allow that one conversion.
    exclude: tuple[str, ...] = Field(
        default=(),
        strict=False,
        description="dm names or LUKS UUIDs of devices to leave alone: their keys stay in "
        "RAM across suspend.",
    )


class CycleSettings(BaseModel):
    model_config = _MODEL_CONFIG

    arm_timeout_sec: float = _seconds(
        3.0,
        "How long the daemon waits for the helper to report armed after "
        "PrepareForSleep; keep it below logind's InhibitDelayMaxSec (5 s by default).",
        at_most=60,
        zero=False,
    )
    freeze_timeout_sec: float = _seconds(
        protocol.DEFAULT_FREEZE_TIMEOUT,
        "How long the helper waits for every cgroup to report frozen; past "
        "it, the protected cycle is abandoned and the failure reported.",
        at_most=300,
        zero=False,
    )
    sync_timeout_sec: float = _seconds(
        protocol.DEFAULT_SYNC_TIMEOUT,
        "How long the helper waits for sync(), which it runs before the freeze; past it "
        "(a network or FUSE file system whose server does not answer), the protected cycle "
        "is abandoned, the machine stays awake and the failure is reported.",
        at_most=3600,
        zero=False,
    )
    syncfs_timeout_sec: float = _seconds(
        protocol.DEFAULT_SYNCFS_TIMEOUT,
        "How long the helper waits for syncfs() of each block-backed file system after "
        "the freeze; past it, the cycle is abandoned as for sync_timeout_sec.",
        at_most=3600,
        zero=False,
    )
    drop_page_cache: bool = Field(
        default=False,
        description="Before the devices are suspended (after the sync and the freeze), drop "
        "the clean page cache and clear the memory it freed, so that the plaintext of "
        "recently read files is not left in RAM beside the wiped keys. The price: every "
        "file is read from the disk again after resume, so the first minutes are slower.",
    )


class MetricsSettings(BaseModel):
    model_config = _MODEL_CONFIG

    textfile: str = Field(
        default="",
        pattern=r"^(|/.*[^/]\.prom)$",
        description="Write a Prometheus text file here for node_exporter's textfile "
        "collector, for example /var/lib/prometheus/node-exporter/cryptlockd.prom; an "
        "absolute path ending in .prom. Empty: no file.",
    )


class Config(BaseModel):
    model_config = _MODEL_CONFIG

    enabled: bool = Field(
        default=True,
        description="Protect suspend-to-RAM. When false, the machine sleeps without wiping keys.",
    )
    # Frozen, so one shared default instance is safe.
    prompt: PromptSettings = PromptSettings()
    devices: DevicesSettings = DevicesSettings()
    cycle: CycleSettings = CycleSettings()
    metrics: MetricsSettings = MetricsSettings()


# ---- the settings table, for docs and the default file -------------------------------


@dataclass(frozen=True)
class Setting:
    table: str  # "" for top-level keys
    key: str
    default: Any
    type_name: str
    description: str

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.key}" if self.table else self.key


def _type_name(annotation: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if annotation in names:
        return names[annotation]
    return "array of strings"


def settings_table() -> list[Setting]:
    out: list[Setting] = []
    for name, field in Config.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for key, f in sub.model_fields.items():
                out.append(
                    Setting(name, key, f.default, _type_name(f.annotation), f.description or "")
                )
        else:
            out.append(
                Setting(
                    "", name, field.default, _type_name(field.annotation), field.description or ""
                )
            )
    return out


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _wrap_comment(text: str, width: int = 88) -> list[str]:
    lines: list[str] = []
    line = "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "#"
        line += " " + word
    lines.append(line)
    return lines


def render_default_config() -> str:
    """The shipped packaging/cryptlockd.conf: every setting, commented out, at its default."""
    out = [
        "# cryptlockd configuration. See cryptlockd.conf(5).",
        "#",
        "# Every setting is shown commented out with its default. To change one, uncomment it",
        "# here or, better, put it in a drop-in: /etc/cryptlockd/cryptlockd.conf.d/*.conf.",
    ]
    table = ""
    for s in settings_table():
        if s.table != table:
            table = s.table
            out.extend(["", f"[{table}]"])
        out.append("")
        out.extend(_wrap_comment(s.description))
        out.append(f"#{s.key} = {toml_value(s.default)}")
    return "\n".join(out) + "\n"


# ---- reading ------------------------------------------------------------------------


def config_files(root: Path = Path("/")) -> list[Path]:
    """The files to read, in the order they apply."""
    try:
        dropins = merged_dir(CONFIG_DROPIN_DIRS, ".conf", str(root))
    except OSError as e:
        raise ConfigError(f"{e.filename}: cannot read directory: {e.strerror}") from e
    return [root / CONFIG_FILE.lstrip("/"), *map(Path, dropins)]


def _read_toml(path: Path, *, optional: bool) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if optional:
            return None
        raise ConfigError(f"{path}: cannot read: file not found") from None
    except IsADirectoryError as e:
        raise ConfigError(f"{path}: cannot read: is a directory") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends in "(at line N, column M)".
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def _problem(err: Mapping[str, Any]) -> str:
    kind = err.get("type")
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "model_type":
        return "should be a table"
    return str(err.get("msg", "invalid"))


def _key_of(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        else:
            parts.append(p)
    return ".".join(parts) or "(top level)"


def _validate(data: Mapping[str, Any], where: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        more = len(e.errors()) - 1
        extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"{where}: {_key_of(err['loc'])}: {_problem(err)}{extra}") from e


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _walk(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, dotted + ".")
        else:
            yield dotted


def load_config(root: Path = Path("/")) -> Config:
    """Read, check and merge every config file under `root`. Raises ConfigError."""
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for path in config_files(root):
        # The main file may be absent (defaults apply); a listed drop-in vanishing between
        # listing and reading is a race, and also just means "no settings".
        data = _read_toml(path, optional=True)
        if data is None:
            continue
        _validate(data, str(path))
        _merge(merged, data)
        for key in _walk(data):
            origin[key] = path
    try:
        return Config.model_validate(merged)
    except ValidationError as e:
        # Each file passed alone, so this is an interaction between files: blame the file
        # that set the offending key last.
        key = _key_of(e.errors()[0]["loc"])
        where = origin.get(key, Path("(merged configuration)"))
        raise ConfigError(f"{where}: {key}: {_problem(e.errors()[0])}") from e


if __name__ == "__main__":
    # Regenerates packaging/cryptlockd.conf.
    print(render_default_config(), end="")
