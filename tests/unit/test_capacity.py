"""A processes rule the kernel's process map could never let fire is refused at load."""

from __future__ import annotations

import pytest

from monitor.config.load import load_config_text
from monitor.model.errors import ConfigError
from monitor.policy.load import check_capacity, load_policy_text

POLICY = """mode: enforce
rules:
  - name: fork-bomb
    event: processes
    action: kill-agent
    match:
      above: 2000
"""


def test_max_processes_below_a_processes_rule_is_refused_with_file_and_line() -> None:
    cfg = load_config_text("monitor: {max_processes: 1024}\n", "config.yaml")
    with pytest.raises(ConfigError) as e:
        check_capacity(cfg, load_policy_text(POLICY, "policy.yaml"))
    text = str(e.value)
    assert "policy.yaml:3" in text and "max_processes (1024, in config.yaml)" in text


def test_a_map_larger_than_every_processes_rule_is_accepted() -> None:
    cfg = load_config_text("monitor: {max_processes: 4096}\n", "config.yaml")
    check_capacity(cfg, load_policy_text(POLICY, "policy.yaml"))
