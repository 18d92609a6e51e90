"""The method registry: name -> Method class. `kvbench methods` lists it; `build_method` makes one."""

from __future__ import annotations

from typing import Any

from kvbench.errors import KvbenchError, unknown_name_message
from kvbench.methods.base import Method, OptionSpec, option_flag

REGISTRY: dict[str, type[Method]] = {}


def register(method_class: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under its ``name``."""
    REGISTRY[method_class.name] = method_class
    return method_class


def get_method_class(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KvbenchError(unknown_name_message("method", name, sorted(REGISTRY))) from None


def methods_with_option(option_name: str) -> list[str]:
    return sorted(name for name, cls in REGISTRY.items() if any(s.name == option_name for s in cls.option_specs()))


def all_option_specs() -> dict[str, list[tuple[str, OptionSpec]]]:
    """Option name -> [(method name, its spec)] over every registered method."""
    specs: dict[str, list[tuple[str, OptionSpec]]] = {}
    for name in sorted(REGISTRY):
        for spec in REGISTRY[name].option_specs():
            specs.setdefault(spec.name, []).append((name, spec))
    return specs


def check_options_exist(names: list[str], options: dict[str, Any]) -> None:
    """Refuse an option that none of the methods ``names`` declares, naming the methods that do."""
    declared = {spec.name for name in names for spec in get_method_class(name).option_specs()}
    for key in options:
        if key not in declared:
            owners = methods_with_option(key)
            where = f"it is an option of {', '.join(owners)}" if owners else "no method has it"
            raise KvbenchError(f"{option_flag(key)} is not an option of {', '.join(names)} ({where}); "
                               "see `kvbench methods`")


def build_method(name: str, **options: Any) -> Method:
    """A configured method; options left at None take the method's defaults, undeclared options are refused."""
    method_class = get_method_class(name)
    given = {key: value for key, value in options.items() if value is not None}
    check_options_exist([name], given)
    return method_class(**given)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``windowkv:shared_layers=1:task_type=qa`` -> ("windowkv", {"shared_layers": 1, "task_type": "qa"}), each
    value parsed by the option's declared type; an undeclared option or a bad value is one error line."""
    name, *settings = spec.split(":")
    method_class = get_method_class(name.strip())
    specs = {option.name: option for option in method_class.option_specs()}
    options: dict[str, Any] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise KvbenchError(f"method spec {spec!r}: expected name:option=value[:option=value]")
        check_options_exist([method_class.name], {key: value})
        try:
            options[key] = specs[key].parse(value.strip())
        except KvbenchError as error:
            raise KvbenchError(f"method spec {spec!r}: {error}") from None
    return method_class.name, options


# Importing a method module registers it.
from kvbench.methods import elastic, fullkv, h2o, prefixkv, pyramidkv, snapkv, streamingllm, windowkv  # noqa: E402,F401
