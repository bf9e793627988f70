"""Fuzz tests of the policy and config loaders (issue 10): whatever text, bytes or YAML they
are given, they return a loaded object or raise ConfigError (exit code 2) whose every
problem names the file, in bounded time and memory, and a reload of such a file leaves the
running policy in force when it is refused.

Generated inputs: policy- and config-shaped documents (valid and not), YAML token soup
(anchors, aliases, merges, tags, flow and block nesting, long numbers, odd characters),
arbitrary text and arbitrary bytes. Each test runs a bounded number of examples with a
deadline, so the whole file takes a few seconds in CI.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.config.load import load_config, load_config_text
from monitor.config.types import Config
from monitor.config.yamlcompose import LOADER, compose
from monitor.model.errors import ConfigError
from monitor.policy.load import load_policy, load_policy_text
from monitor.policy.types import Policy

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
SRC = "fuzz.yaml"
PEAK_BYTES = 64 << 20  # what one load may allocate at most (a 1 MiB file, 4 MiB expanded)


def users(name: str) -> int:
    return {"agent": 1001}[name]


def loaded_or_refused(load: Any, data: Any, source: str = SRC) -> object | None:
    """The loaded object, or None after checking the ConfigError says where."""
    try:
        return load(data)
    except ConfigError as e:
        assert e.exit_code == 2
        assert e.problems
        for loc, reason in e.problems:
            assert loc.file == source and loc.line >= 0
            assert isinstance(reason, str) and 0 < len(reason) < 20_000
        return None


def policy_text(text: str) -> Policy:
    return load_policy_text(text, SRC, user_lookup=users)


def config_text(text: str) -> Config:
    return load_config_text(text, SRC, user_lookup=users)


# --- strategies ----------------------------------------------------------------------------

WORDS = ["mode", "monitor", "enforce", "agents", "lists", "rules", "name", "event", "exec",
         "connect", "cpu", "processes", "action", "alert", "deny", "kill", "kill-agent",
         "match", "argv", "exe", "ssh", "address", "port", "family", "outside", "cores",
         "scope", "for", "above", "comm", "cmdline", "user", "uid", "cgroup", "monitor",
         "alerts", "metrics", "listen", "history", "tick_seconds", "@ports", "agent",
         "remote_forward", "10.0.0.0/8", "::1", "443", "5555-5560", "/tmp/*", "10m"]
PATTERNS = ["(a+)+$", "(a)\\1", "(?=x)", "(?<!y)z", "a++", "[", "(?i)xmrig", "\\Z",
            "^ssh .* -R", "\\x{FFFD}", ".{1000}", "\\pL{1000}", "(?P<n>a)(?P=n)", ""]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS),
    st.sampled_from(PATTERNS), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=24)
rule = st.fixed_dictionaries(
    {}, optional={
        "name": st.sampled_from(["a", "b", "no-ssh", "Bad Name"]) | values,
        "event": st.sampled_from(["exec", "connect", "cpu", "processes", "nope"]) | values,
        "action": st.sampled_from(["alert", "deny", "kill", "kill-agent"]) | values,
        "agents": st.lists(st.sampled_from(["bot", "ci", "ghost"])) | values,
        "match": st.fixed_dictionaries({}, optional={
            "name": st.lists(st.sampled_from(["ssh", "xmrig", "a/b"])),
            "argv": st.lists(st.sampled_from(PATTERNS) | st.just("@pats")),
            "exe": st.lists(st.sampled_from(["/tmp/*", "relative", "/x[1"])),
            "ssh": st.lists(st.sampled_from(["remote_forward", "tunnel", "nope"])),
            "address": st.lists(st.sampled_from(["10.0.0.0/8", "::ffff:1.2.3.4", "x"])),
            "port": st.lists(st.sampled_from([22, "5555-5560", 0, "9-1", "@ports"])),
            "outside": values, "cores": values, "for": values, "scope": values,
            "above": values}) | values})
agent = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["bot", "ci", "Bad"]) | values,
    "match": st.lists(st.fixed_dictionaries({}, optional={
        "comm": st.sampled_from(["bot", "a-very-long-comm-name"]) | values,
        "cmdline": st.sampled_from(PATTERNS) | values,
        "exe": st.sampled_from(["/usr/bin/*", "x"]) | values,
        "user": st.sampled_from(["agent", "nobody-here"]) | values,
        "uid": values, "cgroup": values}), max_size=3) | values})
policy_doc = st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(["monitor", "enforce", "audit"]) | values,
    "agents": st.lists(agent, max_size=3) | values,
    "lists": st.dictionaries(st.sampled_from(["ports", "pats", "Bad"]),
                             st.lists(scalars, max_size=4) | values, max_size=3),
    "rules": st.lists(rule, max_size=4) | values,
    "extra": values})
config_doc = st.fixed_dictionaries({}, optional={
    "agents": st.lists(agent, max_size=3) | values,
    "monitor": st.dictionaries(st.sampled_from(["history", "tick_seconds", "ring_buffer_mib",
                                                "max_processes", "pin_dir", "audit_log"]),
                               values, max_size=4) | values,
    "alerts": st.dictionaries(st.sampled_from(["alertmanager_url", "webhook_url",
                                               "timeout_seconds", "instance"]),
                              values, max_size=3) | values,
    "metrics": st.dictionaries(st.just("listen"), values, max_size=1) | values,
    "extra": values})


@st.composite
def dumped(draw: st.DrawFn, doc: st.SearchStrategy[Any]) -> str:
    """A generated document as YAML, in block or flow style."""
    return yaml.safe_dump(draw(doc), default_flow_style=draw(st.sampled_from([None, True])),
                          allow_unicode=draw(st.booleans()))


TOKENS = ["mode: ", "monitor", "enforce", "rules:", "agents:", "lists:", "\n", "\n  ", "  ",
          "- ", "[", "]", "{", "}", ", ", ": ", "&a ", "&b ", "*a", "*b", "<<: *a", "<<: ",
          "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!binary ",
          "!!python/object:os.system ", "!custom ", "? ",
          "'", '"', "\\", "#", "|", ">", "\t", "---\n", "...\n", "%YAML 1.1\n", "0x", "0b",
          "0o", "1:2:3", "9" * 120, "1e999", ".nan", "~", "null", "yes", "\u0085",
          "\ufeff", "\x00", "\x1b[2J", "\udcff", "é", "name: a", "event: exec",
          "action: kill", "match: {argv: ['(a+)+$']}", "@ports", "(a)\\1", "[" * 70,
          "{a: " * 70, "- " * 70, "&a [*a]", "[*a, *a, *a, *a, *a, *a, *a, *a, *a]"]
soup = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)


# --- the loaders ---------------------------------------------------------------------------


@FUZZ
@given(dumped(policy_doc))
def test_generated_policies_load_or_are_refused_with_a_location(text: str) -> None:
    result = loaded_or_refused(policy_text, text)
    assert result is None or isinstance(result, Policy)


@FUZZ
@given(dumped(config_doc))
def test_generated_configs_load_or_are_refused_with_a_location(text: str) -> None:
    result = loaded_or_refused(config_text, text)
    assert result is None or isinstance(result, Config)


@FUZZ
@given(soup)
def test_yaml_token_soup_is_loaded_or_refused_in_bounded_memory(text: str) -> None:
    tracemalloc.start()
    try:
        loaded_or_refused(policy_text, text)
        loaded_or_refused(config_text, text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES


@FUZZ
@given(st.text(max_size=400))
def test_arbitrary_text_is_loaded_or_refused(text: str) -> None:
    loaded_or_refused(policy_text, text)
    loaded_or_refused(config_text, text)


@FUZZ
@given(st.binary(max_size=400) | soup.map(lambda t: t.encode("utf-8", "surrogateescape")))
def test_arbitrary_bytes_in_a_file_are_loaded_or_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    loaded_or_refused(lambda p: load_policy(p, user_lookup=users), path, str(path))
    loaded_or_refused(lambda p: load_config(p, user_lookup=users), path, str(path))


# --- reload --------------------------------------------------------------------------------


@FUZZ
@given(dumped(policy_doc) | soup)
def test_a_reload_keeps_the_running_policy_unless_the_new_one_loads(
        tmp_path: Path, text: str) -> None:
    from tests.support.monitor import rig

    r = rig(tmp_path)
    before = r.mon.policy.sha256
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    r.mon.reloads.loader = lambda: (r.mon.config, load_policy(path, user_lookup=users))
    if r.mon.reload_from_files():
        assert r.mon.policy.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        assert r.mon.policy.sha256 == before
        [refused] = r.log.find("policy reload refused")
        assert refused["reason"].startswith(f"{path}") and "traceback" not in refused


# --- the bounded composer builds what PyYAML's composer builds -------------------------------


def same_tree(ours: yaml.Node | None, theirs: yaml.Node | None,
              seen: dict[int, int] | None = None) -> bool:
    """Equal tags, scalar values, start lines and shape; aliases share nodes alike."""
    seen = {} if seen is None else seen
    if ours is None or theirs is None:
        return ours is theirs
    if id(ours) in seen:
        return seen[id(ours)] == id(theirs)
    seen[id(ours)] = id(theirs)
    if (type(ours), ours.tag, ours.start_mark.line) != (
            type(theirs), theirs.tag, theirs.start_mark.line):
        return False
    if isinstance(ours, yaml.ScalarNode):
        return bool(ours.value == theirs.value)
    if len(ours.value) != len(theirs.value):
        return False
    if isinstance(ours, yaml.MappingNode):
        return all(same_tree(k1, k2, seen) and same_tree(v1, v2, seen)
                   for (k1, v1), (k2, v2) in zip(ours.value, theirs.value, strict=True))
    return all(same_tree(a, b, seen) for a, b in zip(ours.value, theirs.value, strict=True))


@FUZZ
@given(dumped(policy_doc) | dumped(config_doc) | soup)
def test_the_bounded_composer_agrees_with_pyyaml(text: str) -> None:
    refused = False
    try:
        theirs = yaml.compose(text, Loader=LOADER)
    except (yaml.YAMLError, UnicodeEncodeError):
        theirs, refused = None, True
    if refused:
        try:
            compose(text, SRC)
        except ConfigError:
            return
        raise AssertionError(f"accepted what PyYAML refuses: {text!r}")
    try:
        ours = compose(text, SRC)
    except ConfigError as e:  # only a limit PyYAML does not have
        assert any(word in str(e) for word in ("nested deeper", "aliases", "larger than")), e
        return
    assert same_tree(ours, theirs)


def test_the_default_files_compose_alike() -> None:
    for name in ("policy.yaml", "config.yaml"):
        text = (Path(__file__).resolve().parents[2] / "monitor" / "defaults" / name).read_text()
        assert same_tree(compose(text, name), yaml.compose(text, Loader=LOADER))
