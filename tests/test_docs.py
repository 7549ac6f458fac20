"""Docs and packaging that fail when they drift from the CLI.

The man page must document every option of every command (walked from the click command
objects, so a new option fails here until it is documented); the committed completion scripts
must equal freshly generated ones and really complete in bash (and parse in zsh and fish); the
version comes from popsicle_py/_version.py; the sdist carries man/ and completions/, and
installing the package puts the man page and completions in the environment's data dir.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import click
import pytest

from popsicle_py import cli

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "man" / "popsicle-py.1"
COMPLETIONS = REPO / "completions"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
PROG = getattr(cli, "PROG", "popsicle-py")
SCRIPTS = ("popsicle-py", "_popsicle-py", "popsicle-py.fish")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("completions_generate",
                                                  COMPLETIONS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


generate = _generator()


def _commands(command: click.Command = cli.main, path: tuple[str, ...] = (),
              parent: click.Context | None = None
              ) -> Iterator[tuple[tuple[str, ...], click.Command, click.Context]]:
    """Every command of the CLI with its path ((), ("flash",)...) and a context for it."""
    ctx = click.Context(command, info_name=path[-1] if path else PROG, parent=parent,
                        **command.context_settings)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                yield from _commands(sub, (*path, name), ctx)


def _options(command: click.Command, ctx: click.Context) -> list[click.Option]:
    return [p for p in command.get_params(ctx)
            if isinstance(p, click.Option) and not getattr(p, "hidden", False)]


def _names(option: click.Option) -> list[str]:
    return [*option.opts, *option.secondary_opts]


# ----------------------------------------------------------------------------------------------
# The man page


def _plain(troff: str) -> str:
    """Troff source as text: escapes that change fonts or spacing removed, \\- made -."""
    text = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", troff)
    text = text.replace("\\-", "-").replace("\\&", "").replace("\\|", "").replace("\\ ", " ")
    return text


def _sections(troff: str) -> dict[str, list[str]]:
    """.SH name -> its lines, and "SH/SS" -> the lines of each subsection."""
    found: dict[str, list[str]] = {}
    sh = ss = None
    for line in troff.splitlines():
        if line.startswith(".SH "):
            sh, ss = line[4:].strip().strip('"'), None
            found[sh] = []
            continue
        if line.startswith(".SS "):
            ss = line[4:].strip().strip('"')
            found[f"{sh}/{ss}"] = []
            continue
        if sh is not None:
            found[sh].append(line)
        if ss is not None:
            found[f"{sh}/{ss}"].append(line)
    return found


def _entries(lines: Sequence[str]) -> list[tuple[str, str]]:
    """(tag, body) of every .TP entry, both as plain text."""
    entries: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith(".TP") and i + 1 < len(lines):
            tag = _plain(re.sub(r'^\.\w+\s+|"', "", lines[i + 1]))  # the text, not the macro
            body: list[str] = []
            i += 2
            while i < len(lines) and not lines[i].startswith((".TP", ".SS", ".SH")):
                body.append(lines[i])
                i += 1
            entries.append((tag, _plain("\n".join(body))))
            continue
        i += 1
    return entries


OPTION_TOKEN = re.compile(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)")


@pytest.fixture(scope="module")
def man_source() -> str:
    return MAN.read_text()


def _subsection(path: tuple[str, ...]) -> str:
    return "OPTIONS/" + (f"{' '.join(path)} options" if path else "Global options")


def test_man_page_has_the_sections(man_source: str) -> None:
    wanted = ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS",
              "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"]
    found = [line[4:].strip().strip('"') for line in man_source.splitlines()
             if line.startswith(".SH ")]
    assert [s for s in found if s in wanted] == wanted
    sections = _sections(man_source)
    see_also = _plain("\n".join(sections["SEE ALSO"]))
    for ref in ("dd (1)", "bmaptool (1)", "losetup (8)", "lsblk (8)", "udisksctl (1)"):
        assert ref in see_also
    status = _plain("\n".join(sections["EXIT STATUS"]))
    for code in ("0", "1", "2", "128", "130", "143", "129"):
        assert re.search(rf"(?<!\d){code}(?!\d)", status), code
    environment = _plain("\n".join(sections["ENVIRONMENT"]))
    assert "NO_COLOR" in environment and "COLUMNS" in environment


@pytest.mark.parametrize("path", [p for p, _, _ in _commands()], ids=lambda p: " ".join(p) or PROG)
def test_man_page_documents_every_option(man_source: str, path: tuple[str, ...]) -> None:
    """Each option of the command has a .TP entry in its subsection, with its default."""
    command, ctx = next((c, x) for p, c, x in _commands() if p == path)
    sections = _sections(man_source)
    where = _subsection(path)
    assert where in sections, f"man page has no subsection {where!r}"
    entries = _entries(sections[where])
    documented = {name for tag, _ in entries for name in OPTION_TOKEN.findall(tag)}
    expected = {name for opt in _options(command, ctx) for name in _names(opt)}
    missing = sorted(expected - documented)
    assert not missing, f"{where}: add a .TP entry for {', '.join(missing)}"
    extra = sorted(documented - expected)
    assert not extra, f"{where}: documents {', '.join(extra)}, which the CLI does not have"
    for opt in _options(command, ctx):
        if opt.is_flag or not opt.show_default or opt.default is None:
            continue
        default = opt.show_default if isinstance(opt.show_default, str) else opt.default
        forms = {str(default)}
        if isinstance(default, float) and default.is_integer():
            forms.add(str(int(default)))
        body = next(b for tag, b in entries if opt.opts[0] in OPTION_TOKEN.findall(tag))
        assert any(re.search(rf"Default:\s*{re.escape(f)}(?!\.?\d|\w)", body) for f in forms), (
            f"{where}: {opt.opts[0]} should say 'Default: {default}'")


def test_man_page_lists_every_command(man_source: str) -> None:
    # Subcommands of a group (cache list) are listed by their whole name, the group by them.
    paths = [(p, c) for p, c, _ in _commands() if p]
    groups = {p[0] for p, c in paths if isinstance(c, click.Group)}
    commands = {" ".join(p) for p, c in paths if not isinstance(c, click.Group)}
    tags = {" ".join(tag.split()[:2 if tag.split()[0] in groups else 1])
            for tag, _ in _entries(_sections(man_source)["COMMANDS"])}
    assert tags == commands
    synopsis = _plain("\n".join(_sections(man_source)["SYNOPSIS"]))
    for name in commands:
        assert f"{PROG} {name}" in synopsis


def test_man_page_lints_clean_with_mandoc() -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    result = subprocess.run(["mandoc", "-Tlint", "-W", "warning", str(MAN)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_man_page_lints_clean_with_groff() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# ----------------------------------------------------------------------------------------------
# Completion scripts


def test_committed_completions_are_up_to_date() -> None:
    for name, text in generate.render().items():
        committed = COMPLETIONS / name
        assert committed.exists(), f"run: python completions/generate.py ({name} is missing)"
        assert committed.read_text() == text, (
            f"completions/{name} is out of date: run python completions/generate.py")
    assert sorted(generate.render()) == sorted(SCRIPTS)


def test_generator_check_and_write(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(COMPLETIONS / "generate.py"), *args],
                              capture_output=True, text=True, cwd=tmp_path)

    assert run("--check").returncode == 0
    assert run("--check", "--output-dir", str(tmp_path)).returncode == 1
    assert run("--output-dir", str(tmp_path)).returncode == 0
    for name in SCRIPTS:
        assert (tmp_path / name).read_text() == (COMPLETIONS / name).read_text()
    assert run("--check", "--output-dir", str(tmp_path)).returncode == 0


def _bash_complete(script: Path, lines: Sequence[Sequence[str]], *, cwd: Path | None = None,
                   bash_completion: bool = False) -> list[list[str]]:
    """COMPREPLY for each command line (its words; the last is being completed).

    Without ``bash_completion`` this is exactly what the shell would pass: COMP_WORDS and
    COMP_CWORD.  With it, bash-completion is loaded and COMP_LINE/COMP_POINT are set too.
    """
    program = [
        "set -u" if not bash_completion else f"source {BASH_COMPLETION}",
        f"source {script}",
        "complete_line() {",
        "    local func",
        '    func=$(complete -p "$1" | sed -E "s/.*-F ([^ ]+) .*/\\1/")',
        '    COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()',
    ]
    if bash_completion:
        program += ['    COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}']
    program += [
        '    "$func" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"',
        "    printf '%s\\n' \"${COMPREPLY[@]}\"",
        "    echo '@@end'",
        "}",
    ]
    for words in lines:
        program.append("complete_line " + " ".join(_bash_quote(w) for w in words))
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", "\n".join(program)],
                            capture_output=True, text=True, cwd=cwd, timeout=30)
    assert result.returncode == 0, result.stderr
    replies: list[list[str]] = [[]]
    for line in result.stdout.splitlines():
        if line == "@@end":
            replies.append([])
        elif line:
            replies[-1].append(line)
    assert len(replies) == len(lines) + 1, result.stdout + result.stderr
    return replies[:-1]


def _bash_quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    (tmp_path / "focal.img").write_bytes(b"\0" * 512)
    (tmp_path / "other").mkdir()
    return tmp_path


@pytest.mark.parametrize("with_bash_completion", [False, True],
                         ids=["plain-bash", "bash-completion"])
def test_bash_completes(image_dir: Path, with_bash_completion: bool) -> None:
    if with_bash_completion and not BASH_COMPLETION.exists():
        pytest.skip("bash-completion is not installed")
    cases: list[list[str]] = [
        [PROG, "fl"],
        [PROG, ""],
        [PROG, "flash", "--no-v"],
        [PROG, "flash", "fo"],
        [PROG, "flash", "--yes", "--buckets", "4", "fo"],
        [PROG, "flash", "focal.img", "/dev/nul"],
        [PROG, "verify", "focal.img", "/dev/nul"],
        [PROG, "flash", "--bucket-size", ""],
        [PROG, "list", ""],
        [PROG, "nonsense", ""],
    ]
    commands = list(_commands())
    cases += [[PROG, *path, "-"] for path, _, _ in commands]
    replies = _bash_complete(COMPLETIONS / "popsicle-py", cases, cwd=image_dir,
                             bash_completion=with_bash_completion)
    got = dict(zip((tuple(c) for c in cases), replies, strict=True))
    assert got[(PROG, "fl")] == ["flash"]
    assert got[(PROG, "")] == sorted(p[0] for p, _, _ in commands if len(p) == 1)
    assert got[(PROG, "flash", "--no-v")] == ["--no-verify"]
    assert got[(PROG, "flash", "fo")] == ["focal.img"]
    assert got[(PROG, "flash", "--yes", "--buckets", "4", "fo")] == ["focal.img"]
    assert got[(PROG, "flash", "focal.img", "/dev/nul")] == ["/dev/null"]
    assert got[(PROG, "verify", "focal.img", "/dev/nul")] == ["/dev/null"]
    assert got[(PROG, "flash", "--bucket-size", "")] == []  # a size: nothing to offer
    assert got[(PROG, "list", "")] == []
    assert got[(PROG, "nonsense", "")] == []
    for path, command, ctx in commands:
        expected = sorted(n for opt in _options(command, ctx) for n in _names(opt))
        assert sorted(got[(PROG, *path, "-")]) == expected, path


def test_bash_completes_option_value_after_equals(image_dir: Path) -> None:
    if not BASH_COMPLETION.exists():
        pytest.skip("bash-completion is not installed")
    # bash-completion keeps --opt=value in one word; plain bash splits it at '='.
    [joined] = _bash_complete(COMPLETIONS / "popsicle-py",
                              [[PROG, "flash", "--bucket-size=4M", "fo"]], cwd=image_dir,
                              bash_completion=True)
    [split] = _bash_complete(COMPLETIONS / "popsicle-py",
                             [[PROG, "flash", "--bucket-size", "=", "4M", "fo"]], cwd=image_dir)
    assert joined == split == ["focal.img"]


@pytest.mark.root
def test_bash_completes_loop_devices(loop_factory, image_dir: Path) -> None:  # type: ignore[no-untyped-def]
    loop = loop_factory(1 << 20)
    cases = [[PROG, "flash", "focal.img", loop.path[:-1]], [PROG, "verify", "focal.img", ""]]
    prefix, empty = _bash_complete(COMPLETIONS / "popsicle-py", cases, cwd=image_dir)
    assert loop.path in prefix
    assert loop.path in empty
    assert all(p.startswith("/dev/") for p in empty)
    assert not any(re.search(r"-part\d+$|^/dev/sd[a-z]+\d|^/dev/mmcblk\d+p", p) for p in empty)


def _unattached_loops() -> set[str]:
    """Loop device nodes with nothing attached (other tests attach and detach meanwhile),
    each with its diskseq: a loop attached and detached again in between (another test's)
    has another one, and was no unattached loop all along."""
    found = set()
    for d in Path("/dev").glob("loop[0-9]*"):
        if not Path(f"/sys/block/{d.name}/loop/backing_file").exists():
            try:
                seq = Path(f"/sys/block/{d.name}/diskseq").read_text().strip()
            except OSError:
                continue
            found.add(f"{d}@{seq}")
    return found


@pytest.mark.root
def test_check_and_read_complete_certificates_drives_and_files(  # type: ignore[no-untyped-def]
        loop_factory, image_dir: Path) -> None:
    """check completed nothing (no CERT, no DEVICE, no --sums file); read's DEVICE words
    completed as plain files (/dev/loop8p1, loop devices with nothing attached)."""
    loop = loop_factory(1 << 20)
    prefix = loop.path[:-1]
    cases = [[PROG, "check", "fo"], [PROG, "check", "focal.img", prefix],
             [PROG, "check", prefix], [PROG, "check", "--sha256", "ab", "/dev/nul"],
             [PROG, "check", "--sums", "fo"], [PROG, "check", "--sums", "focal.img", "fo"],
             [PROG, "read", prefix], [PROG, "read", loop.path, "fo"],
             [PROG, "read", loop.path, "out.img", "--force", prefix]]
    unattached = _unattached_loops()
    (cert, check_dev, check_dev0, null, sums, sums_name, read_dev, read_out,
     read_dev2) = _bash_complete(COMPLETIONS / "popsicle-py", cases, cwd=image_dir)
    unattached &= _unattached_loops()  # unattached all along

    def whole_attached_loops(replies: list[str]) -> bool:
        never = {entry.split("@")[0] for entry in unattached}  # the nodes of those
        return all(re.fullmatch(r"/dev/loop\d+", r) and r not in never for r in replies)

    assert cert == ["focal.img"] and sums == ["focal.img"] and read_out == ["focal.img"]
    assert sums_name == []  # NAME: a name inside SHA256SUMS
    assert null == ["/dev/null"]  # no drive matches: file names
    for devices in (check_dev, check_dev0, read_dev, read_dev2):
        assert loop.path in devices and whole_attached_loops(devices), devices
    if shutil.which("fish") is None:
        return
    lines = [" ".join(c) for c in cases]
    unattached = _unattached_loops()
    got = _fish_complete(COMPLETIONS / "popsicle-py.fish", lines, image_dir)
    unattached &= _unattached_loops()
    assert got[0] == got[4] == got[7] == ["focal.img"], got
    assert got[5] == [] and got[3] == ["/dev/null"], got
    for devices in (got[1], got[2], got[6], got[8]):
        assert loop.path in devices and whole_attached_loops(devices), devices


def test_zsh_script_parses() -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed")
    script = COMPLETIONS / "_popsicle-py"
    assert script.read_text().startswith(f"#compdef {PROG}\n")
    result = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Sourced (not autoloaded from fpath), it registers itself with compdef.
    result = subprocess.run(
        [zsh, "-f", "-c", f"autoload -U compinit; compinit -u -D; source {script}; "
                          f"print -r -- $_comps[{PROG}]"],
        capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.stdout.strip() == "_popsicle_py", result.stdout + result.stderr


def _fish_complete(script: Path, lines: Sequence[str], cwd: Path) -> list[list[str]]:
    program = [f"source {script}"]
    for line in lines:
        program.append(f"complete -C {_fish_quote(line)}; echo @@end")
    result = subprocess.run(["fish", "--no-config", "-c", "\n".join(program)],
                            capture_output=True, text=True, cwd=cwd, timeout=30)
    assert result.returncode == 0, result.stderr
    replies: list[list[str]] = [[]]
    for out in result.stdout.splitlines():
        if out == "@@end":
            replies.append([])
        elif out:
            replies[-1].append(out.split("\t")[0])
    return replies[:-1]


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_fish_script_parses_and_completes(image_dir: Path) -> None:
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed")
    script = COMPLETIONS / "popsicle-py.fish"
    result = subprocess.run(["fish", "--no-config", "-n", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [f"{PROG} fl", f"{PROG} flash --no-v", f"{PROG} flash fo",
             f"{PROG} verify focal.img /dev/nul", f"{PROG} flash --buckets "]
    fl, no_v, image, device, value = _fish_complete(script, lines, image_dir)
    assert fl == ["flash"]
    assert no_v == ["--no-verify"]
    assert image == ["focal.img"]
    assert device == ["/dev/null"]
    assert value == []


def test_generator_follows_the_click_command(tmp_path: Path) -> None:
    """A new command, options and arguments of every kind reach all three scripts."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--verbose", is_flag=True, help="Say more [really].")
    def tool() -> None:
        """A tool."""

    @tool.command("burn-in")
    @click.argument("source", type=click.Path())
    @click.argument("target_devices", nargs=-1)
    @click.option("--mode", type=click.Choice(["fast", "safe"]), help="How: it's 'fast'.")
    @click.option("--log-dir", type=click.Path(file_okay=False), help="Where logs go.")
    @click.option("--color/--no-color", default=True, help="Colour.")
    @click.option("-t", "--tag", multiple=True, metavar="KEY:VALUE", help="Tag a run.")
    @click.option("--secret", hidden=True)
    def burn_in(**kwargs: object) -> None:
        """Burn it in."""

    scripts = generate.render(tool, "fake-tool")
    fish_script = scripts["popsicle-py.fish"]
    for name in ("--verbose", "--mode", "--log-dir", "--color", "--no-color", "--tag", "-t"):
        assert name in scripts["popsicle-py"] and name in scripts["_popsicle-py"], name
        spelled = f"-l '{name[2:]}'" if name.startswith("--") else f"-s '{name[1:]}'"
        assert spelled in fish_script, name
    for text in scripts.values():
        assert "burn-in" in text
        assert "secret" not in text
    for name, text in scripts.items():
        (tmp_path / name.replace("popsicle-py", "fake-tool")).write_text(text)
    (tmp_path / "src.img").write_bytes(b"x")
    (tmp_path / "logs").mkdir()

    cases = [["fake-tool", "b"], ["fake-tool", "-"], ["fake-tool", "--verbose", "burn-in", "--mo"],
             ["fake-tool", "burn-in", "--mode", "s"], ["fake-tool", "burn-in", "--no-c"],
             ["fake-tool", "burn-in", "--log-dir", "lo"], ["fake-tool", "burn-in", "sr"],
             ["fake-tool", "burn-in", "-t", "x", "src.img", "/dev/nul"]]
    got = _bash_complete(tmp_path / "fake-tool", cases, cwd=tmp_path)
    assert got == [["burn-in"], ["--verbose", "-h", "--help"], ["--mode"], ["safe"],
                   ["--no-color"], ["logs"], ["src.img"], ["/dev/null"]]

    if shutil.which("zsh"):
        result = subprocess.run(["zsh", "-n", str(tmp_path / "_fake-tool")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        zsh_script = scripts["_popsicle-py"]
        assert "--verbose[Say more \\[really\\].]" in zsh_script
        assert "'\\''fast'\\''.]:" in zsh_script and ":(fast safe)'" in zsh_script
    if shutil.which("fish"):
        fish_lines = ["fake-tool burn-in --mode ", "fake-tool b", "fake-tool burn-in x /dev/nul"]
        mode, sub, device = _fish_complete(tmp_path / "fake-tool.fish", fish_lines, tmp_path)
        assert mode == ["fast", "safe"]
        assert sub == ["burn-in"]
        assert device == ["/dev/null"]


# ----------------------------------------------------------------------------------------------
# Version and packaging


def _version() -> str:
    text = (REPO / "popsicle_py" / "_version.py").read_text()
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
    assert match, "popsicle_py/_version.py must set __version__"
    return match.group(1)


def test_python_m_prints_the_version() -> None:
    for flag in ("--version", "-V"):
        result = subprocess.run([sys.executable, "-m", "popsicle_py", flag],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [PROG + ",", "version", _version()]


def _readme_block(containing: str) -> list[str]:
    """The lines of the README's first ``sh`` block that contains ``containing``."""
    for block in re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        if containing in block:
            return block.splitlines()
    raise AssertionError(f"README has no sh block with {containing!r}")


def _words(command: str) -> list[str]:
    return [w for w in command.split() if w not in ("-q", "-qq", "--no-install-recommends")]


def test_ci_runs_the_readme_test_command() -> None:
    """CI installs the README's packages and runs its pytest line, in the same kind of venv."""
    [line] = [ln for ln in _readme_block("pytest") if "pytest" in ln]
    steps = [_words(step) for step in line.split(" && ")]
    ci_text = (REPO / ".ci" / "run").read_text().replace("\\\n", " ")
    ci = [_words(ln.split(">")[0]) for ln in ci_text.splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    [readme_apt] = [s for s in steps if s[:2] == ["apt-get", "install"]]
    [ci_apt] = [s for s in ci if s[:2] == ["apt-get", "install"]]
    assert set(readme_apt) == set(ci_apt)
    for step in steps:
        if step[:2] != ["apt-get", "install"]:
            assert step in ci, f"README's {' '.join(step)!r} is not in .ci/run"
    assert ci[-1] == steps[-1], "the last thing CI runs is README's test command"
    assert steps[-1][:2] == [".venv/bin/python", "-m"]  # the venv's Python, not the system's


def test_readme_links_every_installed_data_file() -> None:
    """The README's link lines name exactly the man page and completions the wheel installs."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.data-files]", 1)[1].split("\n[", 1)[0]
    installed = {f"{d}/{Path(f).name}" for d, files in re.findall(r'"([^"]+)" = \[([^]]*)\]',
                                                                   section)
                 for f in re.findall(r'"([^"]+)"', files)}
    linked = {m.group(1) for ln in _readme_block("ln -sf $S/")
              if (m := re.match(r"ln -sf \$S/(\S+) ", ln))}
    assert linked == {p.removeprefix("share/") for p in installed}
    assert len(linked) == 4


def _copy_repo(dest: Path) -> Path:
    """The working tree without VCS, caches and build output, as a fresh checkout has it."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", ".hypothesis", ".benchmarks",
                                    "*.img", "*.iso", "results")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_repo(tmp_path_factory.mktemp("src") / "popsicle-py")


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


def test_sdist_includes_man_page_and_completions(source_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=source_copy, env=_quiet_env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    name = result.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
        pkg_info = tar.extractfile(f"{name.removesuffix('.tar.gz')}/PKG-INFO")
        assert pkg_info is not None
        meta = pkg_info.read().decode()
    for wanted in ("man/popsicle-py.1", "completions/generate.py", "README.md",
                   *(f"completions/{s}" for s in SCRIPTS)):
        assert wanted in members, f"sdist lacks {wanted} (MANIFEST.in)"
    assert f"\nVersion: {_version()}\n" in meta
    assert not any("__pycache__" in m for m in members)


def _backend_builds_wheels() -> bool:
    """Can setuptools build a wheel here without fetching anything?"""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        import setuptools
    except ImportError:
        return False
    parts = re.findall(r"\d+", setuptools.__version__)[:2]
    return tuple(int(p) for p in parts) >= (70, 1)


def test_install_puts_man_page_and_script_in_place(source_copy: Path, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    env = _quiet_env()
    # Offline when the installed setuptools can build wheels itself; otherwise as `pip install .`
    # does, with the build requirements from the configured index.
    offline = ["--no-build-isolation", "--no-index"] if _backend_builds_wheels() else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", str(wheels),
         str(source_copy)],
        capture_output=True, text=True, env=env, timeout=300)
    if result.returncode and not offline and "build dependencies" in result.stdout + result.stderr:
        pytest.skip("no `wheel` package (or setuptools >= 70.1) and no index to get one from")
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = wheels.glob("popsicle_py-*.whl")
    assert wheel.name.startswith(f"popsicle_py-{_version()}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    data = f"popsicle_py-{_version()}.data/data/share"
    for wanted in ("man/man1/popsicle-py.1", "bash-completion/completions/popsicle-py",
                   "zsh/site-functions/_popsicle-py", "fish/vendor_completions.d/popsicle-py.fish"):
        assert f"{data}/{wanted}" in names

    # A fresh venv that sees the dependencies installed for the interpreter running the tests
    # (a .pth naming its site directories: --system-site-packages would see the base Python's,
    # not an outer venv's); this pip installs into it (pip --python), which is much faster than
    # bootstrapping a pip inside the venv.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    inner_site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    outer_site = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (inner_site / "outer-site.pth").write_text("".join(f"{d}\n" for d in outer_site))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--ignore-installed", "-q", str(wheel)],
        capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr

    data_dir = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['data'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    assert data_dir.resolve() == venv.resolve()
    share = data_dir / "share"
    man = share / "man" / "man1" / "popsicle-py.1"
    assert man.read_text() == MAN.read_text()
    for installed, name in (("bash-completion/completions", "popsicle-py"),
                            ("zsh/site-functions", "_popsicle-py"),
                            ("fish/vendor_completions.d", "popsicle-py.fish")):
        assert (share / installed / name).read_text() == (COMPLETIONS / name).read_text()

    clean_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    script = venv / "bin" / PROG
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            cwd=tmp_path, env=clean_env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [PROG + ",", "version", _version()]
    result = subprocess.run([str(script), "flash", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=clean_env, timeout=60)
    assert result.returncode == 0 and "--no-verify" in result.stdout, result.stderr
    where = subprocess.run([str(python), "-c", "import popsicle_py; print(popsicle_py.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=clean_env,
                           check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    if shutil.which("man"):
        found = subprocess.run(["man", "-w", PROG], capture_output=True, text=True,
                               env={**clean_env, "MANPATH": str(share / "man")})
        assert found.stdout.strip() == str(man), found.stdout + found.stderr
