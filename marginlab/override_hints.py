"""Did-you-mean for a misspelled override: ``trainer.epoch=1`` -> did you mean 'trainer.epochs'? (issue #15).

Hydra says "Could not override 'trainer.epoch'. To append to your config use +trainer.epoch=1 (Key 'epoch' not in
'TrainerConfig')", and its advice adds a key nothing reads. OmegaConf's error carries the node the key was looked
up in, so the close matches (``difflib.get_close_matches``) and the valid keys come from the composed config
itself; a misspelled group option (``head=arcfac``) gets the same from Hydra's own list of options.
"""

from __future__ import annotations

import difflib
import re


def close(word: str, choices: list[str], prefix: str = "") -> str:
    """``did you mean 'x'?`` (the closest of ``choices``) with ``prefix`` in front; "" when nothing is close."""
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {prefix + found[0]!r}?" if found else ""


def unknown_key_message(err: BaseException, cause_text: str) -> str | None:
    """One line for an override of a key the config does not have (``cause_text``: OmegaConf's own words),
    else None."""
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__ if err.__cause__ is not None else err
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not isinstance(cause.parent_node, DictConfig):
        return None
    key, full_key = str(cause.key), str(cause.full_key or cause.key)
    parent = full_key[: -len(key)].rstrip(".") if full_key.endswith(key) else ""
    valid = [str(k) for k in cause.parent_node if not str(k).startswith("_") and str(k) != "hydra"]
    hint = close(key, valid, prefix=f"{parent}." if parent else "")
    keys_of = f"keys of {parent}" if parent else "top-level keys and config groups"
    return f"unknown key {full_key!r} ({cause_text}): {hint + ' ' if hint else ''}{keys_of}: {', '.join(valid)}"


def unknown_option_hint(err: BaseException) -> str | None:
    """``did you mean 'head=arcface'?`` for ``head=arcfac`` (Hydra lists the options itself), else None."""
    from hydra.errors import MissingConfigException

    if not isinstance(err, MissingConfigException) or not err.options or not err.missing_cfg_file:
        return None
    group, _, option = str(err.missing_cfg_file).rpartition("/")
    return close(option, [str(o) for o in err.options], prefix=f"{group}=") or None if group else None


def with_hint(err: BaseException, text: str) -> str:
    """``text`` (Hydra's message, as ``error_kinds.describe_config_error`` puts it) with the did-you-mean added."""
    cause = err.__cause__ if err.__cause__ is not None else err
    own_words = "; ".join(
        line.strip()
        for line in str(cause).splitlines()
        if line.strip() and not line.strip().startswith(("object_type=", "reference_type="))
    )
    message = unknown_key_message(err, own_words)
    if message is not None:
        return message
    gpu = re.search(r"\btrainer\.device=cuda:(\d+)\b", text)  # the spelling from before device_index
    if gpu is not None:
        return f"{text}; pick the GPU with trainer.device=cuda trainer.device_index={gpu[1]}"
    hint = unknown_option_hint(err)
    if hint is None:
        return text
    first, newline, rest = text.partition("\n") if "\n" in text else text.partition(" Available options")
    return f"{first}; {hint}{newline}{rest}"
