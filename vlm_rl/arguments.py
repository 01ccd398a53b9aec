"""Command-line flags and a YAML `--config` file -> one config dataclass, every name checked (`vlm-rl ppo|sft|train-reward`).

`parse_config(PPOConfig, argv, "vlm-rl ppo")`, in order:

1. `--config FILE` is read: a YAML mapping of field: value (an `env:` mapping sets environment variables, as TRL's
   parser does). A missing or unreadable file, bad YAML or a key given twice is a UserError naming it;
2. `translate` (optional) rewrites the flags and the file's values before any name is checked, or raises a UserError
   for a name it refuses: the place for a translation step in front of the check (`vlm-rl ppo` takes TRL GRPOConfig's
   names and recipes this way: vlm_rl/training/trl_names.py);
3. every flag and key must name a field of the config: otherwise one UserError names each unknown one, where it was
   given, and the closest field name;
4. the YAML values become the defaults, the flags override them, and each value is parsed by its field's type (TRL's
   parser); a bad value is a UserError naming the flag;
5. the dataclass is built; a ValueError of its own checks is a UserError.

`--help` lists `--config` first, then the fields group by group (the config's own first, then each base class's),
without the fields the config refuses (`refused_fields`, a class attribute: name -> what to use instead).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml
from trl import TrlParser

from vlm_rl.errors import UserError

CONFIG_FLAG = "--config"
Config = TypeVar("Config")


@dataclasses.dataclass(frozen=True)
class FileValue:
    """A value read from the YAML file, and where: `FILE, line N`."""

    value: Any
    where: str


# (flags, the file's values by field) -> the same in the config's own names; may raise a UserError naming a refused name
Translate = Callable[[list[str], dict[str, FileValue]], tuple[list[str], dict[str, FileValue]]]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag once, by its field's name (`--kl_coef KL_COEF`; the dashed spelling works too, unlisted)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


class ConfigParser(TrlParser):
    """TRL's dataclass parser with one-line errors, no abbreviated flags, grouped help and hidden refused fields."""

    def __init__(self, config_class: type, prog: str, hidden: Iterable[str] = ()):
        self.hidden = set(hidden)
        doc = (config_class.__doc__ or "").strip()
        super().__init__(
            config_class,
            prog=prog,
            usage=f"{prog} [{CONFIG_FLAG} FILE] [--FIELD VALUE ...]",
            description=doc.split("\n\n")[0].replace("\n", " ") if doc else None,
            epilog=f"Not listed: {len(self.hidden)} inherited fields this command does not use; given, they are refused "
            "with what to use instead." if self.hidden else None,
            formatter_class=HelpFormatter,
            allow_abbrev=False,
        )

    def _add_dataclass_arguments(self, dtype: type) -> None:
        self.add_argument(
            CONFIG_FLAG, metavar="FILE", default=argparse.SUPPRESS, help="a YAML file of FIELD: VALUE lines; flags given too override it"
        )
        hints = get_type_hints(dtype)
        for title, fields in field_groups(dtype):
            group = self.add_argument_group(title)
            for field in fields:
                field.type = hints[field.name]
                if field.name in self.hidden:
                    field = copy.copy(field)
                    field.metadata = types.MappingProxyType({**field.metadata, "help": argparse.SUPPRESS})
                self._parse_dataclass_field(group, field)

    def error(self, message: str):
        hint = f"; a config file goes after {CONFIG_FLAG}" if message.startswith("unrecognized") and ".y" in message else ""
        raise UserError(f"{message}{hint} (`{self.prog} --help` lists the flags)")

    def field_names(self) -> list[str]:
        return sorted({a.dest for a in self._actions if a.dest not in ("help", "config")})


def field_groups(dtype: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """The init fields of dataclass `dtype` grouped by the class that declares them last (the config's own first),
    each group in its class's declaration order, titled `package ClassName`."""
    fields = {f.name: f for f in dataclasses.fields(dtype) if f.init}
    groups, placed = [], set()
    for owner in dtype.__mro__:
        names = [n for n in vars(owner).get("__annotations__", {}) if n in fields and n not in placed]
        if names:
            groups.append((f"{owner.__module__.split('.')[0]} {owner.__name__}", [fields[n] for n in names]))
            placed.update(names)
    return groups


def pop_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the path after `--config`, or None; argv without it)."""
    for i, token in enumerate(argv):
        if token == CONFIG_FLAG:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"{CONFIG_FLAG} needs a file: {CONFIG_FLAG} FILE.yaml")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if token.startswith(CONFIG_FLAG + "="):
            return token.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def read_config_file(path: str) -> dict[str, FileValue]:
    """The top-level `key: value` pairs of a YAML file, each with its line; the `env:` mapping applied to os.environ."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{CONFIG_FLAG} {path}: " + ("is a directory, not a YAML file" if file.is_dir() else "no such file"))
    try:
        text = file.read_text(encoding="utf-8")
        root = yaml.compose(text)
        values = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}: a config file is a mapping of FIELD: VALUE lines, not a {type(values).__name__}")
    lines: dict[str, int] = {}
    for key_node, _ in root.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in lines:
            raise UserError(f"{path}, line {line}: {key!r} given twice (also line {lines[key]})")
        lines[key] = line
    settings = {str(k): FileValue(v, f"{path}, line {lines.get(str(k), '?')}") for k, v in values.items()}
    env = settings.pop("env", None)
    if env is not None:
        if not isinstance(env.value, dict):
            raise UserError(f"{env.where}: `env` is a mapping of environment variables (NAME: value)")
        os.environ.update({str(k): str(v) for k, v in env.value.items()})
    return settings


def flag_name(token: str) -> str | None:
    """`--kl_coef` / `--kl_coef=0.1` -> `kl_coef`; anything else (a value, `-h`) -> None."""
    return token[2:].split("=", 1)[0] if token.startswith("--") and len(token) > 2 else None


def merge_repeated_flag(argv: list[str], flag: str) -> list[str]:
    """`--reward a --reward b` -> `--reward a b`: argparse's nargs='+' would silently keep only the last one."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + [flag, *values] if values else rest


def closest(name: str, names: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(name.replace("-", "_"), names, n=1, cutoff=0.6)
    return match[0] if match else None


def check_names(parser: ConfigParser, argv: list[str], settings: dict[str, FileValue]) -> None:
    """A UserError naming every flag and YAML key that is no field, each with the closest field name."""
    fields, flags = parser.field_names(), parser._option_string_actions
    unknown = []
    for token in argv:
        name = flag_name(token)
        if name is not None and f"--{name}" not in flags:
            guess = closest(name, fields)
            unknown.append(f"--{name}" + (f" (did you mean --{guess}?)" if guess else ""))
    for key, value in settings.items():
        if key not in fields:
            guess = closest(key, fields)
            unknown.append(f"{key!r} in {value.where}" + (f" (did you mean {guess!r}?)" if guess else ""))
    if unknown:
        what = "unknown flag or key" if len(unknown) == 1 else "unknown flags or keys"
        raise UserError(f"{what}: {'; '.join(unknown)}. `{parser.prog} --help` lists them")


def parse_config(
    config_class: type[Config],
    argv: Sequence[str],
    prog: str,
    translate: Translate | None = None,
    repeatable: Iterable[str] = (),
) -> Config:
    """`config_class` from `argv` (flags and `--config FILE`), every name checked (see the module docstring).
    `repeatable`: list-valued flags that may be given several times (`--reward a --reward b`)."""
    path, argv = pop_config_flag(list(argv))
    settings = read_config_file(path) if path is not None else {}
    if translate is not None:
        argv, settings = translate(argv, settings)
    for flag in repeatable:
        argv = merge_repeated_flag(argv, flag)
    parser = ConfigParser(config_class, prog, hidden=getattr(config_class, "refused_fields", {}))
    check_names(parser, argv, settings)
    parser.set_defaults_with_config(**{key: value.value for key, value in settings.items()})
    namespace = parser.parse_args(argv)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_class) if f.init and hasattr(namespace, f.name)}
    try:
        return config_class(**values)
    except UserError:
        raise
    except ValueError as e:  # transformers' own checks of TrainingArguments: the user's combination of flags
        raise UserError(" ".join(str(e).split()) or type(e).__name__) from e
