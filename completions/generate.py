#!/usr/bin/env python3
"""Generate the bash, zsh and fish completion scripts from the click CLI.

    python completions/generate.py          # rewrite completions/popsicle-py, _popsicle-py
                                            # and popsicle-py.fish
    python completions/generate.py --check  # exit 1 if a committed script differs

The scripts are static: they hold the commands, options and arguments walked from the click
command object, so completing never starts Python.  What an argument completes is decided
here from its click parameter: an argument whose name contains "device" completes drives
(whole disks under /dev, /dev/disk/by-id), a click.Path or click.File completes files (or
directories), a click.Choice its choices; any other value completes nothing.  An option of
several values (click.Tuple) completes each by its own type.  A variadic argument's metavar
names its words: "[CERT] DEVICE..." (a certificate file, or a drive under /dev/, then drives)
and "DEVICE OUTPUT [DEVICE OUTPUT]..." (drives and files in turn); DEVICE is a drive, CERT a
file, any other word what the argument's type says.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The CLI of this checkout, not an older installed copy.
sys.path.insert(0, str(REPO))

import click  # noqa: E402

FILES = {"bash": "popsicle-py", "zsh": "_popsicle-py", "fish": "popsicle-py.fish"}


# ----------------------------------------------------------------------------------------------
# The model: what the scripts need to know about the click command tree


@dataclass
class Opt:
    names: list[str]  # every spelling: -a, --all-usb (and --no-x for --x/--no-x flags)
    nvalues: int  # words the option consumes after it (0 for a flag)
    kind: str  # what its (first) value completes: none, file, dir, choice, device
    choices: list[str]
    metavar: str
    help: str
    multiple: bool
    exits: bool  # --help, --version: nothing else follows
    kinds: list[str] = field(default_factory=list)  # per value (click.Tuple); else [kind]

    def kind_of(self, value: int) -> str:
        """What value ``value`` (0-based) of the option completes."""
        return self.kinds[value] if value < len(self.kinds) else self.kind


@dataclass
class Arg:
    name: str
    nargs: int  # -1: any number (consecutive such arguments take the rest in turn)
    required: bool
    kind: str  # none, file, dir, choice, device, or device-or-file (a drive under /dev/)
    choices: list[str]


@dataclass
class Cmd:
    path: tuple[str, ...]  # () for the program itself
    help: str
    options: list[Opt]
    args: list[Arg]
    commands: list[Cmd] = field(default_factory=list)

    @property
    def is_group(self) -> bool:
        return bool(self.commands)

    def walk(self) -> Iterator[Cmd]:
        yield self
        for sub in self.commands:
            yield from sub.walk()


def _clean(text: str | None) -> str:
    """One line of help: click's \\b markers dropped, whitespace collapsed."""
    text = (text or "").replace("\b", " ")
    return re.sub(r"\s+", " ", text).strip()


def _kind(param: click.Parameter) -> tuple[str, list[str]]:
    if isinstance(param, click.Argument) and "device" in (param.name or "").lower():
        return "device", []
    return _type_kind(param.type)


def _type_kind(ptype: click.ParamType) -> tuple[str, list[str]]:
    if isinstance(ptype, click.Tuple):
        return _type_kind(ptype.types[0]) if ptype.types else ("none", [])
    if isinstance(ptype, click.Choice):
        return "choice", [str(c) for c in ptype.choices]
    if isinstance(ptype, click.Path):
        return ("dir", []) if ptype.dir_okay and not ptype.file_okay else ("file", [])
    if isinstance(ptype, click.File):
        return "file", []
    return "none", []


def _ordered(names: list[str]) -> list[str]:
    """Short spellings first, as click's help shows them (click may give --help before -h)."""
    return sorted(names, key=lambda name: len(name) - len(name.lstrip("-")))


def _option(param: click.Option, ctx: click.Context) -> Opt:
    kind, choices = _kind(param)
    takes_value = not param.is_flag and not param.count
    metavar = param.metavar or param.type.name.upper()
    if param.metavar is None and hasattr(param, "make_metavar"):
        try:
            metavar = param.make_metavar(ctx)  # click >= 8.2
        except TypeError:
            metavar = param.make_metavar()  # type: ignore[call-arg]
    kinds = ([_type_kind(t)[0] for t in param.type.types]
             if isinstance(param.type, click.Tuple) and takes_value else [])
    return Opt(
        names=[*_ordered(param.opts), *_ordered(param.secondary_opts)],
        nvalues=max(param.nargs, 1) if takes_value else 0,
        kind=kind if takes_value else "none",
        choices=choices,
        metavar=_clean(metavar),
        help=_clean(param.help),
        multiple=bool(param.multiple or param.count),
        exits=bool(param.is_eager and not param.expose_value),
        kinds=kinds,
    )


#: What a word of an argument's metavar completes, when the argument's type does not say.
WORD_KINDS = {"DEVICE": "device", "CERT": "file"}


def _arguments(param: click.Argument) -> list[Arg]:
    """The argument as the completion sees it: one Arg, or as its metavar spells its words
    ("[CERT] DEVICE...": an optional slot, then drives; "A B [A B]...": A and B in turn)."""
    kind, choices = _kind(param)
    metavar = param.metavar or ""

    def word(name: str) -> Arg:
        named = WORD_KINDS.get(name)
        return Arg(name.lower(), -1, param.required, named or kind,
                   [] if named else choices)

    if param.nargs < 0 and (m := re.fullmatch(r"\[(\w+)\] (\w+)\.\.\.", metavar)):
        first, rest = word(m.group(1)), word(m.group(2))
        either = {first.kind, rest.kind} == {"file", "device"}
        return [Arg(first.name, 1, False, "device-or-file" if either else first.kind,
                    first.choices), rest]
    if param.nargs < 0 and (m := re.fullmatch(r"((?:\w+ )*\w+) \[\1\]\.\.\.", metavar)):
        return [word(name) for name in m.group(1).split()]
    return [Arg(param.name or "arg", param.nargs, param.required, kind, choices)]


def model(command: click.Command, prog: str, parent: click.Context | None = None,
          path: tuple[str, ...] = ()) -> Cmd:
    """The completion model of ``command`` (and its subcommands), as click sees it."""
    ctx = click.Context(command, info_name=path[-1] if path else prog, parent=parent,
                        **command.context_settings)
    options: list[Opt] = []
    args: list[Arg] = []
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        if isinstance(param, click.Option):
            options.append(_option(param, ctx))
        elif isinstance(param, click.Argument):
            args.extend(_arguments(param))
    limit = 200
    cmd = Cmd(path, _clean(command.get_short_help_str(limit)), options, args)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            cmd.commands.append(model(sub, prog, ctx, (*path, name)))
    return cmd


# ----------------------------------------------------------------------------------------------
# Shared helpers


HEADER = (
    "Generated by completions/generate.py from the click CLI: do not edit.\n"
    "After changing the CLI, run: python completions/generate.py"
)


def _ident(prog: str, path: tuple[str, ...]) -> str:
    """A shell function name: _popsicle_py, _popsicle_py_flash."""
    return "_" + re.sub(r"[^A-Za-z0-9]", "_", "_".join((prog, *path)))


def _sq(text: str) -> str:
    """Single-quote for bash and zsh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _arg_at(args: list[Arg]) -> tuple[list[Arg], list[Arg]]:
    """Positional slots in order (an Arg per word), and the arguments that take the rest,
    word by word in turn (none, one, or a cycle such as DEVICE OUTPUT)."""
    slots: list[Arg] = []
    for i, arg in enumerate(args):
        if arg.nargs < 0:
            return slots, [a for a in args[i:] if a.nargs < 0]
        slots.extend([arg] * arg.nargs)
    return slots, []


# ----------------------------------------------------------------------------------------------
# bash


BASH_DEVICES = r"""
# Whole disks a drive may be: USB sticks and SD cards (/dev/sdX, /dev/mmcblkN), attached loop
# devices, and their /dev/disk/by-id names.  When none matches, complete file names.
_{fn}_devices()
{{
    local d
    local -a found=()
    for d in /dev/sd[a-z]* /dev/mmcblk[0-9]* /dev/loop[0-9]* /dev/disk/by-id/*; do
        [[ -b $d ]] || continue
        case $d in
            /dev/disk/by-id/*-part[0-9]*) continue ;;
            /dev/disk/by-id/*) ;;
            /dev/loop*) [[ -e /sys/block/${{d##*/}}/loop/backing_file ]] || continue ;;
            *) [[ $d =~ ^/dev/(sd[a-z]+|mmcblk[0-9]+)$ ]] || continue ;;
        esac
        [[ $d == "$cur"* ]] && found+=("$d")
    done
    if ((${{#found[@]}})); then
        COMPREPLY=("${{found[@]}}")
    else
        _{fn}_files
    fi
}}

# A certificate file, or a drive when the word starts with /dev/.
_{fn}_devices_or_files()
{{
    if [[ $cur == /dev/* ]]; then
        _{fn}_devices
    else
        _{fn}_files
    fi
}}

_{fn}_files()
{{
    if declare -F _filedir >/dev/null; then
        _filedir "$@"
    else
        compopt -o filenames 2>/dev/null
        if [[ ${{1-}} == -d ]]; then
            mapfile -t COMPREPLY < <(compgen -d -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        fi
    fi
}}
"""


def _bash_complete(kind: str, choices: list[str], fn: str, indent: str) -> str:
    if kind == "device":
        return f"{indent}_{fn}_devices"
    if kind == "device-or-file":
        return f"{indent}_{fn}_devices_or_files"
    if kind == "file":
        return f"{indent}_{fn}_files"
    if kind == "dir":
        return f"{indent}_{fn}_files -d"
    if kind == "choice":
        words = _sq(" ".join(choices))
        return f'{indent}mapfile -t COMPREPLY < <(compgen -W {words} -- "$cur")'
    return f"{indent}:"


def bash(root: Cmd, prog: str) -> str:
    fn = _ident(prog, ())[1:]
    cmds = list(root.walk())
    key = " ".join  # a command's key in $path: "" for the program, "flash", "group sub"

    lines: list[str] = []
    out = lines.append
    out(f"# bash completion for {prog}{' ' * 30}-*- shell-script -*-")
    for line in HEADER.splitlines():
        out(f"# {line}")
    out(BASH_DEVICES.format(fn=fn).rstrip("\n"))
    out("")
    out(f"_{fn}()")
    out("{")
    out("    local cur words cword")
    out("    # With bash-completion, keep --opt=value and by-id names holding ':' in one word.")
    out('    if [[ -n ${COMP_LINE-} ]] && declare -F _get_comp_words_by_ref >/dev/null; then')
    out("        _get_comp_words_by_ref -n =: cur words cword")
    out("    else")
    out('        words=("${COMP_WORDS[@]}")')
    out("        cword=$COMP_CWORD")
    out('        cur=${COMP_WORDS[COMP_CWORD]-}')
    out("    fi")
    out("    COMPREPLY=()")
    out("")
    out('    local path="" word valopt="" i skip=0 npos=0 dashdash=0')
    out("    for ((i = 1; i < cword; i++)); do")
    out('        word=${words[i]}')
    out("        if ((skip > 0)); then")
    out('            [[ $word == = ]] && continue  # --opt = value, as bash splits --opt=value')
    out("            skip=$((skip - 1))")
    out("            continue")
    out("        fi")
    out("        if ((!dashdash)) && [[ $word == -- ]]; then")
    out("            dashdash=1")
    out("            continue")
    out("        fi")
    out("        if ((!dashdash)) && [[ $word == -?* ]]; then")
    out("            [[ $word == *=* ]] && continue")
    out('            valopt=$word')
    out('            case "$path:$word" in')
    for cmd in cmds:
        for opt in cmd.options:
            if opt.nvalues:
                pats = "|".join(f'"{key(cmd.path)}:{name}"' for name in opt.names)
                out(f"                {pats}) skip={opt.nvalues} ;;")
    out("            esac")
    out("            continue")
    out("        fi")
    groups = [c for c in cmds if c.is_group]
    if groups:
        out('        case "$path" in')
        for cmd in groups:
            out(f'            "{key(cmd.path)}")')
            names = "|".join(c.path[-1] for c in cmd.commands)
            out('                case "$word" in')
            out(f'                    {names}) path=${{path:+$path }}$word npos=0 dashdash=0'
                " ;;")
            out("                    *) return 0 ;;  # not a command: nothing to offer")
            out("                esac")
            out("                continue")
            out("                ;;")
        out("        esac")
    out("        npos=$((npos + 1))")
    out("    done")
    out("")
    out("    if ((skip == 0)) && ((!dashdash)) && [[ $cur == --*=* ]]; then")
    out('        valopt=${cur%%=*} cur=${cur#*=} skip=1')
    out("    fi")
    out('    [[ $cur == = ]] && ((skip > 0)) && cur=""')
    out("    if ((skip > 0)); then")
    valued = [(cmd, opt) for cmd in cmds for opt in cmd.options
              if opt.nvalues and any(opt.kind_of(v) != "none" for v in range(opt.nvalues))]
    if valued:
        out('        case "$path:$valopt" in')
        for cmd, opt in valued:
            pats = "|".join(f'"{key(cmd.path)}:{name}"' for name in opt.names)
            out(f"            {pats})")
            kinds = [opt.kind_of(v) for v in range(opt.nvalues)]
            if len(set(kinds)) == 1:
                out(_bash_complete(opt.kind, opt.choices, fn, " " * 16))
            else:  # $skip counts the values still to come: nvalues for the first
                out('                case "$skip" in')
                for v, kind in enumerate(kinds):
                    out(f"                    {opt.nvalues - v})")
                    out(_bash_complete(kind, opt.choices, fn, " " * 24))
                    out("                        ;;")
                out("                esac")
            out("                ;;")
        out("        esac")
    else:
        out("        :  # no option value completes to anything")
    out("    elif ((!dashdash)) && [[ $cur == -* ]]; then")
    out('        case "$path" in')
    for cmd in cmds:
        words = " ".join(name for opt in cmd.options for name in opt.names)
        out(f'            "{key(cmd.path)}") '
            f'mapfile -t COMPREPLY < <(compgen -W {_sq(words)} -- "$cur") ;;')
    out("        esac")
    out("    else")
    out('        case "$path" in')
    for cmd in cmds:
        slots, rest = _arg_at(cmd.args)
        if not cmd.is_group and not slots and not rest:
            continue
        out(f'            "{key(cmd.path)}")')
        if cmd.is_group:
            words = " ".join(c.path[-1] for c in cmd.commands)
            out(f'                mapfile -t COMPREPLY < <(compgen -W {_sq(words)} -- "$cur")')
        else:
            out('                case "$npos" in')
            for i, arg in enumerate(slots):
                out(f"                    {i})")
                out(_bash_complete(arg.kind, arg.choices, fn, " " * 24))
                out("                        ;;")
            if len(rest) == 1:
                out("                    *)")
                out(_bash_complete(rest[0].kind, rest[0].choices, fn, " " * 24))
                out("                        ;;")
            elif rest:
                out("                    *)")
                out(f'                        case $(((npos - {len(slots)}) % {len(rest)})) in')
                for i, arg in enumerate(rest):
                    out(f"                            {i})")
                    out(_bash_complete(arg.kind, arg.choices, fn, " " * 32))
                    out("                                ;;")
                out("                        esac")
                out("                        ;;")
            out("                esac")
        out("                ;;")
    out("        esac")
    out("    fi")
    out("    if declare -F __ltrim_colon_completions >/dev/null; then")
    out('        __ltrim_colon_completions "$cur"')
    out("    fi")
    out("    return 0")
    out("}")
    out(f"complete -F _{fn} {prog}")
    out("")
    out("# ex: filetype=sh")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# zsh


ZSH_DEVICES = r"""
(( $+functions[_{fn}_devices] )) ||
_{fn}_devices() {{
  # Whole disks a drive may be: USB sticks and SD cards (/dev/sdX, /dev/mmcblkN), attached loop
  # devices, and their /dev/disk/by-id names.  When none matches, complete file names.
  setopt localoptions extendedglob nullglob
  local d expl
  local -a devices
  for d in /dev/sd[a-z]## /dev/mmcblk<-> /dev/loop<-> /dev/disk/by-id/*~*-part<->; do
    [[ -b $d ]] || continue
    [[ $d == /dev/loop* && ! -e /sys/block/${{d:t}}/loop/backing_file ]] && continue
    devices+=($d)
  done
  _wanted devices expl 'drive' compadd -a devices || _files
}}

(( $+functions[_{fn}_devices_or_files] )) ||
_{fn}_devices_or_files() {{
  # A certificate file, or a drive when the word starts with /dev/.
  if [[ $PREFIX == /dev/* ]]; then
    _{fn}_devices
  else
    _files
  fi
}}
"""


def _zsh_escape_desc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def _zsh_escape_msg(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


def _zsh_action(kind: str, choices: list[str], fn: str) -> str:
    if kind == "device":
        return f"_{fn}_devices"
    if kind == "device-or-file":
        return f"_{fn}_devices_or_files"
    if kind == "file":
        return "_files"
    if kind == "dir":
        return "_files -/"
    if kind == "choice":
        return "(" + " ".join(re.sub(r"([\\ ():])", r"\\\1", c) for c in choices) + ")"
    return " "


def _zsh_specs(cmd: Cmd, fn: str) -> list[str]:
    specs: list[str] = []
    for opt in cmd.options:
        exclusive = "(- *)" if opt.exits else ("" if opt.multiple else
                                               "(" + " ".join(opt.names) + ")")
        star = "*" if opt.multiple else ""
        desc = f"[{_zsh_escape_desc(opt.help)}]" if opt.help else ""
        for name in opt.names:
            spec = f"{exclusive}{star}{name}"
            if opt.nvalues:
                spec += ("=" if name.startswith("--") else "+") + desc
                msg = _zsh_escape_msg(opt.metavar or "value")
                spec += "".join(f":{msg}:{_zsh_action(opt.kind_of(v), opt.choices, fn)}"
                                for v in range(opt.nvalues))
            else:
                spec += desc
            specs.append(spec)
    if cmd.is_group:
        specs += [": :->command", "*:: :->args"]
        return specs
    slots, rest = _arg_at(cmd.args)
    for i, arg in enumerate(slots, 1):
        colon = ":" if arg.required else "::"
        action = _zsh_action(arg.kind, arg.choices, fn)
        specs.append(f"{i}{colon}{_zsh_escape_msg(arg.name)}:{action}")
    if len(rest) == 1:
        action = _zsh_action(rest[0].kind, rest[0].choices, fn)
        specs.append(f"*:{_zsh_escape_msg(rest[0].name)}:{action}")
    elif rest:  # words in turn: decided after _arguments, by the count of normal arguments
        specs.append("*: :->rest")
    return specs


def _zsh_rest(cmd: Cmd, fn: str) -> list[str]:
    """The state that completes the rest's words in turn ($line: the normal arguments, the
    word being completed included)."""
    slots, rest = _arg_at(cmd.args)
    lines = ["  case $state in", "    rest)",
             f"      case $(( (${{#line}} - 1 - {len(slots)}) % {len(rest)} )) in"]
    for i, arg in enumerate(rest):
        action = _zsh_action(arg.kind, arg.choices, fn)
        if arg.kind == "choice":
            action = "compadd -- " + " ".join(_sq(c) for c in arg.choices)
        elif arg.kind == "none":
            action = ":"
        lines.append(f"        {i}) {action} && ret=0 ;;")
    return [*lines, "      esac", "      ;;", "  esac", "  return ret"]


def zsh(root: Cmd, prog: str) -> str:
    fn = _ident(prog, ())[1:]
    lines: list[str] = [f"#compdef {prog}"]
    out = lines.append
    out(f"# zsh completion for {prog}.")
    for line in HEADER.splitlines():
        out(f"# {line}")
    out(ZSH_DEVICES.format(fn=fn).rstrip("\n"))
    for cmd in root.walk():
        name = _ident(prog, cmd.path)
        out("")
        if cmd.path:
            out(f"(( $+functions[{name}] )) ||")
        out(f"{name}() {{")
        stateful = cmd.is_group or len(_arg_at(cmd.args)[1]) > 1
        if stateful:
            out("  local curcontext=$curcontext state state_descr line ret=1")
            out("  typeset -A opt_args")
            out("  _arguments -C -s -S \\")
        else:
            out("  _arguments -s -S \\")
        specs = _zsh_specs(cmd, fn)
        for i, spec in enumerate(specs):
            out(f"    {_sq(spec)}" + (" \\" if i < len(specs) - 1 else
                                      (" && ret=0" if stateful else "")))
        if stateful and not cmd.is_group:
            out("")
            for line in _zsh_rest(cmd, fn):
                out(line)
        if cmd.is_group:
            out("")
            out("  case $state in")
            out("    command)")
            out("      local -a commands=(")
            for sub in cmd.commands:
                text = sub.path[-1].replace(":", "\\:") + (":" + sub.help if sub.help else "")
                out(f"        {_sq(text)}")
            out("      )")
            what = " ".join((prog, *cmd.path))
            out(f"      _describe -t commands {_sq(what + ' command')} commands && ret=0")
            out("      ;;")
            out("    args)")
            ctx = "-".join((prog, *cmd.path))
            out(f"      curcontext=${{curcontext%:*:*}}:{ctx}-$words[1]:")
            out("      case $words[1] in")
            for sub in cmd.commands:
                out(f"        {sub.path[-1]}) {_ident(prog, sub.path)} && ret=0 ;;")
            out("      esac")
            out("      ;;")
            out("  esac")
            out("  return ret")
        out("}")
    out("")
    out('if [[ $zsh_eval_context[-1] == loadautofunc ]]; then')
    out(f'  _{fn} "$@"')
    out("else")
    out(f"  compdef _{fn} {prog}")
    out("fi")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# fish


def _fq(text: str) -> str:
    """Single-quote for fish."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


FISH_FUNCTIONS = r"""
function __{fn}_devices --description '{prog}: whole disks a drive may be'
    # USB sticks and SD cards (/dev/sdX, /dev/mmcblkN), attached loop devices, and their
    # /dev/disk/by-id names.  When none matches, complete file names.
    set -l cur (commandline -ct)
    set -l found
    for d in /dev/sd* /dev/mmcblk* /dev/loop* /dev/disk/by-id/*
        test -b $d; or continue
        if string match -q -- '/dev/disk/by-id/*' $d
            string match -qr -- '-part[0-9]+$' $d; and continue
        else if string match -qr -- '^/dev/loop[0-9]+$' $d
            test -e /sys/block/(string replace -- /dev/ '' $d)/loop/backing_file; or continue
        else
            string match -qr -- '^/dev/(sd[a-z]+|mmcblk[0-9]+)$' $d; or continue
        end
        string match -q -- "$cur*" $d; and set -a found $d
    end
    if set -q found[1]
        printf '%s\n' $found
    else
        __fish_complete_path $cur
    end
end

function __{fn}_devices_or_files --description '{prog}: a certificate file, or a drive'
    # A drive when the word starts with /dev/, else a file.
    set -l cur (commandline -ct)
    if string match -q -- '/dev/*' $cur
        __{fn}_devices
    else
        __fish_complete_path $cur
    end
end
"""


def fish(root: Cmd, prog: str) -> str:
    fn = _ident(prog, ())[1:]
    cmds = list(root.walk())
    key = "/".join  # a command's key: "" for the program, "flash", "group/sub"

    lines: list[str] = [f"# fish completion for {prog}"]
    out = lines.append
    for line in HEADER.splitlines():
        out(f"# {line}")
    out(FISH_FUNCTIONS.format(fn=fn, prog=prog).rstrip("\n"))
    out("")
    out(f"function __{fn}_state --description '{prog}: the command, then what the word is'")
    out("    # Prints the command's key (- for the program itself), then the name of the")
    out("    # argument being completed: @command, an argument's name, @value or @none.")
    out("    set -l tokens (commandline -opc)")
    out("    set -e tokens[1]")
    out("    set -l path -")
    out("    set -l npos 0")
    out("    set -l skip 0")
    out("    set -l dashdash 0")
    out("    for tok in $tokens")
    out("        if test $skip -gt 0")
    out("            set skip (math $skip - 1)")
    out("            continue")
    out("        end")
    out("        if test $dashdash -eq 0")
    out("            if test \"$tok\" = --")
    out("                set dashdash 1")
    out("                continue")
    out("            end")
    out("            if string match -q -- '-?*' $tok")
    out("                if not string match -q -- '*=*' $tok")
    out('                    switch "$path:$tok"')
    for cmd in cmds:
        for opt in cmd.options:
            if opt.nvalues:
                pats = " ".join(_fq(f"{key(cmd.path) or '-'}:{n}") for n in opt.names)
                out(f"                        case {pats}")
                out(f"                            set skip {opt.nvalues}")
    out("                    end")
    out("                end")
    out("                continue")
    out("            end")
    out("        end")
    groups = [c for c in cmds if c.is_group]
    if groups:
        out("        switch $path")
        for cmd in groups:
            out(f"            case {_fq(key(cmd.path) or '-')}")
            out("                switch $tok")
            names = " ".join(_fq(c.path[-1]) for c in cmd.commands)
            out(f"                    case {names}")
            if cmd.path:
                out('                        set path "$path/$tok"')
            else:
                out("                        set path $tok")
            out("                        set npos 0")
            out("                        set dashdash 0")
            out("                        continue")
            out("                end")
            out("                printf '%s\\n' $path @none")
            out("                return")
        out("        end")
    out("        set npos (math $npos + 1)")
    out("    end")
    out("    echo $path")
    out("    if test $skip -gt 0")
    out("        echo @value")
    out("        return")
    out("    end")
    out("    switch $path")
    for cmd in cmds:
        out(f"        case {_fq(key(cmd.path) or '-')}")
        if cmd.is_group:
            out("            echo @command")
            continue
        slots, rest = _arg_at(cmd.args)
        if not slots and not rest:
            out("            echo @none")
            continue
        out("            switch $npos")
        for i, arg in enumerate(slots):
            out(f"                case {i}")
            out(f"                    echo {_fq(arg.name)}")
        out("                case '*'")
        if len(rest) > 1:
            out(f"                    switch (math \"($npos - {len(slots)}) % {len(rest)}\")")
            for i, arg in enumerate(rest):
                out(f"                        case {i}")
                out(f"                            echo {_fq(arg.name)}")
            out("                    end")
        else:
            out(f"                    echo {_fq(rest[0].name) if rest else '@none'}")
        out("            end")
    out("    end")
    out("end")
    out("")
    out(f"function __{fn}_at --description '{prog}: is the word at this command (and argument)?'")
    out(f"    set -l state (__{fn}_state)")
    out('    test "$state[1]" = "$argv[1]"; or return 1')
    out('    set -q argv[2]; or return 0')
    out('    test "$state[2]" = "$argv[2]"')
    out("end")
    out("")
    out(f"complete -c {prog} -f")
    for cmd in cmds:
        k = key(cmd.path) or "-"
        out("")
        out(f"# {' '.join((prog, *cmd.path))}")
        cond = _fq(f"__{fn}_at {k}")
        for opt in cmd.options:
            parts = [f"complete -c {prog} -n {cond}"]
            for name in opt.names:
                if name.startswith("--"):
                    parts.append(f"-l {_fq(name[2:])}")
                elif len(name) == 2:
                    parts.append(f"-s {_fq(name[1:])}")
                else:
                    parts.append(f"-o {_fq(name[1:])}")
            if opt.nvalues:
                if opt.kind in ("file", "dir"):
                    parts.append("-r -F")
                elif opt.kind == "device":
                    parts.append(f"-x -a '(__{fn}_devices)'")
                elif opt.kind == "choice":
                    parts.append("-x -a " + _fq(" ".join(opt.choices)))
                else:
                    parts.append("-x")
            if opt.help:
                parts.append(f"-d {_fq(opt.help)}")
            out(" ".join(parts))
        if cmd.is_group:
            cond = _fq(f"__{fn}_at {k} @command")
            for sub in cmd.commands:
                desc = f" -d {_fq(sub.help)}" if sub.help else ""
                out(f"complete -c {prog} -n {cond} -a {_fq(sub.path[-1])}{desc}")
            continue
        seen: set[str] = set()
        for arg in cmd.args:
            if arg.name in seen or arg.kind == "none":
                continue
            seen.add(arg.name)
            cond = _fq(f"__{fn}_at {k} {arg.name}")
            if arg.kind in ("file", "dir"):
                out(f"complete -c {prog} -n {cond} -F")
            elif arg.kind == "device":
                out(f"complete -c {prog} -n {cond} -a '(__{fn}_devices)'")
            elif arg.kind == "device-or-file":
                out(f"complete -c {prog} -n {cond} -a '(__{fn}_devices_or_files)'")
            elif arg.kind == "choice":
                out(f"complete -c {prog} -n {cond} -a {_fq(' '.join(arg.choices))}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def render(command: click.Command | None = None, prog: str | None = None) -> dict[str, str]:
    """File name (in completions/) -> script text, for the CLI as it is now."""
    if command is None or prog is None:
        from popsicle_py import cli

        command = command or cli.main
        prog = prog or getattr(cli, "PROG", "popsicle-py")
    root = model(command, prog)
    return {FILES["bash"]: bash(root, prog), FILES["zsh"]: zsh(root, prog),
            FILES["fish"]: fish(root, prog)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a committed script is out of date")
    parser.add_argument("--output-dir", type=Path, default=HERE, help="default: completions/")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, text in render().items():
        target = args.output_dir / name
        current = target.read_text() if target.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            target.write_text(text)
            print(f"wrote {target}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run: python completions/generate.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
