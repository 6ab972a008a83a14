"""The CLI's shell: help, README coverage, exit statuses, one-line errors."""

from __future__ import annotations

import argparse
import io
import re
import shlex
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli.main import COMMANDS, all_commands, build_parser, main

ROOT = Path(__file__).resolve().parents[3]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_every_command_has_help_text() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)  # type: ignore[arg-type]
    assert names == set(all_commands())
    assert set(COMMANDS) < names  # and the dev kit's, through the plugin point
    assert {"demo", "sandbox", "simulate", "selftest"} <= names - set(COMMANDS)
    for name, help_text in all_commands().items():
        assert len(help_text) > 15, name
        status, out, _ = run(name, "--help")
        assert status == 0
        assert help_text in " ".join(out.split())


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in all_commands():
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
        "import sys; from gateway.cli.main import main; "
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
        "heavy = [m for m in ('pymodbus', 'serial', 'cryptography') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert done.stdout.strip() == ""


# -- issue 12 item 9: the small things users notice ----------------------------------------
def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand ``build_parser()`` knows, by name."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def readme_command_table() -> set[str]:
    """The commands named in the first column of README's command table."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## The command line\n", 1)[1].split("\n## ", 1)[0]
    header = "| command | what it does |\n|---|---|\n"
    rows = section.split(header, 1)[1].split("\n\n", 1)[0].splitlines()
    return {name for row in rows
            for name in re.findall(r"`([a-z][a-z-]*)[ `]", row.split(" | ", 1)[0])}


def test_every_subcommand_is_in_the_readme_command_table() -> None:
    missing = set(subcommands()) - readme_command_table()
    assert not missing, f"README's command table lacks {sorted(missing)}"


def options_of(name: str) -> set[str]:
    """The options a subcommand shows in its help."""
    return {o for a in subcommands()[name]._actions if a.help != argparse.SUPPRESS
            for o in a.option_strings}


def test_shared_options_are_shown_only_where_they_mean_something() -> None:
    # Commands that never read the config file do not show --config ...
    for name in ("ports", "demo", "sandbox", "completion"):
        assert "--config" not in options_of(name), name
        status, out, _ = run(name, "--help")
        assert status == 0
        assert "--config" not in out, name
    # ... yet accept it, as contract §2 says every command does (scripts pass it to all).
    assert run("ports", "--json", "--config", "/nonexistent.toml")[0] == 0
    # ... and commands that print no data do not offer --json.
    for name in ("run", "demo", "sandbox", "completion"):
        assert "--json" not in options_of(name), name
    for name in ("status", "check-config", "locks", "unlock", "lock", "test", "outbox",
                 "clock", "scan"):
        assert {"--config", "--json"} <= options_of(name), name
    assert "--json" in options_of("ports")
    assert all("--debug" in options_of(name) for name in subcommands())


def bash_complete(script: str, *words: str) -> list[str]:
    """What bash's completion offers after ``stora-gateway WORDS`` (the last one typed)."""
    line = " ".join(shlex.quote(w) for w in ("stora-gateway", *words))
    program = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words)}\n"
               "_stora_gateway\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
               "complete -p stora-gateway >&2\n")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True,
                          text=True, check=True, timeout=30)
    assert done.stderr.strip() == "complete -F _stora_gateway stora-gateway"
    return sorted(w for w in done.stdout.splitlines() if w)


def test_bash_completion_completes_commands_options_and_choices(tmp_path: Path) -> None:
    status, script, err = run("completion", "bash")
    assert (status, err) == (0, "")
    assert script.startswith("# bash completion for stora-gateway")
    assert set(subcommands()) <= set(bash_complete(script, ""))
    assert bash_complete(script, "sta") == ["status"]
    assert bash_complete(script, "--config", "x.toml", "ou") == ["outbox"]
    assert bash_complete(script, "outbox", "") == sorted(
        ["retry", "--help", "--config", "--debug", "--json", "--dead", "--all-dead",
         "--limit"])
    assert bash_complete(script, "status", "--v") == ["--verbose"]
    assert bash_complete(script, "demo", "--broker", "") == ["auto", "embedded", "mosquitto"]
    assert bash_complete(script, "completion", "") == ["--debug", "--help", "bash"]
    (tmp_path / "site.toml").write_text("")
    assert bash_complete(script, "locks", "--config", str(tmp_path / "si")) == [
        str(tmp_path / "site.toml")]
    assert run("completion", "zsh")[0] == 2  # a shell without a script: usage error


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a technician's shell is."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def one_of_each(tmp_path: Path) -> Iterator[Path]:
    """A config with one controller and one lock, on a running simulator."""
    from devkit.site import make_site

    # Nothing listens there: no agent is started, only the config is needed.
    site = make_site(tmp_path, types.SimpleNamespace(host="127.0.0.1", port=9))  # type: ignore[arg-type]
    try:
        text = site.config_path.read_text()
        head = text.split('[[controllers]]\nname = "lockers"', 1)[0]
        first_lock = "[[locks]]" + text.split("[[locks]]")[1]
        site.config_path.write_text(head + first_lock)
        yield site.config_path
    finally:
        site.close()


@pytest.mark.simulator_only
def test_counts_are_singular_for_one(one_of_each: Path) -> None:
    status, out, _ = run("check-config", "--config", str(one_of_each))
    assert status == 0
    assert out.endswith(": OK — site site_test, 1 controller, 1 lock\n")


@pytest.mark.simulator_only
def test_lock_states_are_coloured_on_a_terminal_and_columns_still_line_up(
        one_of_each: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    out = Terminal()
    assert main(["locks", "--config", str(one_of_each)], out=out) == 0
    shown = out.getvalue()
    assert "\x1b[32mlocked\x1b[0m" in shown
    plain = re.sub(r"\x1b\[[0-9;]*m", "", shown).splitlines()
    header, rule, row = plain[:3]
    assert header.index("door") == row.index("closed")  # widths count what is visible
    assert len(rule) >= len(row.split("  lockout")[0])
    monkeypatch.setenv("NO_COLOR", "1")
    out = Terminal()
    assert main(["locks", "--config", str(one_of_each)], out=out) == 0
    assert "\x1b" not in out.getvalue()
    piped = io.StringIO()  # not a terminal
    monkeypatch.delenv("NO_COLOR")
    assert main(["locks", "--config", str(one_of_each)], out=piped) == 0
    assert "\x1b" not in piped.getvalue()


def test_pass_fail_and_verdicts_get_their_colour_only_when_asked() -> None:
    from gateway.term import paint, table, use_colour, wants_colour

    rows = [["A-101", "PASS", "ok"], ["B-202", "FAIL", "jammed"]]
    use_colour(True)
    try:
        coloured = table(["reference", "result", "detail"], rows)
        assert "\x1b[32mPASS\x1b[0m" in coloured
        assert "\x1b[31mFAIL\x1b[0m" in coloured
        assert paint("DEGRADED") == "\x1b[1;33mDEGRADED\x1b[0m"
        assert paint("FAILED") == "FAILED"  # only whole words with a meaning
    finally:
        use_colour(False)
    assert table(["reference", "result", "detail"], rows) == re.sub(
        r"\x1b\[[0-9;]*m", "", coloured)
    assert wants_colour(Terminal(), {"TERM": "xterm"}) is True
    assert wants_colour(Terminal(), {"TERM": "xterm", "NO_COLOR": ""}) is True  # empty: unset
    assert wants_colour(Terminal(), {"TERM": "xterm", "NO_COLOR": "1"}) is False
    assert wants_colour(Terminal(), {"TERM": "dumb"}) is False
    assert wants_colour(io.StringIO(), {"TERM": "xterm"}) is False
