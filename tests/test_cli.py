"""The command line's own habits: --version, one-line errors."""
import subprocess
import sys

import artdist
from artdist.cli import main as cli_main


def test_version_flag_prints_the_package_version(capsys):
    try:
        cli_main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"artdist {artdist.__version__}"


def test_version_from_the_installed_entry_point():
    res = subprocess.run([sys.executable, "-m", "artdist", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("artdist ")
