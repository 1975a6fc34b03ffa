"""Experiment config files (``configs/*.py``, ml_collections style): loading one by path,
deriving one from another, and refusing keys a config does not have.

A config file defines ``get_config(arg=None)`` returning a ConfigDict; ``path.py:arg`` picks a
variant, as ``config_flags.DEFINE_config_file`` does. ``configs/`` is not a package: files are
found by path, so a config deriving from another loads it with :func:`sibling`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from typing import Sequence

import ml_collections
from absl import app, flags


class ConfigError(ValueError):
    """A config that sets or overrides a key it does not have, or leaves one unset."""


def load_module(path: str) -> types.ModuleType:
    """The config file at ``path``, imported as a module (not added to ``sys.modules``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    name = "m2sa_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(file: str, name: str) -> types.ModuleType:
    """The config file ``name``.py in the folder of ``file`` (a config's ``__file__``)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py"))


def load(spec: str) -> ml_collections.ConfigDict:
    """``"configs/x.py"`` or ``"configs/x.py:variant"`` → its config, locked.

    Raises :class:`ConfigError` when the file (or its variant) sets a key its base lacks, or
    leaves a value the base marks with ``None`` unset.
    """
    path, _, variant = spec.partition(":")
    module = load_module(path)
    try:
        config = module.get_config(*([variant] if variant else []))
    except (AttributeError, KeyError) as e:
        if "does not exist" not in str(e):        # ml_collections' locked-config refusal
            raise
        raise ConfigError(f"{spec} sets a key its base config lacks: {_message(e)}") from e
    unset = unset_keys(config)
    if unset:
        raise ConfigError(f"{spec} leaves {', '.join(unset)} unset (None); every experiment "
                          f"sets these (configs/base.py)")
    config.lock()
    return config


def _message(e: BaseException) -> str:
    """ml_collections' refusal (the key, then the neighbours *with their values*, then a
    suggestion) as the key and the names of its neighbours."""
    text = e.args[0] if e.args else str(e)
    while isinstance(text, BaseException):       # ml_collections wraps a KeyError's text
        text = text.args[0] if text.args else str(text)
    text = str(text)
    m = re.search(r'Key "([^"]+)" does not exist.*?Other fields present: "\{(.*)\}"', text, re.S)
    if not m:
        return text
    known = re.findall(r"'(\w+)': ", m.group(2))
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f"{m.group(1)!r} is not a key there; its keys: {', '.join(sorted(known))}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))


def unset_keys(config, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that are ``None``."""
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += unset_keys(value, f"{prefix}{key}.")
        elif value is None:
            out.append(prefix + key)
    return out


def check_overrides(config, paths: Sequence[str], name: str = "config") -> None:
    """Raises :class:`ConfigError` for the first dotted path that is not a key of ``config``,
    listing the keys that exist where it went wrong."""
    for path in paths:
        node, walked = config, []
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(walked) or "the config"
                known = (", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict)
                         else f"none ({where} is a {type(node).__name__})")
                raise ConfigError(f"--{name}.{path}: {where} has no key {part!r}; its keys: {known}")
            node = node[part]
            walked.append(part)


def command_line_overrides(argv: Sequence[str], name: str = "config") -> tuple[str | None, list[str]]:
    """(the ``--config`` value or None, the dotted paths of its ``--config.<path>`` overrides)."""
    spec, paths = None, []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        for prefix in (f"--{name}", f"-{name}"):
            if arg == prefix and i + 1 < len(argv):
                spec = argv[i + 1]
            elif arg.startswith(prefix + "="):
                spec = arg[len(prefix) + 1:]
            elif arg.startswith(prefix + "."):
                paths.append(arg[len(prefix) + 1:].split("=", 1)[0])
        if arg.startswith(f"--no{name}."):                # --noconfig.flag (booleans)
            paths.append(arg[len(f"--no{name}."):])
    return spec, paths


def flags_parser(default: str | None = None, name: str = "config", program: str | None = None):
    """An ``app.run(..., flags_parser=...)`` that first loads the ``--config`` file and checks
    its overrides, so a misspelt key (``--config.train.lrr=1``) stops the program with the
    keys that exist, before anything runs (exit status 2).

    ``default``: the config file when the command line names none. It is given here, not to
    ``config_flags.DEFINE_config_file`` (define that flag with no default): a default there is
    loaded, with the command line's overrides, when the flag is defined, before any check.
    ``program``: the module (``__name__``) that defines the program's flags; ``--help`` then
    shows its docstring and flags even when ``__main__`` is an installed console script's stub
    (absl describes ``__main__`` only).
    """

    def parse(argv):
        if program is not None:
            _describe_in_help(program, name)
        spec, paths = command_line_overrides(argv[1:], name)
        if spec is None and default:
            spec = default
            argv = [argv[0], f"--{name}={default}", *argv[1:]]
        if spec:
            try:
                check_overrides(load(spec), paths, name)
            except (ConfigError, FileNotFoundError) as e:
                print(f"{os.path.basename(argv[0])}: {e}", file=sys.stderr)
                sys.exit(2)
        return app.parse_flags_with_usage(argv)

    return parse


def _describe_in_help(program: str, config_flag: str) -> None:
    main = sys.modules.get("__main__")
    if main is not None and not main.__doc__:
        main.__doc__ = sys.modules[program].__doc__
    own = flags.FLAGS.flags_by_module_dict().get(program, [])
    for flag in [*own, flags.FLAGS[config_flag]]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
