"""Every config key is documented next to the schema, and ``ppstage config --keys`` prints them all.

The doc lines are written by hand (``ppstage/config/_docs.py``); types and
defaults are read from the schema, so a new key without a line, or a line
left behind by a removed key, fails here.
"""

from __future__ import annotations

import msgspec
import pytest

from ppstage.cli import main
from ppstage.config import PPStageConfig, key_docs
from ppstage.config._docs import KEY_DOCS, doc_problems, schema_keys


def test_every_schema_key_has_one_doc_line_and_no_line_names_a_missing_key():
    assert doc_problems() == []
    # Every leaf of a config (section.key) is a schema key, and so is each drill field.
    assert set(PPStageConfig().flat()) <= set(schema_keys())
    assert {"faults.drill.kind", "faults.drill.rank", "faults.drill.chunk", "faults.drill.ms"} <= set(schema_keys())


def test_the_check_catches_a_key_without_a_line_and_a_line_without_a_key():
    docs = {k: v for k, v in KEY_DOCS.items() if k != "runtime.d_in"}
    docs["runtime.removed_knob"] = "gone"
    docs["cache.chunk_frames"] = "two\nlines"
    assert doc_problems(docs) == [
        "runtime.d_in: no doc line in ppstage/config/_docs.py",
        "runtime.removed_knob: documented, but the schema has no such key",
        "cache.chunk_frames: the doc line must be one non-empty line",
    ]


@pytest.mark.parametrize(
    ("key", "type_", "default"),
    [
        ("runtime.pg_timeout_s", "float > 0, <= 86400", "30.0"),
        ("service.port", "int >= 0, <= 65535", "8000"),
        ("recompute.mode", '"r0" | "r0a" | "r1"', '"r0a"'),
        ("record.dir", "str | None", "null"),
        ("denoise.step_list", "list of int", "[1000,750,500,250]"),
        ("topology.layer_ranges", "list of [int >= 0, int >= 0] | None", "null"),
        ("faults.drill", "array of tables", "[]"),
        ("faults.drill.rank", "int", "required"),
    ],
)
def test_types_and_defaults_come_from_the_schema(key, type_, default):
    doc = {d.key: d for d in key_docs()}[key]
    assert (doc.type, doc.default) == (type_, default)


def test_defaults_shown_are_the_defaults_a_config_gets():
    flat = PPStageConfig().flat()
    for doc in key_docs():
        if doc.key in flat:
            assert msgspec.json.decode(doc.default) == msgspec.json.decode(flat[doc.key]), doc.key


def test_config_keys_prints_every_key_with_its_type_default_and_meaning(capsys):
    assert main(["config", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "meaning"]
    by_key = {line.split()[0]: line for line in lines[1:]}
    assert list(by_key) == schema_keys()
    for doc in key_docs():
        line = by_key[doc.key]
        assert doc.type in line and f" {doc.default} " in line and line.endswith(doc.meaning), line


def test_plain_config_still_prints_toml_that_loads_back(capsys, tmp_path):
    assert main(["config", "--stages", "3"]) == 0
    path = tmp_path / "c.toml"
    path.write_text(capsys.readouterr().out)
    assert PPStageConfig.from_toml(path).topology.stages == 3
