"""The CLI's shell: help, README coverage, exit statuses, one-line errors."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_every_command_has_help_text() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)  # type: ignore[arg-type]
    assert names == set(COMMANDS)
    for name, help_text in COMMANDS.items():
        assert len(help_text) > 15, name
        status, out, _ = run(name, "--help")
        assert status == 0
        assert help_text in " ".join(out.split())


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert re.search(rf"`{re.escape(name)}[ `]", readme), f"README lacks `{name}`"


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split()[0] for line in block[:2]] == ["./scripts/demo", "./scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec ./scripts/test" in ci


def test_no_command_prints_usage_and_exits_2() -> None:
    status, out, _ = run()
    assert status == 2
    assert "check-config" in out


def test_missing_config_is_one_line_exit_2(tmp_path: Path) -> None:
    status, out, err = run("locks", "--config", str(tmp_path / "nope.toml"))
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "nope.toml" in err
    assert "Traceback" not in err


def test_config_option_before_the_command(tmp_path: Path) -> None:
    status, _, err = run("--config", str(tmp_path / "x.toml"), "check-config")
    assert status == 2
    assert "x.toml" in err


def test_check_config_json_reports_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "gw.toml"
    bad.write_text('[site]\nid = "s"\napp_name = "A"\nbogus = 1\n')
    status, out, _ = run("check-config", "--json", "--config", str(bad))
    assert status == 2
    assert '"ok": false' in out
    assert "site.bogus" in out


def test_bad_usage_exits_2() -> None:
    status, _, _ = run("unlock")  # missing UNIT
    assert status == 2


def test_env_variable_names_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORA_GATEWAY_CONFIG", str(tmp_path / "from-env.toml"))
    status, _, err = run("check-config")
    assert status == 2
    assert "from-env.toml" in err


def test_help_is_fast_and_lazy() -> None:
    """`--help` must not import the heavy libraries (a Pi's cold start)."""
    code = (
        "import sys; from gateway.cli import main; "
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
        "heavy = [m for m in ('pymodbus', 'serial', 'cryptography') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert done.stdout.strip() == ""
