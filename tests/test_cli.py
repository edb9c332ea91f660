"""What the ``ppstage`` subcommands do with their flags: over ``--config``, and when one is unknown."""

import importlib
import subprocess
import sys

import pytest

from ppstage.cli import build_parser, main
from ppstage.cli.args import config_from_args


def test_plan_command_prints_one_row_per_chunk():
    out = subprocess.run(
        [sys.executable, "-m", "ppstage.cli", "plan", "--chunks", "5", "--cut-at", "3"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert len(out) == 6
    # chunk 3 is a hard cut: epoch 1, start frame 0, init set
    assert out[4].split()[:5] == ["3", "3", "1", "0", "1"]


def effective_config(argv: list[str]):
    """The config a command runs with: its flags parsed as the console script does, over ``--config``."""
    args = build_parser().parse_args(argv)
    return config_from_args(args, importlib.import_module(f"ppstage.cli.{args.command}").CONFIG_FLAGS)


@pytest.mark.parametrize("command", ["demo", "soak"])
def test_stages_and_tp_come_from_the_config_unless_a_flag_is_given(tmp_path, command):
    cfg = tmp_path / "three.toml"
    cfg.write_text("[topology]\nstages = 3\ntp = 2\n")
    t = effective_config([command, "--config", str(cfg)]).topology
    assert (t.stages, t.tp) == (3, 2)
    t = effective_config([command, "--config", str(cfg), "--stages", "1"]).topology
    assert (t.stages, t.tp) == (1, 2)  # a flag overrides only its own key
    t = effective_config([command]).topology
    assert (t.stages, t.tp) == (2, 1)  # no config: rank 0 + two generator stages, as before


@pytest.mark.parametrize("command", ["demo", "plan", "reference", "soak"])
def test_the_recompute_mode_comes_from_the_config_unless_mode_is_given(tmp_path, command):
    cfg = tmp_path / "r1.toml"
    cfg.write_text('[recompute]\nmode = "r1"\n')
    assert effective_config([command, "--config", str(cfg)]).recompute.mode == "r1"
    assert effective_config([command, "--config", str(cfg), "--mode", "r0a"]).recompute.mode == "r0a"
    assert effective_config([command]).recompute.mode == "r0a"


def test_plan_with_an_r1_config_plans_no_recompute(tmp_path, capsys):
    cfg = tmp_path / "r1.toml"
    cfg.write_text('[recompute]\nmode = "r1"\n')
    assert main(["plan", "--chunks", "3", "--config", str(cfg)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[6] for row in rows] == ["0", "0", "0"]  # r1 never recomputes; r0a would from chunk 1


def test_a_flag_that_makes_the_config_invalid_is_named(tmp_path):
    from ppstage.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--simulate-call-ms: invalid config: runtime\.simulated_call_ms"):
        effective_config(["demo", "--simulate-call-ms", "1e9"])


@pytest.mark.parametrize("argv, prog", [
    (["demo", "--chunks", "2", "--bogus"], "ppstage demo"),
    (["plan", "--bogus", "--chunks", "2"], "ppstage plan"),
    (["reference", "--bogus"], "ppstage reference"),
    (["config", "--bogus=1"], "ppstage config"),
    (["replay", "x.ppslog", "--bogus"], "ppstage replay"),
    (["log", "inspect", "x.ppslog", "--bogus"], "ppstage log inspect"),
    (["log", "--bogus", "inspect", "x.ppslog"], "ppstage log"),
])
def test_an_unknown_flag_is_named_under_the_subcommands_own_usage(capsys, argv, prog):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"usage: {prog} ")
    assert err[-1] == f"{prog}: error: unrecognized arguments: {argv[-1] if 'bogus' in argv[-1] else '--bogus'}"


def test_an_unknown_flag_of_a_bench_is_named_by_that_bench(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "transport", "--bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ppstage bench transport: error: unrecognized arguments: --bogus")
