"""benchmarks.ship: split a file into pieces plus a manifest, join and verify it on the other side."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

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


def _bundle(tmp_path, name: str, piece_bytes: int = 4000):
    """A bundle as make_bundle.sh writes it: a tar of data.tar and a GGUF, split, with SHA256 and the piece count."""

    def tar_of(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path, data in files.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    bundle = tar_of({"data.tar": tar_of({f"data/{name}.txt": name.encode() * 3000}), f"{name}.gguf": b"g" * 100})
    folder = tmp_path / "bundles" / name
    folder.mkdir(parents=True)
    pieces = [bundle[i : i + piece_bytes] for i in range(0, len(bundle), piece_bytes)]
    for i, piece in enumerate(pieces):
        (folder / f"part{i:02d}").write_bytes(piece)
    (folder / "SHA256").write_text(f"{hashlib.sha256(bundle).hexdigest()}\npieces {len(pieces)}\n")
    return folder


def _carry_one_piece(tmp_path, bundle, part: str) -> str:
    """One device call: its tree holds one piece and the SHA256; it sources unpack.sh and says whether it is ready."""
    carried = tmp_path / "call" / bundle.name
    shutil.rmtree(carried, ignore_errors=True)
    carried.mkdir(parents=True)
    for name in (part, "SHA256"):
        shutil.copy(bundle / name, carried / name)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "unpack.sh"
    done = subprocess.run(
        ["bash", "-c", f'source "{script}" "{carried}" >/dev/null; echo $BUNDLE_READY'],
        env={"PATH": "/usr/bin:/bin", "UNPACK_ROOT": str(tmp_path / "device_tmp")},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_two_bundles_carried_one_after_the_other_in_one_lease_both_unpack(tmp_path):
    # A lease that shipped Qwen's bundle3 then SmolLM2's bundle2 found the second one "ready" at once (the first
    # one's marker) with its pieces never kept (same names as the first one's): each bundle now has its own.
    first, second = _bundle(tmp_path, "qwen"), _bundle(tmp_path, "smol")
    for bundle in (first, second):
        parts = sorted(p.name for p in bundle.glob("part*"))
        assert len(parts) >= 3
        states = [_carry_one_piece(tmp_path, bundle, part) for part in parts]
        assert states == ["0"] * (len(parts) - 1) + ["1"]
    device = tmp_path / "device_tmp"
    assert (device / "b" / "data" / "qwen.txt").read_bytes() == b"qwen" * 3000
    assert (device / "b" / "data" / "smol.txt").read_bytes() == b"smol" * 3000
    assert sorted(p.name for p in (device / "cache" / "downloads").iterdir()) == ["qwen.gguf", "smol.gguf"]


def test_a_bundle_whose_pieces_do_not_match_its_sha256_is_not_unpacked(tmp_path):
    bundle = _bundle(tmp_path, "qwen")
    (bundle / "part01").write_bytes(b"x" * 4000)
    states = [_carry_one_piece(tmp_path, bundle, p.name) for p in sorted(bundle.glob("part*"))]
    assert set(states) == {"0"}
    assert not (tmp_path / "device_tmp" / "b" / "data").exists()


def _lease(tmp_path, bundle, part: str, budget: int) -> str:
    """A device call sourcing lease.sh with one carried piece: what it prints, and AFTER if the script goes on."""
    carried = tmp_path / "call" / bundle.name
    shutil.rmtree(carried, ignore_errors=True)
    carried.mkdir(parents=True)
    for name in (part, "SHA256"):
        shutil.copy(bundle / name, carried / name)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", "-c", f'source benchmarks/gpu/lease.sh "{carried}" {budget} 30; echo "AFTER $(( deadline - $(date +%s) ))"'],
        cwd=repo, env={"PATH": "/usr/bin:/bin", "UNPACK_ROOT": str(tmp_path / "device_tmp")},
        capture_output=True, text=True, check=True,
    )
    return done.stdout


def test_a_lease_goes_on_to_its_phases_only_with_a_budget_and_the_whole_bundle(tmp_path):
    bundle = _bundle(tmp_path, "smol")
    parts = sorted(p.name for p in bundle.glob("part*"))
    assert "AFTER" not in _lease(tmp_path, bundle, parts[0], 0)  # a piece call: keep the piece, stop
    assert "not ready" in _lease(tmp_path, bundle, parts[1], 500)  # a budget, but pieces are missing
    for part in parts[2:-1]:
        _lease(tmp_path, bundle, part, 0)
    after = _lease(tmp_path, bundle, parts[-1], 500).split("AFTER ")[1]
    assert 465 <= int(after) <= 470  # the deadline: the budget less the margin
