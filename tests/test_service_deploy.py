"""Every file under deploy/ parses, and every command and flag it uses exists.

TOML configs load into ``PPStageConfig``; Kubernetes manifests are YAML whose
probes point at real routes; the systemd unit is a valid ini file that
restarts on failure; shell scripts pass ``bash -n``; every ``ppstage``
subcommand and flag, and every torchrun flag, is known to its parser.
"""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from ppstage.cli import build_parser
from ppstage.config import PPStageConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _subparsers(parser=None) -> dict:
    """The subcommands of ``parser`` (default: ``ppstage``'s), by name; {} when it has none."""
    parser = parser or build_parser()
    action = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
    return dict(action.choices) if action else {}


def _flags(parser) -> set[str]:
    return {opt for a in parser._actions for opt in a.option_strings}


def _torchrun_flags() -> set[str]:
    from torch.distributed.run import get_args_parser

    return _flags(get_args_parser())


@pytest.mark.parametrize("mode", ["r1", "r0a", "r0"])
def test_example_configs_load_and_carry_their_mode(mode):
    cfg = PPStageConfig.from_toml(DEPLOY / "configs" / f"{mode}.toml")
    assert cfg.recompute.mode == mode
    if mode == "r0":
        assert cfg.recompute.r0_quality_report  # the rollout gate needs a report path


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_parse_with_probes_on_real_routes():
    from ppstage.distributed.topology import role_for
    from ppstage.service.app import build_app
    from ppstage.service.host import ServiceHost
    from ppstage.service.options import ServiceOptions

    docs = k8s_documents()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Secret", "Service", "Service", "StatefulSet", "StatefulSet"]
    cfg = PPStageConfig()
    routes = {r.canonical for r in build_app(ServiceHost(cfg, role_for(cfg, 0), ServiceOptions())).router.resources()}
    headless = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    PPStageConfig.from_dict(tomllib.loads(config_map["data"]["config.toml"]))
    probed = set()
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
        pod = sts["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert any("--rdzv-backend=c10d" == a for a in container["command"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in container:
                path = container[probe]["httpGet"]["path"]
                assert path in routes, path
                probed.add((probe, path))
        if sts["metadata"]["labels"]["component"] == "head":
            ann = pod["metadata"]["annotations"]
            assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] in routes
    assert ("livenessProbe", "/healthz") in probed and ("readinessProbe", "/readyz") in probed


def test_systemd_unit_parses_and_restarts_on_failure():
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / "systemd" / "ppstage.service").read_text())
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["ExecStart"].startswith("/")


@pytest.mark.parametrize("script", sorted(p.name for p in DEPLOY.rglob("*.sh")))
def test_shell_scripts_are_valid_bash(script):
    path = next(DEPLOY.rglob(script))
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_node_env_files_define_what_run_node_reads():
    script = (DEPLOY / "multinode" / "run-node.sh").read_text()
    used = set(re.findall(r"\$\{?([A-Z_]+)", script)) - {"ENV_FILE", "EXTRA", "PPSTAGE", "TOKEN_FILE"}
    envs = sorted((DEPLOY / "multinode").glob("*.env"))
    assert len(envs) >= 2
    for env in envs:
        keys = {line.split("=", 1)[0] for line in env.read_text().splitlines() if "=" in line and not line.startswith("#")}
        assert used <= keys, (env.name, used - keys)


def _command_lines() -> list[tuple[str, list[str]]]:
    """Every torchrun / ppstage invocation in deploy/ and docs/operations.md, as tokens."""
    out: list[tuple[str, list[str]]] = []
    texts = [p for p in DEPLOY.rglob("*") if p.suffix in (".sh", ".service", ".md")]
    texts.append(ROOT / "docs" / "operations.md")
    for path in texts:
        text = path.read_text().replace("\\\n", " ")
        lines = text.splitlines()
        if path.suffix == ".md":  # code only: fenced blocks and inline code spans
            fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
            lines = [ln for block in fenced for ln in block.splitlines()]
            lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            line = line.split("ExecStart=", 1)[-1]
            if ("ppstage" in line or "torchrun" in line) and not line.lstrip().startswith("#"):
                try:
                    out.append((path.name, shlex.split(line)))
                except ValueError:
                    continue
    for doc in k8s_documents():
        if doc["kind"] == "StatefulSet":
            out.append(("k8s", list(doc["spec"]["template"]["spec"]["containers"][0]["command"])))
    return out


def test_every_command_and_flag_used_exists():
    subs = _subparsers()
    torchrun = _torchrun_flags()
    checked = 0
    for where, tokens in _command_lines():
        for i, tok in enumerate(tokens):
            name = tok.rsplit("/", 1)[-1]
            if name == "torchrun":
                end = tokens.index("-m", i) if "-m" in tokens[i:] else len(tokens)
                for flag in tokens[i + 1:end]:
                    if flag.startswith("--"):
                        assert flag.split("=", 1)[0] in torchrun, (where, flag)
                        checked += 1
            if name in ("ppstage", "ppstage.cli") and i + 1 < len(tokens) and re.fullmatch(r"[a-z]+", tokens[i + 1]):
                sub = tokens[i + 1]
                assert sub in subs, (where, sub)
                parser, rest = subs[sub], tokens[i + 2:]
                nested = _subparsers(parser)  # `bench service`, `log inspect`: the flags are the nested one's
                if nested and rest and rest[0] in nested:
                    parser, rest = nested[rest[0]], rest[1:]
                flags = _flags(parser)
                for flag in rest:
                    if flag in ("|", ">", "&&", ";"):
                        break
                    if flag.startswith("--"):
                        assert flag.split("=", 1)[0] in flags, (where, sub, flag)
                        checked += 1
    assert checked > 20  # the scan found the invocations it is meant to check
