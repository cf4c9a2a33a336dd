"""The CLI entry points exist and answer --help and --version; flag-style overrides get a one-line hint."""

import subprocess
import sys

import pytest


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "t5forge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "t5forge" in out.stdout


def test_version_prints_the_package_version():
    import tomllib
    from pathlib import Path

    import t5forge

    out = subprocess.run([sys.executable, "-m", "t5forge", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"t5forge {t5forge.__version__}\n"
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == t5forge.__version__  # one version, wherever it is read


@pytest.mark.parametrize("argv,hint", [
    (["pretrain", "--optim.base_lr", "1e-3"], "'--optim.base_lr 1e-3': config keys take no dashes; write optim.base_lr=1e-3"),
    (["pretrain", "task=pt_tiny", "--optim.base_lr=1e-3"], "'--optim.base_lr=1e-3': config keys take no dashes; write optim.base_lr=1e-3"),
    (["finetune", "--optim.base-lr", "5e-4"], "'--optim.base-lr 5e-4': config keys take no dashes; write optim.base_lr=5e-4"),
    (["pretrain", "--task", "pt_cpu"], "'--task pt_cpu': config keys take no dashes; write task=pt_cpu"),
    (["pretrain", "--seed"], "'--seed': config keys take no dashes; write seed=VALUE"),
    (["pretrain", "--no-such-thing", "3"], "unknown option --no-such-thing; config keys are written KEY=VALUE without dashes"),
])
def test_flag_style_override_gets_a_one_line_hint(argv, hint, capsys):
    from t5forge import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"t5forge {argv[0]}: error: {hint}") and len(err.splitlines()) == 1, err


def test_other_commands_keep_argparse_errors(capsys):
    from t5forge import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["plot", "run", "--optim.base_lr", "1e-3"])  # plot takes no config items
    assert stop.value.code == 2
    assert "unrecognized arguments: --optim.base_lr 1e-3" in capsys.readouterr().err
