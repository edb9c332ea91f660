"""The wire schema is frozen: any change is either compatible or a version bump.

``tests/snapshots/wire_schema.json`` holds the committed wire contract: the
JSON schema of every wire type, the tag set and the header action codes. A
change to ``protocol/messages.py`` fails ``test_wire_schema_matches_snapshot``
until the snapshot is regenerated deliberately::

    PPSTAGE_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest tests/test_schema_snapshot.py

Regenerating is refused (even with the variable set) when the change breaks
the rules of docs/protocol.md and ``PROTOCOL_VERSION`` was not bumped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

from protocol import ACTION_CODES, PROTOCOL_VERSION, WIRE_TYPES

SNAPSHOT = Path(__file__).parent / "snapshots" / "wire_schema.json"
UPDATE = os.environ.get("PPSTAGE_UPDATE_SNAPSHOT") == "1"


def _strip_descriptions(node):
    # Docstrings are documentation, not contract: editing one needs no snapshot update.
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def current_contract() -> dict:
    _, components = msgspec.json.schema_components(WIRE_TYPES)
    # JSON round trip: tuples become lists, exactly as the snapshot file stores them.
    components = json.loads(json.dumps(_strip_descriptions(components)))
    return {
        "protocol_version": PROTOCOL_VERSION,
        "tags": sorted(t.__struct_config__.tag for t in WIRE_TYPES),
        "action_codes": dict(sorted(ACTION_CODES.items(), key=lambda kv: kv[1])),
        "types": {name: components[name] for name in sorted(components)},
    }


def compatibility_problems(old: dict, new: dict) -> list[str]:
    """Changes that need a protocol version bump (docs/protocol.md, "Version policy")."""
    problems = []
    for tag, code in old["action_codes"].items():
        if tag not in new["action_codes"]:
            problems.append(f"tag {tag} removed")
        elif new["action_codes"][tag] != code:
            problems.append(f"tag {tag} moved from code {code} to {new['action_codes'][tag]}")
    old_codes = set(old["action_codes"].values())
    for tag, code in new["action_codes"].items():
        if tag not in old["action_codes"] and code in old_codes:
            problems.append(f"new tag {tag} reuses action code {code}")
    for name, old_type in old["types"].items():
        new_type = new["types"].get(name)
        if new_type is None:
            problems.append(f"type {name} removed")
            continue
        old_props, new_props = old_type.get("properties", {}), new_type.get("properties", {})
        old_req, new_req = set(old_type.get("required", [])), set(new_type.get("required", []))
        for field, schema in old_props.items():
            if field not in new_props:
                problems.append(f"{name}.{field} removed or renamed")
            elif new_props[field] != schema:
                problems.append(f"{name}.{field} retyped: {schema} -> {new_props[field]}")
            elif (field in old_req) != (field in new_req):
                problems.append(f"{name}.{field} changed between required and optional")
        kept = [f for f in new_props if f in old_props]
        if kept != [f for f in old_props if f in new_props]:
            problems.append(f"{name}: fields reordered")
        for field in new_props:
            if field not in old_props and field in new_req:
                problems.append(f"{name}.{field} added without a default")
        if old_type.get("type") != new_type.get("type"):
            problems.append(f"{name}: encoding changed from {old_type.get('type')} to {new_type.get('type')}")
    return problems


def test_wire_schema_matches_snapshot():
    new = current_contract()
    old = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else None
    if old is not None and new["protocol_version"] == old["protocol_version"]:
        problems = compatibility_problems(old, new)
        assert not problems, (
            "incompatible wire change without a PROTOCOL_VERSION bump:\n  " + "\n  ".join(problems)
        )
    if UPDATE:
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(new, indent=2) + "\n")
        return
    assert old is not None, f"no snapshot at {SNAPSHOT}; create it with PPSTAGE_UPDATE_SNAPSHOT=1"
    assert new == old, (
        "the wire schema changed; if the change is intended and follows docs/protocol.md, "
        "regenerate with PPSTAGE_UPDATE_SNAPSHOT=1 and commit tests/snapshots/wire_schema.json"
    )


def test_snapshot_file_is_canonical_json():
    # Regenerating without a change must not produce a diff.
    text = SNAPSHOT.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


def test_tags_and_action_codes_are_one_to_one():
    tags = [t.__struct_config__.tag for t in WIRE_TYPES]
    assert len(set(tags)) == len(tags)
    assert set(tags) == set(ACTION_CODES)
    assert len(set(ACTION_CODES.values())) == len(ACTION_CODES)
    assert all(0 < code < 256 for code in ACTION_CODES.values())  # one header byte


def test_wire_types_tolerate_unknown_fields_and_encode_as_maps():
    for t in WIRE_TYPES:
        cfg = t.__struct_config__
        assert not cfg.forbid_unknown_fields, t
        assert not cfg.array_like, t  # maps keyed by name: fields can be appended
        assert cfg.tag_field == "action", t


# -- compatibility rules themselves ---------------------------------------------------------


def _contract_with(mutate) -> tuple[dict, dict]:
    old = current_contract()
    new = json.loads(json.dumps(old))
    mutate(new)
    return old, new


def test_appending_an_optional_field_and_a_new_tag_is_compatible():
    def mutate(c):
        c["types"]["ChunkResult"]["properties"]["queue_wait_s"] = {"type": "number", "default": 0.0}
        c["action_codes"]["PING"] = max(c["action_codes"].values()) + 1
        c["types"]["Ping"] = {"type": "object", "properties": {}, "required": []}

    assert compatibility_problems(*_contract_with(mutate)) == []


def test_breaking_changes_are_detected():
    def mutate(c):
        infer = c["types"]["InferEnvelope"]
        del infer["properties"]["base_seed"]
        infer["properties"]["height"] = {"type": "number"}
        infer["properties"]["new_required"] = {"type": "integer"}
        infer["required"].append("new_required")
        props = c["types"]["NoopEnvelope"]["properties"]
        c["types"]["NoopEnvelope"]["properties"] = dict(reversed(list(props.items())))
        c["action_codes"]["NOOP"] = 9
        c["action_codes"]["PING"] = 1
        del c["types"]["ParityHello"]

    problems = "\n".join(compatibility_problems(*_contract_with(mutate)))
    for text in [
        "InferEnvelope.base_seed removed",
        "InferEnvelope.height retyped",
        "InferEnvelope.new_required added without a default",
        "NoopEnvelope: fields reordered",
        "tag NOOP moved",
        "new tag PING reuses action code 1",
        "type ParityHello removed",
    ]:
        assert text in problems

