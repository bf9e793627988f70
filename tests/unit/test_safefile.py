"""Unit tests for monitor.config.safefile: the trusted path walk, what a config or policy file may
be, and reading bounded from the checked descriptor.

Without root, files cannot be made root's, so the walk is tested with owners = {root, this
user}; the same walk as root, with a real unprivileged agent user, is in
tests/kernel/test_cli.py and tests/kernel/test_service.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from timebox import within

from monitor.config.safefile import MAX_FILE_BYTES, read_file
from monitor.model.errors import ConfigError
from monitor.policy.load import load_policy

ME = frozenset({0, os.geteuid()})
POLICY = b"mode: monitor\n"


def trusted(path: Path | str) -> bytes:
    return read_file(path, what="policy file", trusted=True, owners=ME)


def refusal(path: Path | str, *, is_trusted: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        read_file(path, what="policy file", trusted=is_trusted, owners=ME)
    [(loc, reason)] = info.value.problems
    assert (loc.file, loc.line) == (str(path), 0)
    assert info.value.exit_code == 2
    return reason


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A directory only its owner may write, holding a good policy file."""
    tmp_path.chmod(0o755)
    (tmp_path / "policy.yaml").write_bytes(POLICY)
    (tmp_path / "policy.yaml").chmod(0o644)
    return tmp_path


def test_a_file_on_a_trusted_path_is_read(etc: Path) -> None:
    assert trusted(etc / "policy.yaml") == POLICY


def test_a_relative_path_is_walked_from_the_working_directory(
        etc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(etc)
    assert trusted("policy.yaml") == POLICY
    (etc / "sub").mkdir()
    assert trusted("./sub/../policy.yaml") == POLICY


def test_a_file_others_can_write_is_refused(etc: Path) -> None:
    (etc / "policy.yaml").chmod(0o666)
    reason = refusal(etc / "policy.yaml")
    assert f"the policy file {etc}/policy.yaml must be owned by root and writable by " \
           "nobody else" in reason and "mode 0666" in reason and "chmod go-w" in reason


def test_any_directory_on_the_way_that_others_can_write_is_refused(etc: Path) -> None:
    deep = etc / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "policy.yaml").write_bytes(POLICY)
    (etc / "a").chmod(0o777)  # not the file's own directory: the one above it
    reason = refusal(deep / "policy.yaml")
    assert f"the directory {etc}/a must be owned by root" in reason


def test_a_symlink_in_a_directory_others_can_write_is_refused(etc: Path) -> None:
    # the link points at a good file, but whoever can write its directory can point it
    # at another one at any time (the old check followed the link and accepted it)
    agent_dir = etc / "agent"
    agent_dir.mkdir()
    (agent_dir / "policy.yaml").symlink_to(etc / "policy.yaml")
    agent_dir.chmod(0o777)
    reason = refusal(agent_dir / "policy.yaml")
    assert f"the directory {agent_dir} must be owned by root" in reason


def test_a_symlink_into_a_directory_others_can_write_is_refused(etc: Path) -> None:
    agent_dir = etc / "agent"
    agent_dir.mkdir()
    (agent_dir / "real.yaml").write_bytes(POLICY)
    agent_dir.chmod(0o777)
    (etc / "policy.yaml").unlink()
    (etc / "policy.yaml").symlink_to("agent/real.yaml")
    reason = refusal(etc / "policy.yaml")
    assert f"the directory {agent_dir} must be owned by root" in reason


def test_symlinks_on_a_trusted_path_are_followed_relative_and_absolute(etc: Path) -> None:
    (etc / "conf").mkdir()
    (etc / "conf" / "rel.yaml").symlink_to("../policy.yaml")
    (etc / "abs").symlink_to(etc / "conf")
    assert trusted(etc / "abs" / "rel.yaml") == POLICY


def test_a_symlink_loop_is_refused(etc: Path) -> None:
    (etc / "a").symlink_to("b")
    (etc / "b").symlink_to("a")
    assert "more than 40 symlinks" in refusal(etc / "a")


def test_a_sticky_directory_is_allowed_when_the_entry_is_trusted(etc: Path) -> None:
    shared = etc / "shared"
    shared.mkdir()
    (shared / "policy.yaml").write_bytes(POLICY)
    shared.chmod(0o1777)  # like /tmp: nobody can remove or rename another's entry
    assert trusted(shared / "policy.yaml") == POLICY
    shared.chmod(0o777)
    assert f"the directory {shared} must be owned by root" in refusal(shared / "policy.yaml")


@pytest.mark.parametrize("is_trusted", [True, False])
def test_a_fifo_is_refused_at_once(etc: Path, is_trusted: bool) -> None:
    fifo = etc / "pipe.yaml"
    os.mkfifo(fifo, 0o644)
    reason = within(10, lambda: refusal(fifo, is_trusted=is_trusted))
    assert "is a FIFO (named pipe), not a regular file" in reason


@pytest.mark.parametrize("is_trusted", [True, False])
def test_devices_and_directories_are_refused(etc: Path, is_trusted: bool) -> None:
    assert "is a character device" in refusal("/dev/null", is_trusted=is_trusted)
    assert "is a directory" in refusal(etc, is_trusted=is_trusted)


@pytest.mark.parametrize("is_trusted", [True, False])
def test_a_file_over_the_size_cap_is_refused_before_it_is_read(etc: Path,
                                                               is_trusted: bool) -> None:
    path = etc / "policy.yaml"
    path.write_bytes(b"#" * MAX_FILE_BYTES)
    assert len(read_file(path, trusted=is_trusted, owners=ME)) == MAX_FILE_BYTES
    with path.open("ab") as f:
        f.write(b"\n")
    assert f"larger than 1 MiB ({MAX_FILE_BYTES + 1} bytes)" in refusal(
        path, is_trusted=is_trusted)


def test_a_missing_component_is_named(etc: Path) -> None:
    reason = refusal(etc / "nope" / "policy.yaml")
    assert f"No such file or directory: {etc}/nope" in reason


def test_untrusted_reading_follows_symlinks(etc: Path) -> None:
    (etc / "link.yaml").symlink_to(etc / "policy.yaml")
    assert read_file(etc / "link.yaml") == POLICY


def test_the_policy_loader_reads_through_the_check(etc: Path) -> None:
    (etc / "policy.yaml").chmod(0o666)
    if os.geteuid() == 0:
        with pytest.raises(ConfigError, match="writable by nobody else"):
            load_policy(etc / "policy.yaml", trusted=True)
    assert load_policy(etc / "policy.yaml").mode.value == "monitor"  # not as root
