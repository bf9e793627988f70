"""Load the monitor's configuration: file -> bounded YAML with lines -> validated -> Config.

The stages: read the file through a trusted path (monitor/config/safefile.py), decode it as
UTF-8, parse it as bounded YAML with line numbers (monitor/config/yamlsource.py), validate
and build it (monitor/config/validate.py), then raise every problem at once as one
ConfigError (exit code 2), each with its file, line and key path. Also the embedded
default config (monitor/defaults/config.yaml).

This module must never touch the kernel, BPF or /proc, never accept a config that silently
means something other than what it says, and never do work on import.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from monitor.config.safefile import read_file, utf8_text
from monitor.config.types import Config, UserLookup
from monitor.config.validate import ConfigReader
from monitor.config.validate_agents import pwd_lookup
from monitor.config.yamlsource import parse_yaml


def load_config_text(text: str, source: str = "<string>", *,
                     user_lookup: UserLookup | None = None) -> Config:
    """Parse and validate config text; raises ConfigError listing every problem."""
    root = parse_yaml(text, source)
    reader = ConfigReader(source, user_lookup or pwd_lookup)
    config = reader.config(root, source)
    reader.problems.raise_if_any()
    return config


def load_config(path: str | Path, *, user_lookup: UserLookup | None = None,
                trusted: bool = False) -> Config:
    """Read and validate a config file; raises ConfigError if unreadable or malformed.

    With trusted (the monitor runs as root), a file an agent could have changed is
    refused: see monitor/config/safefile.py. Every file is read bounded (no FIFO, no device).
    """
    source = str(path)
    data = read_file(path, what="config file", trusted=trusted)
    return load_config_text(utf8_text(data, source), source, user_lookup=user_lookup)


def default_config() -> Config:
    """The embedded default config (monitor/defaults/config.yaml)."""
    resource = importlib.resources.files("monitor.defaults").joinpath("config.yaml")
    return load_config_text(resource.read_text(encoding="utf-8"), str(resource))


def check_trusted(path: str | Path) -> None:
    """Refuse a config or policy file an agent could have edited (monitor/config/safefile.py):
    every component of its path, and of every symlink's target, must be root's and
    writable by nobody else, and it must be a regular file within the size cap. An agent
    that can edit the policy can allow itself anything. The loaders do this check on the
    descriptor they read from (``trusted=True``); this is for callers that only check."""
    read_file(path, what="file", trusted=True)
