"""Run-config and node-config values as a user types them: coercion and the shared checks."""

from __future__ import annotations

import math
import re

# The parser save_pretrained's max_shard_size goes through (transformers 5 hands the string to
# huggingface_hub's split_torch_state_dict_into_shards); not exported by huggingface_hub.
from huggingface_hub.serialization._base import parse_size_to_int

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A run-config or node-config value is missing or not allowed."""


def check_device(key: str, device: str) -> str:
    if not _DEVICE.match(device):
        raise ConfigError(f"{key} must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return device


def check_shard_size(size: str) -> None:
    """``max-shard-size`` as ``save_pretrained`` reads it (huggingface_hub's parser): a number
    and a unit of KB, MB, GB or TB (powers of 1000), positive."""
    try:
        limit = parse_size_to_int(size)
    except (ValueError, OverflowError):  # OverflowError: "infGB"
        limit = 0
    if limit <= 0:
        raise ConfigError(
            f"max-shard-size must be a positive size with a unit of KB, MB, GB or TB "
            f"(powers of 1000), such as '50GB' or '500MB'; got {size!r}"
        )


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value}")


def coerce(key: str, value: object, annotation: str) -> object:
    """Flower's TOML values are bool/int/float/str; accept what a user would reasonably type."""
    if annotation == "tuple[str, ...]":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a comma-separated string, got {value!r}")
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation == "int":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not is_finite(value)  # int() of inf or NaN raises rather than compares
            or int(value) != value
        ):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if annotation == "float | str" and isinstance(value, str):
        return value  # a word such as "auto"; its key's validator says which words it takes
    if annotation in ("float", "float | str"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        # TOML has inf and nan: an infinite timeout or limit would only fail (or hang) late.
        if not is_finite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def is_finite(value: int | float) -> bool:
    return isinstance(value, int) or math.isfinite(value)  # math.isfinite(10**400) overflows
