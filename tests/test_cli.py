import subprocess
import sys

from nijimi.cli import main


def test_unknown_command_exits_nonzero(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse accepted an unknown command")


def test_python_m_nijimi_prints_version():
    out = subprocess.run([sys.executable, "-m", "nijimi", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("nijimi ")
