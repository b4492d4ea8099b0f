"""`cryptlockctl status --json` against its JSON Schema (cryptlockd/cli/status.schema.json):
the schema is valid, a status with a real cycle record passes, and a wrong one fails."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from cryptlockd.cli.output import status_dict
from cryptlockd.defs import STATUS_SCHEMA, STATUS_SCHEMA_VERSION
from tests.unit.test_helper_cycle import GOOD, FakeOps, cycle


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(STATUS_SCHEMA.read_text())
    return loaded


def status(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "Version": "0.1.0",
        "Enabled": True,
        "Protected": True,
        "Problems": [],
        "State": "idle",
        "Devices": [
            ["cryptroot", "1234-abcd", "LUKS2", "/dev/vda2", True, False, "passphrase", []]
        ],
        "LastCycle": cycle(FakeOps([GOOD])).as_dict(),
    }
    props.update(changes)
    return {"SchemaVersion": STATUS_SCHEMA_VERSION, **status_dict(props)}


def test_schema_is_valid_and_versioned() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    assert schema()["properties"]["SchemaVersion"] == {"const": STATUS_SCHEMA_VERSION}


@pytest.mark.parametrize("last_cycle", ["record", "none yet"])
def test_a_status_passes(last_cycle: str) -> None:
    doc = status() if last_cycle == "record" else status(LastCycle={})
    jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    "broken",
    [
        {"Protected": "yes"},
        {"Problems": "none"},
        {"LastCycle": {"reason": "no result"}},
        {"Devices": [["cryptroot", "u", "LUKS2", "/dev/vda2", "yes", False, "passphrase", []]]},
    ],
)
def test_a_wrong_status_fails(broken: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(status(**broken), schema(), cls=jsonschema.Draft202012Validator)


def test_the_schema_version_is_required() -> None:
    doc = status()
    del doc["SchemaVersion"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)
