import subprocess
import sys


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
