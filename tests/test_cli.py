"""The ``tinylm`` command: help and version work and stay fast (no Numba, matplotlib, ... imported:
numpy comes with ``import tinylm`` and costs ~0.1 s)."""
import subprocess
import sys

from tinylm import __version__


def run(*args):
    return subprocess.run([sys.executable, "-m", "tinylm", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("train", "sample", "tokenizer", "prepare"):
        assert cmd in r.stdout


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tinylm {__version__}"


def test_help_imports_nothing_heavy():
    code = ("import sys; from tinylm.cli import build_parser; build_parser(); "
            "print(','.join(m for m in ('numba', 'matplotlib', 'safetensors', 'regex', 'tqdm') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_no_command_prints_help_and_bad_command_fails():
    r = run()
    assert r.returncode == 0 and "usage: tinylm" in r.stdout
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
