"""benchmarks.ship: split a file into pieces plus a manifest, join and verify it on the other side."""

from __future__ import annotations

import json

import pytest

from benchmarks.ship import MANIFEST, ShipError, join, main, split


@pytest.mark.parametrize("size", [0, 1000, 1024, 2500])
def test_split_then_join_gives_the_same_bytes(tmp_path, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    (tmp_path / "model.gguf").write_bytes(data)
    manifest = split(tmp_path / "model.gguf", tmp_path / "ship", piece_bytes=512)
    assert all(p["size"] <= 512 for p in manifest["pieces"]) and manifest["size"] == size
    assert len(manifest["pieces"]) == max(1, -(-size // 512))
    join(tmp_path / "ship", tmp_path / "back" / "model.gguf")
    assert (tmp_path / "back" / "model.gguf").read_bytes() == data


def test_a_corrupt_or_missing_piece_is_refused_and_leaves_no_file(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 3000)
    split(tmp_path / "f.bin", tmp_path / "ship", piece_bytes=1024)
    (tmp_path / "ship" / "f.bin.001").write_bytes(b"y" * 1024)
    with pytest.raises(ShipError, match="f.bin.001 is corrupt"):
        join(tmp_path / "ship", tmp_path / "out.bin")
    (tmp_path / "ship" / "f.bin.002").unlink()
    with pytest.raises(ShipError, match="f.bin.002 is missing"):
        join(tmp_path / "ship", tmp_path / "out.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "ship"]


def test_cli_refuses_pieces_over_55_mb(tmp_path, capsys):
    (tmp_path / "f.bin").write_bytes(b"x")
    assert main(["split", str(tmp_path / "f.bin"), "--out", str(tmp_path / "s"), "--piece-mib", "60"]) == 1
    assert "piece size" in capsys.readouterr().err
    assert main(["split", str(tmp_path / "f.bin"), "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["pieces"][0]["size"] == 1
