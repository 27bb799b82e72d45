"""Validation before any work: every bad value fails with the key, the value and what is allowed.

``validate(cfg)`` returns the head resolved once (``HeadSpec``: its class, its arguments with the top-level
``m`` / ``s`` applied and typed, Partial FC's sample rate), which ``builders.build_model`` consumes as it is.
Nothing here imports the builder or the training loop: validation sits below them."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from marginlab.checks import check_dir_name
from marginlab.config.schema import LoggerConfig, TrainerConfig
from marginlab.errors import ConfigError

#: optimizer arguments that are rates or factors: a finite number >= 0 for every torch optimizer
NON_NEGATIVE_OPTIM = ("lr", "momentum", "weight_decay", "dampening", "eps", "alpha", "lr_decay")
#: optimizer arguments that are two averaging coefficients in [0, 1) (Adam's beta1, beta2; Kingma & Ba 2015, Alg. 1)
BETA_PAIRS_OPTIM = ("betas",)

#: arguments the builders pass themselves; a config must not set them
BUILDER_ARGS = {
    "head": ("in_features", "num_classes"),
    "backbone": ("in_channels", "image_size"),
    "regularizer": ("in_features", "num_classes"),
    "sched": ("total_steps", "steps_per_epoch"),
}


def import_target(path: str, key: str) -> Any:
    module_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported: {exc}") from None


def signature_params(target: Any) -> tuple[dict[str, Any], bool]:
    """Parameter annotations of a class's constructor (following **kwargs up the MRO) or of a function."""
    params: dict[str, Any] = {}
    if inspect.isclass(target):
        chain = [c.__init__ for c in inspect.getmro(target) if "__init__" in vars(c)]
    else:
        chain = [target]
    for func in chain:
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return params, True
        try:  # resolves string annotations (from __future__ import annotations)
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        open_kwargs = False
        for name, p in sig.parameters.items():
            if name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                open_kwargs = True
                continue
            params.setdefault(name, hints.get(name, p.annotation))
        if not open_kwargs or func is object.__init__:
            return params, open_kwargs
    return params, False


def _object_class(annotation: Any, value: Any) -> bool:
    """A class other than bool/int/float/str that ``value`` is not an instance of (e.g. ``torch.Tensor``)."""
    scalar = annotation in (bool, int, float, str)
    return inspect.isclass(annotation) and not scalar and not isinstance(value, annotation)


def _type_ok(value: Any, annotation: Any) -> str | None:
    """None when value fits the annotation, else the name of the expected type."""
    if value is None or annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        members = [a for a in args if a is not type(None)]
        if isinstance(value, (bool, int, float, str)):  # a config scalar never becomes a Tensor or other object
            members = [a for a in members if not _object_class(a, value)] or members
        names = [_type_ok(value, a) for a in members]
        return None if any(n is None for n in names) else " or ".join(n for n in names if n)
    if origin is typing.Literal:  # the same type and value as one of them (True is not 1); YAML spells them
        if any(type(value) is type(a) and value == a for a in args):
            return None
        return " or ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple):  # e.g. SphereFace-R's steps: list[int] (the items are the head's own check)
        return None if isinstance(value, (list, tuple)) else "a list"
    return None


def check_target_node(key: str, node: DictConfig, group: str | None = None) -> None:
    """Checks a ``_target_`` node's keys and value types against the signature of what it names."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key} must be a config with a _target_, got {node!r}")
    check_arguments(key, node, import_target(node._target_, key), group)


def check_arguments(
    key: str,
    node: DictConfig,
    target: Any,
    group: str | None = None,
    signature: tuple[dict[str, Any], bool] | None = None,
) -> None:
    """Checks the keys and value types of ``node`` against ``signature_params(target)`` (``signature``: already
    read)."""
    params, open_kwargs = signature or signature_params(target)
    reserved = BUILDER_ARGS.get(group or key, ())
    name = getattr(target, "__name__", str(target))
    for k in node:
        if str(k).startswith("_"):
            continue
        if k in reserved:
            raise ConfigError(f"{key}.{k} is set by marginlab itself (from the data and the backbone); remove it")
        if k not in params:
            if open_kwargs:
                continue
            allowed = ", ".join(p for p in params if p not in reserved) or "none"
            raise ConfigError(f"{key}.{k} is not a parameter of {name}; its parameters are: {allowed}")
        value = OmegaConf.to_object(node[k]) if isinstance(node[k], (DictConfig, ListConfig)) else node[k]
        expected = _type_ok(value, params[k])
        if expected:
            raise ConfigError(f"{key}.{k}={value!r} is not allowed: it must be {expected} ({name}.{k})")


def split_head(node: DictConfig) -> tuple[DictConfig, float | None]:
    """The head's own node (without ``partial_fc``) and Partial FC's ``sample_rate`` (None: Partial FC off)."""
    plain = OmegaConf.masked_copy(node, [k for k in node if k != "partial_fc"])
    pfc = node.get("partial_fc")
    rate = pfc.get("sample_rate") if isinstance(pfc, DictConfig) else pfc
    if isinstance(pfc, DictConfig) and set(pfc) - {"sample_rate"}:
        raise ConfigError(f"head.partial_fc has keys {sorted(pfc)}: its only key is sample_rate")
    if rate is None:
        return plain, None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ConfigError(
            f"head.partial_fc.sample_rate={rate!r} is not allowed: it must lie in (0, 1] "
            "(the share of each rank's classes in the softmax; null turns Partial FC off)"
        )
    return plain, float(rate)


@dataclass(frozen=True)
class HeadSpec:
    """The head as validation resolved it, and all the builder needs: ``cls(**kwargs, in_features=D,
    num_classes=C)``, sharded by Partial FC when ``sample_rate`` is set (None: off)."""

    cls: type
    kwargs: dict[str, Any]  # plain Python values, the top-level m / s applied and typed
    sample_rate: float | None = None

    @property
    def name(self) -> str:
        return self.cls.__name__


def shorthand_value(value: Any, annotation: Any) -> Any:
    """The top-level ``m`` / ``s`` as the head's parameter takes it.

    The shorthand is typed float (m=0.35); an integer margin (L-Softmax, SphereFace: m=4) takes a whole number
    as int, and a fraction is left as it is for the signature check to refuse with the head's type."""
    kinds = typing.get_args(annotation) or (annotation,)
    if int in kinds and float not in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def resolve_head(node: DictConfig, m: float | None = None, s: float | None = None) -> HeadSpec:
    """``head`` (and the top-level ``m`` / ``s``, null: the head's own value) -> the HeadSpec the builder
    consumes. The head class is imported and its signature read once; a shorthand is written into ``node``
    too, so the saved config records what the head got."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"head must be a config with a _target_, got {node!r}")
    cls = import_target(node._target_, "head")
    signature = signature_params(cls)
    params = signature[0]
    for short, value in (("m", m), ("s", s)):
        if value is None:
            continue
        if short not in params:
            allowed = ", ".join(p for p in params if p not in BUILDER_ARGS["head"])
            raise ConfigError(
                f"{short}={value!r} was given but the head {cls.__name__} has no parameter "
                f"{short!r}; its parameters are: {allowed}"
            )
        node[short] = shorthand_value(value, params[short])
    plain, sample_rate = split_head(node)
    builder_keys = {"partial_fc"}  # keys of the node that are not the class's arguments
    if "chunked" in plain and "chunked" not in params and not signature[1]:
        from marginlab.heads.base import check_chunked_key  # imports torch: not on `--help`'s path

        check_chunked_key(cls, plain.chunked)  # a head without the chunked loss: false, its only behaviour, or refused
        builder_keys.add("chunked")
        plain = OmegaConf.masked_copy(plain, [k for k in plain if k != "chunked"])
    check_arguments("head", plain, cls, signature=signature)
    if sample_rate is not None:
        from marginlab.distributed.partial_fc import check_head_class  # imports torch: not on `--help`'s path

        check_head_class(cls)
    kwargs = {
        k: v
        for k, v in OmegaConf.to_container(node, resolve=True).items()
        if k not in builder_keys and not str(k).startswith("_")
    }
    return HeadSpec(cls, kwargs, sample_rate)


def _unit_pair(value: Any) -> bool:
    """Two numbers (not booleans), each in [0, 1)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in value)
    )


def check_optimizer(node: DictConfig) -> None:
    """``optim.*``: the rates and factors every torch optimizer takes are finite numbers >= 0; then the optimizer
    is made on one dummy parameter, so its own checks (betas, nesterov, ...) fail here, before any work."""
    for key in NON_NEGATIVE_OPTIM:
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
            raise ConfigError(f"optim.{key}={value!r} is not allowed: it must be a finite number >= 0")
    for key in BETA_PAIRS_OPTIM:  # torch indexes them unchecked: betas=[0.9] would be an IndexError
        value = node.get(key)
        value = OmegaConf.to_object(value) if isinstance(value, ListConfig) else value
        if key in node and not _unit_pair(value):
            raise ConfigError(
                f"optim.{key}={value!r} is not allowed: it must be two numbers in [0, 1), e.g. {key}=[0.9,0.999]"
            )
    import torch  # not on `--help`'s path

    make = import_target(node._target_, "optim")
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not str(k).startswith("_")}
    try:
        make([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError, IndexError) as exc:  # IndexError: a pair argument given one value
        lists = ", ".join(f"optim.{k}={v!r}" for k, v in kwargs.items() if isinstance(v, list))
        shown = f"{exc} ({lists})" if isinstance(exc, IndexError) and lists else exc
        raise ConfigError(f"optim ({node.get('_target_')}) does not accept its values: {shown}") from None


def validate(cfg: DictConfig) -> HeadSpec:
    """Checks the whole config (raising ConfigError on the first bad value) and returns the resolved head."""
    for group, schema in (("trainer", TrainerConfig), ("logger", LoggerConfig)):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in cfg[group]:  # `+trainer.epoch=1` adds a key nothing reads: refuse it, not ignore it
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f": did you mean '{group}.{near[0]}'?" if near else ""
                raise ConfigError(
                    f"unknown key '{group}.{key}': nothing reads it{hint}; keys of {group}: {', '.join(known)}"
                )
    # trainer.precision, best_on and device are enums (config/schema.py): OmegaConf refused a bad one already
    index, kind = cfg.trainer.get("device_index"), str(cfg.trainer.device)
    if index is not None and kind != "cuda":
        raise ConfigError(f"trainer.device_index={index} picks a GPU, so it needs trainer.device=cuda (not {kind})")
    if index is not None and index < 0:
        raise ConfigError(f"trainer.device_index={index} is not allowed: choose 0 or more (null: the current GPU)")
    for key, low in (
        ("trainer.epochs", 1),
        ("trainer.eval_every_n_epochs", 1),
        ("trainer.max_nonfinite_steps", 1),
        ("logger.log_every_n_steps", 1),
        ("logger.probe_max_samples", 1),
    ):
        value = OmegaConf.select(cfg, key)
        if value < low:
            raise ConfigError(f"{key}={value!r} is not allowed: it must be an integer >= {low}")
    threads = cfg.trainer.get("num_threads")
    if threads is not None and threads < 1:
        raise ConfigError(f"trainer.num_threads={threads!r} is not allowed: it must be an integer >= 1 (or null)")
    stop, epochs = cfg.trainer.get("stop_after_epoch"), cfg.trainer.epochs
    if stop is not None and not 1 <= stop <= epochs:  # 0 trained every epoch, -1 none; past the end stops nothing
        raise ConfigError(
            f"trainer.stop_after_epoch={stop!r} is not allowed: it must be null or an integer from 1 to "
            f"trainer.epochs={epochs} (the epoch after which this invocation stops; resume= continues the run)"
        )
    if cfg.get("name") is not None:
        check_dir_name("name", cfg.name)
    for key in ("trainer.grad_clip", "trainer.head_weight_decay"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value!r} is not allowed: it must be >= 0 (or null)")
    for key in ("backbone", "head", "dataset", "optim", "sched"):
        if cfg.get(key) is None:
            raise ConfigError(f"no {key} selected: choose one with {key}=<name> (see `marginlab train --help`)")
    check_target_node("backbone", cfg.backbone)
    head = resolve_head(cfg.head, m=cfg.get("m"), s=cfg.get("s"))
    for key in ("dataset", "optim", "sched"):
        check_target_node(key, cfg[key])
    if head.sample_rate is not None and cfg.get("regularizer"):
        raise ConfigError(
            f"regularizer={list(cfg.regularizer)} cannot be combined with head.partial_fc: the sharded "
            "head computes the loss itself and no rank holds all logits or class centres; "
            "drop the regularizer or set head.partial_fc.sample_rate=null"
        )
    check_optimizer(cfg.optim)
    for name, node in (cfg.get("regularizer") or {}).items():
        check_target_node(f"regularizer.{name}", node, group="regularizer")
    return head
