import subprocess
import sys


def test_cli_help_exits_zero():
    r = subprocess.run([sys.executable, "-m", "kaki", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "generate" in r.stdout
