"""Unit tests for monitor.model.cmdline: one decoding for every byte a process hands over, the
comparison of a cut command line with /proc's, and the clips that bound what is kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.model import cmdline

ARGS = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")), max_size=12)


@given(st.binary(max_size=200))
def test_decoding_is_lossless_for_any_bytes(raw: bytes) -> None:
    assert cmdline.encode(cmdline.decode(raw)) == raw


def test_an_invalid_byte_is_one_surrogate_not_a_replacement_character() -> None:
    assert cmdline.decode(b"a\xffb") == "a\udcffb"
    assert cmdline.decode(b"\xc3") == "\udcc3"  # half of a two-byte character
    assert cmdline.c_string(b"sh\xff\0junk") == "sh\udcff"


@given(ARGS, st.integers(min_value=0, max_value=400))
def test_any_cut_of_a_command_line_continues_into_it(args: list[bytes], cut: int) -> None:
    """Whatever the bytes and wherever the probes' cut falls (inside a character too), the
    cut copy as the decoder gives it is recognised as the start of /proc's copy."""
    whole = b"".join(a + b"\0" for a in args)
    kept = whole[:cut]
    if not kept:
        return
    pieces = kept.split(b"\0")
    if kept.endswith(b"\0"):
        pieces.pop()
    assert cmdline.continues(whole, tuple(cmdline.decode(p) for p in pieces))


@pytest.mark.parametrize(("whole", "cut", "same"), [
    (b"ssh\0-o\0SendEnv=" + b"A" * 3000 + b"\0-R\0009:x:22\0h\0", ("ssh", "-o", "SendEnv=AAA"),
     True),
    (b"ssh\0-o\0SendEnv=\xff" + b"A" * 3000 + b"\0-R\0009:x:22\0",
     ("ssh", "-o", "SendEnv=\udcffAA"), True),  # an invalid byte in the kept part
    (b"ssh\0-oSendEnv=" + "é".encode() * 9 + b"\0-R\0", ("ssh", "-oSendEnv=\udcc3"), True),
    (b"x" * 3000 + b"\0", ("x" * 2559,), True),  # one argument, cut inside argv[0]
    (b"y" * 3000 + b"\0", ("x" * 2559,), False),  # another program since
    (b"ssh\0-o\0SendEnv=B\0", ("ssh", "-o", "SendEnv=AAA"), False),
    (b"ssh\0", ("ssh", "-o"), False),
    (b"ssh\0-o\0SendEnv=\xfe\0", ("ssh", "-o", "SendEnv=\udcff"), False),
    (b"", ("ssh",), False),
    (b"ssh\0", (), False),
])
def test_a_cut_copy_continues_only_into_the_same_bytes(whole: bytes, cut: tuple[str, ...],
                                                        same: bool) -> None:
    assert cmdline.continues(whole, cut) is same


def test_split_and_join() -> None:
    raw = b"node\0/opt/a.js\0--x=y z\0\xff\0"
    assert cmdline.split(raw) == ("node", "/opt/a.js", "--x=y z", "\udcff")
    assert cmdline.join(raw) == "node /opt/a.js --x=y z \udcff"
    assert cmdline.split(b"") == ()
    assert cmdline.split(b"a\0b") == ("a", "b")  # cut inside the last argument


def test_split_refuses_more_arguments_than_it_may_decode() -> None:
    raw = b"a\0" * 10
    assert cmdline.split(raw, max_args=10) == ("a",) * 10
    assert cmdline.split(raw, max_args=9) is None
    assert cmdline.join(raw) == " ".join("a" * 10)


def test_a_short_argv_is_kept_as_it_is() -> None:
    argv = ("git", "commit", "-m", "fix")
    assert cmdline.clip(argv) == argv
    assert cmdline.clip(argv, limit=18) == argv  # 3+1 + 6+1 + 2+1 + 3+1 characters


def kept_size(argv: tuple[str, ...]) -> int:
    return sum(len(a) + 1 for a in argv if not a.startswith("...["))


@pytest.mark.parametrize("argv", [
    ("ssh", "-o", "SendEnv=" + "A" * 6_000_000, "-R", "9000:localhost:22", "attacker"),
    ("ssh", *["-o", "SendEnv=A"] * 300_000, "-R", "9000:localhost:22", "attacker"),
])
def test_a_long_argv_keeps_its_head_and_tail_within_the_limit(argv: tuple[str, ...]) -> None:
    for clipped in (cmdline.clip(argv), cmdline.clip_block(cmdline.block(argv) + b"\0")):
        assert kept_size(clipped) <= cmdline.KEEP_CHARS + 2
        assert clipped[:2] == ("ssh", "-o")
        assert clipped[-3:] == ("-R", "9000:localhost:22", "attacker")  # the end shows
        (marker,) = [a for a in clipped if a.startswith("...[")]
        assert "not kept" in marker


def test_clip_block_never_splits_the_whole_block() -> None:
    raw = b"x\0" * 3_000_000  # 3 million arguments: split() would take seconds
    clipped = cmdline.clip_block(raw)
    assert kept_size(clipped) <= cmdline.KEEP_CHARS
    (marker,) = [a for a in clipped if a.startswith("...[")]
    assert marker == cmdline.omitted(len(raw) - cmdline.KEEP_CHARS, 3_000_000 - len(clipped) + 1)
