"""``key=value`` arguments of the small commands (``eval``, ``export``, ``embed``): known keys only, one-line errors."""

from __future__ import annotations

from typing import Any, Callable

from marginlab.errors import ConfigError

REQUIRED = object()


def run_command(doc: str, func: Callable[[list[str]], Any], args: list[str]) -> int:
    """A small command's ``main``: ``-h``/``--help`` prints its docstring, anything else runs ``func(args)``."""
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        return 0
    func(args)
    return 0


def as_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{key}={value!r} is not allowed: give true or false")


def as_optional_bool(key: str, value: str) -> bool | None:
    return None if value.strip().lower() in ("null", "none", "auto") else as_bool(key, value)


def as_positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{key}={value!r} is not allowed: give an integer >= 1")
    return number


def as_count(key: str, value: str) -> int:
    """An integer >= 0."""
    if not value.strip().isdigit():
        raise ConfigError(f"{key}={value!r} is not allowed: give an integer >= 0")
    return int(value)


def as_text(key: str, value: str) -> str:
    return value


def as_image_size(key: str, value: str) -> int | list[int]:
    """``112``, ``[112,96]`` or ``112,96`` (height, width)."""
    fields = [f for f in value.strip().strip("[]").replace(",", " ").split()]
    if len(fields) in (1, 2) and all(f.isdigit() and int(f) > 0 for f in fields):
        sizes = [int(f) for f in fields]
        return sizes[0] if len(sizes) == 1 else sizes
    raise ConfigError(f"{key}={value!r} is not allowed: give one integer or [height,width], e.g. {key}=112")


#: the options of a command that reads a bare backbone state dict (``marginlab.training.weights.state_dict_checkpoint``)
STATE_DICT_OPTIONS = {"backbone": (None, as_text), "image_size": (None, as_image_size)}


def one_of(*choices: str) -> Callable[[str, str], str]:
    def convert(key: str, value: str) -> str:
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(choices)}")
        return value

    return convert


def parse(command: str, args: list[str], spec: dict[str, tuple[Any, Callable[[str, str], Any]]]) -> dict:
    """``spec``: key -> (default or REQUIRED, converter(key, text)). A ConfigError for an unknown, repeated,
    malformed or missing argument, naming the command's keys."""
    known = ", ".join(f"{k}=" for k in spec)
    given: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"{command}: {arg!r} is not allowed: give key=value arguments ({known})")
        if key not in spec:
            raise ConfigError(f"{command}: unknown key {key!r}; the keys are {known}")
        if key in given:
            raise ConfigError(f"{command}: {key}= is given twice")
        given[key] = value
    out = {}
    for key, (default, convert) in spec.items():
        if key in given:
            out[key] = convert(key, given[key])
        elif default is REQUIRED:
            raise ConfigError(f"{command}: {key}= is missing; the keys are {known}")
        else:
            out[key] = default
    return out
