"""The ``fedhb`` command: ``fedhb fit --config configs/organamnist_epfl.yaml [--section.option value ...]``.

A mistake on the command line or in a config prints one ``fedhb: error: ...`` line that names the option and what is
allowed, then where to find every option; never jsonargparse's usage block or a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import sys
import textwrap
import warnings
from typing import Any

from fedhb.registry import PLUGINS, init_options, known_plugins, plugin_class

# Attribute docstrings of the option dataclasses become --help text.
os.environ.setdefault("JSONARGPARSE_DOCSTRING_PARSE_ATTRIBUTE_DOCSTRINGS", "true")

def _commands(help_only: bool = False) -> dict[str, Any]:
    """The commands; with ``help_only`` (``--help``) the algorithms stay unimported: they need torch, ``--help`` not."""
    import fedhb.algorithms
    import fedhb.data  # noqa: F401 - registers the datasets (no torch)
    from fedhb.fit import fit
    from fedhb.report import report

    if not help_only:
        fedhb.algorithms.load_all()  # jsonargparse finds ``--algorithm NAME`` among the imported subclasses
    return {"fit": fit, "report": report}


def _help_only(args: list[str]) -> bool:
    """Whether the command line is only ``[fit|report] --help``: with any other option (``--algorithm EPFL``, a
    ``--config``, ``--algorithm.help NAME``) jsonargparse resolves plug-in names, which needs them imported."""
    return any(a in ("-h", "--help") for a in args) and all(a in ("-h", "--help", "fit", "report") for a in args)


def _plugin_names() -> str:
    """The names ``--algorithm`` and ``--data`` accept, for the end of ``fedhb fit --help`` (imports no algorithm)."""
    import fedhb.algorithms
    from fedhb.registry import known_plugins

    def listing(names: list[str]) -> str:
        return textwrap.fill(", ".join(names), width=100, initial_indent="  ", subsequent_indent="  ")

    return (f"algorithms (--algorithm NAME; `fedhb fit --algorithm.help NAME` shows its options):\n"
            f"{listing(fedhb.algorithms.names())}\n"
            f"datasets (--data NAME; `fedhb fit --data.help NAME` shows its options):\n"
            f"{listing(known_plugins('data'))}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; user errors print one line (and a ``--help`` hint) and exit with status 2."""
    from jsonargparse import CLI, ArgumentError, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    args = list(sys.argv[1:] if argv is None else argv)
    help_only = _help_only(args)
    try:
        from fedhb.report import runs_as_options

        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # exit_on_error=False: jsonargparse raises instead of printing its usage block; fedhb words the error.
            CLI(_commands(help_only), args=runs_as_options(args), as_positional=False, exit_on_error=False,
                description="fedhb: federated learning benchmarks for healthcare on Lightning Fabric.")
    except SystemExit as done:  # --help printed: name the plug-ins (jsonargparse lists only the imported ones)
        if help_only and not done.code and args and args[0] == "fit":
            print(f"\n{_plugin_names()}")
        raise
    except ArgumentError as err:
        command = args[0] if args and args[0] in ("fit", "report") else None
        print(f"fedhb: error: {parse_error_message(str(err), args)}", file=sys.stderr)
        print(f"fedhb: run `fedhb {command + ' ' if command else ''}--help` for every option", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        print(f"fedhb: error: {_user_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first round: stop now, no traceback
        print("fedhb: interrupted; rounds up to the last checkpoint are kept (continue with the same command and "
              "--resume auto)", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # an Interrupted run stopped at a round boundary, checkpointed
        from fedhb.signals import Interrupted

        if not isinstance(err, Interrupted):
            raise
        print(f"fedhb: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


_default_show_warning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """fedhb's own warnings as one ``fedhb: warning: ...`` line, like the loop's; others as Python shows them."""
    if category.__module__.startswith("fedhb."):
        print(f"fedhb: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


def _user_message(err: Exception) -> str:
    """The message a user needs: for a plug-in option that fails validation, jsonargparse wraps fedhb's own error
    ("--data.size must be ...") in a list of Union alternatives; keep only fedhb's lines."""
    text = str(err)
    ours = [line.strip().removeprefix("- ").strip() for line in text.splitlines() if line.strip().startswith("- --")]
    return "\n".join(ours) if ours else text


# -- parse errors ---------------------------------------------------------------------------------------------------
def parse_error_message(text: str, args: list[str]) -> str:
    """One line for a jsonargparse parse error (the text of its ``ArgumentError``) of the command line ``args``.

    Unknown plug-in names and options get a suggestion and the known names; wrong types say what was expected; an
    error fedhb does not recognise keeps jsonargparse's own words, joined onto one line.
    """
    command = args[0] if args and args[0] in ("fit", "report") else None
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    where = f" in --config {configs[-1]}" if configs else ""
    key_match = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    key, rest = (key_match.group(1), key_match.group(2)) if key_match else (None, text)
    if key in PLUGINS:
        option = re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", rest)
        if option:
            return _unknown_plugin_option(key, option.group(1), option.group(2))
        name = _unknown_plugin_name(rest)
        if name is not None:
            return _unknown_plugin(key, name)
    if key == "config":
        missing = re.search(r"(?:File does not exist|Path is not a file): '(.*)'", rest)
        if missing:
            return f"--config {missing.group(1)}: no such file (give the path of a YAML config, e.g. configs/...)"
    if key is not None:
        expected = re.search(r"Expected a (.+?)\. Got value: (.*)", rest)
        if expected:
            return f"--{key}: expected {_type_words(expected.group(1))}, got {expected.group(2).strip()!r}"
        return f"--{key}: {_one_line(rest)}"
    not_accepted = re.fullmatch(r"(?:Subcommand '\w+' does not accept option|Option) '([^']+)'(?: is not accepted)?",
                                text.strip())
    if not_accepted:
        name = not_accepted.group(1)
        known = _options(command)
        hint = _did_you_mean(name, known) or _did_you_mean(name.split(".")[0], [k for k in known if "." not in k])
        return f"unknown key {name!r}{where}{hint}"
    unknown = re.match(r"unrecognized arguments: (.*)", text.strip())
    if unknown:
        flags = [w for w in unknown.group(1).split() if w.startswith("--")] or unknown.group(1).split()[:1]
        flag = flags[0].split("=")[0]
        hint = _did_you_mean(flag.removeprefix("--"), _options(command), prefix="--")
        return f"unknown option {flag}{hint}"
    if text.startswith("Problems parsing config"):
        problem = _one_line(text.removeprefix("Problems parsing config:")).replace(' in "<unicode string>",', " at")
        return f"--config {configs[-1]} is not valid YAML: {problem}" if configs else f"invalid config: {problem}"
    return _one_line(text)


def _one_line(text: str) -> str:
    return " ".join(line.strip().removeprefix("- ") for line in text.splitlines() if line.strip())


def _type_words(expected: str) -> str:
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", expected)
    if literal:
        return "one of " + ", ".join(str(v) for v in ast.literal_eval(f"[{literal.group(1)}]"))
    cls = re.fullmatch(r"<class '([\w.]+)'>", expected)
    name = cls.group(1) if cls else expected
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text",
            "tuple": "a list such as [0.4, 0.3, 0.3]", "list": "a list such as [a, b]"}.get(name, name)


def _unknown_plugin_name(rest: str) -> str | None:
    """The class name jsonargparse could not resolve, or ``None`` if the error is about something else."""
    for pattern in (r"Expected a dot import path string: (\S+)", r"Expected a path but (\S+) either not accessible"):
        found = re.search(pattern, rest)
        if found:
            return found.group(1)
    if "does not correspond to a subclass" in rest:
        given = re.search(r"Given value: (.*)", rest)
        if given:
            value = given.group(1).strip()
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
            return str(parsed.get("class_path")) if isinstance(parsed, dict) else str(parsed)
    return None


def _unknown_plugin(key: str, name: str) -> str:
    what = PLUGINS[key][0]
    known = known_plugins(key)
    short = name.rsplit(".", 1)[-1]
    for other in PLUGINS:
        if other != key and short in known_plugins(other):
            return (f"--{key}: {short} is {_a(PLUGINS[other][0])} (--{other} {short}), not {_a(what)}. "
                    f"Known: {', '.join(known)}")
    lower = {n.lower(): n for n in known}
    close = [short.lower()] if short.lower() in lower else difflib.get_close_matches(short.lower(), list(lower), n=3,
                                                                                      cutoff=0.6)
    hint = f"; did you mean {' or '.join(lower[c] for c in close)}?" if close else "."
    return f"--{key}: unknown {what} {name!r}{hint} Known: {', '.join(known)}"


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _unknown_plugin_option(key: str, class_path: str, option: str) -> str:
    name = class_path.rsplit(".", 1)[-1]
    if name == PLUGINS[key][2].rsplit(".", 1)[-1]:  # the base class: no --algorithm (or --data) was chosen
        having = [n for n in known_plugins(key) if option in init_options(plugin_class(key, n))]
        which = f" ({', '.join(having)} {'has' if len(having) == 1 else 'have'} it)" if having else ""
        return (f"--{key}.{option}: choose the {PLUGINS[key][0]} first, e.g. --{key} {having[0] if having else 'NAME'} "
                f"--{key}.{option} ...{which}")
    options = list(init_options(class_path))
    listing = ", ".join(options) if options else "none"
    return (f"--{key}.{option}: {name} has no option {option!r}{_did_you_mean(option, options, end='.')} "
            f"Its options: {listing} (`fedhb fit --{key}.help {name}` describes them)")


def _did_you_mean(name: str, known: list[str], prefix: str = "", end: str = "") -> str:
    """``; did you mean X?`` for the closest known name, else ``end``."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else end


def _options(command: str | None) -> list[str]:
    """Dotted option names of a command (``federation.rounds``, ``model.lora.r``, ...), read from its signature."""
    if command is None:
        return []
    function = _commands()[command]
    names: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                names.append(f"{prefix}.{f.name}")
                walk(f"{prefix}.{f.name}", getattr(value, f.name))

    for name, param in inspect.signature(function).parameters.items():
        names.append(name)
        walk(name, param.default)
    return names + ["config", "print_config"]
