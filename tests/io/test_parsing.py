"""``terge.io.parsing.read_capped``: what a file that is not a regular file is called, and the
byte limit at its edge (every caller's message is built on these phrases)."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from terge.io import parsing
from terge.io.parsing import ParseProblem, is_float_number, loads_json, read_capped


def test_a_folder_is_named_a_folder(tmp_path):
    with pytest.raises(ParseProblem, match=r"^is a folder, not a regular file$"):
        read_capped(tmp_path, 100)


def test_a_pipe_is_named_a_pipe(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(ParseProblem, match=r"^is a pipe, not a regular file$"):
        read_capped(pipe, 100)


def test_a_socket_is_named_a_socket(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(ParseProblem, match=r"^is a socket, not a regular file$"):
            read_capped(path, 100)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_a_character_device_is_named_one():
    with pytest.raises(ParseProblem, match=r"^is a character device, not a regular file$"):
        read_capped("/dev/null", 100)


@pytest.mark.parametrize(
    ("mode", "name"),
    [(stat.S_IFBLK, "a block device"), (0, "not a regular file")],
    ids=["block device", "unknown kind"],
)
def test_other_kinds_are_named_by_their_mode(mode, name, monkeypatch):
    """A block device (which needs privileges to make) and a mode of no known kind, through a
    stat result standing in for the file's."""
    real = os.stat

    def fake(path, *args, **kwargs):
        result = list(real(path, *args, **kwargs))
        result[stat.ST_MODE] = mode | 0o644
        return os.stat_result(result)

    monkeypatch.setattr(parsing.os, "stat", fake)
    with pytest.raises(ParseProblem, match=rf"^is {name}, not a regular file$"):
        read_capped(__file__, 100)


@pytest.mark.parametrize("size", [0, 1, 99, 100])
def test_up_to_the_limit_is_read_whole(size, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(size)))
    assert read_capped(path, 100) == bytes(range(size))


@pytest.mark.parametrize("size", [101, 5000])
def test_one_byte_past_the_limit_is_refused(size, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * size)
    with pytest.raises(
        ParseProblem, match=r"^is larger than 100 bytes, more than such a file ever holds$"
    ):
        read_capped(path, 100)


def test_regular_false_reads_what_is_not_a_regular_file():
    """Recipes may come from a pipe or a device: with ``regular=False`` the kind is not checked,
    only the limit."""
    with pytest.raises(ParseProblem, match=r"larger than 10 bytes"):
        read_capped("/dev/zero", 10, regular=False)
    assert read_capped("/dev/null", 10, regular=False) == b""


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (0, True),
        (-3, True),
        (0.5, True),
        (1e308, True),
        (True, False),
        (False, False),
        ("1", False),
        (None, False),
        (float("nan"), False),
        (float("inf"), False),
        (int("9" * 400), False),
    ],
    ids=lambda v: repr(v)[:10],
)
def test_is_float_number(value, number):
    """A lineage's weights: a finite int or float, never a bool (JSON true is not 1.0), a
    string, a non-finite float or an int too large for a float."""
    assert is_float_number(value) is number


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"a": 1, "a": 2}', "a"),
        ('{"x": {"b": 1, "c": 2, "b": 3}}', "b"),  # nested
        ('[{"w": 1}, {"w": 2, "v": {"q": 1, "q": 1}}]', "q"),  # the same value twice too
        ('{"a": 1, "a": 2, "z": 0, "z": 0}', "a"),  # the first repeated key is named
    ],
)
def test_a_key_twice_in_one_object_is_refused(text, key):
    with pytest.raises(ParseProblem) as raised:
        loads_json(text, "the file")
    assert str(raised.value) == (
        f"the file gives the key {key!r} twice in one object (JSON keys must be unique: "
        "readers disagree on which value counts)"
    )


def test_the_same_key_in_different_objects_is_fine():
    assert loads_json('[{"a": 1}, {"a": 2, "b": {"a": 3}}]') == [{"a": 1}, {"a": 2, "b": {"a": 3}}]
