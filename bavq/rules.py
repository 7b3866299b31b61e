"""The vocabulary of configuration checks, a leaf module: :class:`ConfigError` and the one-line
``check`` / ``one_of`` helpers. :mod:`bavq.config` (each section's ``validate``) and the components
that own their rules (:mod:`bavq.quantizers.checks`) both import it, so neither imports the other
for validation and the import graph has no loop."""

from __future__ import annotations

QUANTIZERS = ("vq_ema", "ba_vq")


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the key."""


def check(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError "config key 'KEY': MSG" unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    check(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")
