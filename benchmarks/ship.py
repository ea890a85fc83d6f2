"""Ship a large file to a machine that takes at most ~55 MB per transfer: split it here, join it there.

  python -m benchmarks.ship split FILE --out .gpu_ship/NAME [--piece-mib 50]
  python -m benchmarks.ship join .gpu_ship/NAME --out FILE

`split` writes FILE's bytes as pieces `<name>.000`, `<name>.001`, ... (50 MiB = 52.4 MB each by
default, never more than 55 MB) and, last, `manifest.json` (the whole file's size and sha256, each
piece's name, size and sha256). `join` checks every piece against the manifest, joins them and checks
the whole file's sha256 before the file appears under its name. Standard library only, so the device
side needs nothing installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
MAX_PIECE_BYTES = 55_000_000  # what one transfer takes
_CHUNK = 1 << 22


class ShipError(RuntimeError):
    """A piece folder that does not match its manifest, or a file that does not match its sha256."""


def split(file: Path, out: Path, *, piece_bytes: int = 50 << 20) -> dict:
    """Write `file` as pieces of at most `piece_bytes` plus a manifest into `out` (emptied of old pieces)."""
    if not 0 < piece_bytes <= MAX_PIECE_BYTES:
        raise ValueError(f"piece size must be in (0, {MAX_PIECE_BYTES}] bytes, not {piece_bytes}.")
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / MANIFEST, *out.glob(f"{file.name}.[0-9][0-9][0-9]")]:
        old.unlink(missing_ok=True)
    whole, pieces = hashlib.sha256(), []
    with open(file, "rb") as src:
        while True:
            name = f"{file.name}.{len(pieces):03d}"
            digest, size = hashlib.sha256(), 0
            with open(out / name, "wb") as dst:
                while size < piece_bytes and (chunk := src.read(min(_CHUNK, piece_bytes - size))):
                    _feed(chunk, digest, whole, dst)
                    size += len(chunk)
            if size == 0 and pieces:  # the file ended exactly at a piece boundary
                (out / name).unlink()
                break
            pieces.append({"name": name, "size": size, "sha256": digest.hexdigest()})
            if size < piece_bytes:
                break
    manifest = {
        "file": file.name,
        "size": sum(p["size"] for p in pieces),
        "sha256": whole.hexdigest(),
        "pieces": pieces,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # written last: its presence means complete
    return manifest


def join(folder: Path, out: Path) -> dict:
    """Join the pieces in `folder` into `out`, checking each piece and the whole file against the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ShipError(f"{folder} has no readable {MANIFEST} ({e}); split the file again.") from e
    problems = []
    for piece in manifest["pieces"]:
        path = folder / piece["name"]
        if not path.is_file():
            problems.append(f"{piece['name']} is missing")
        elif path.stat().st_size != piece["size"]:
            problems.append(f"{piece['name']} has {path.stat().st_size} bytes, expected {piece['size']}")
    if problems:
        raise ShipError(f"{folder}: " + "; ".join(problems))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    whole = hashlib.sha256()
    try:
        with open(partial, "wb") as dst:
            for piece in manifest["pieces"]:
                digest = hashlib.sha256()
                with open(folder / piece["name"], "rb") as src:
                    while chunk := src.read(_CHUNK):
                        _feed(chunk, digest, whole, dst)
                if digest.hexdigest() != piece["sha256"]:
                    bad = folder / piece["name"]
                    raise ShipError(f"{bad} is corrupt (sha256 {digest.hexdigest()}); ship it again.")
        if whole.hexdigest() != manifest["sha256"]:
            raise ShipError(f"the joined file has sha256 {whole.hexdigest()}, expected {manifest['sha256']}.")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return manifest


def _feed(chunk: bytes, digest, whole, dst) -> None:
    digest.update(chunk)
    whole.update(chunk)
    dst.write(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ship", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    split_cmd = commands.add_parser("split", help="split FILE into pieces plus a manifest")
    split_cmd.add_argument("file", type=Path)
    split_cmd.add_argument("--out", type=Path, required=True, help="folder for the pieces, e.g. .gpu_ship/NAME")
    split_cmd.add_argument("--piece-mib", type=float, default=50.0, help="piece size in MiB (default 50)")
    join_cmd = commands.add_parser("join", help="join and verify the pieces in DIR")
    join_cmd.add_argument("folder", type=Path)
    join_cmd.add_argument("--out", type=Path, required=True, help="the file to write")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "split":
            manifest = split(args.file, args.out, piece_bytes=int(args.piece_mib * (1 << 20)))
        else:
            manifest = join(args.folder, args.out)
    except (ShipError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{p['name']} {p['size'] / 1e6:.1f} MB" for p in manifest["pieces"])
    print(f"{args.command}: {manifest['file']} ({manifest['size'] / 1e6:.1f} MB, sha256 {manifest['sha256']}) "
          f"<-> {len(manifest['pieces'])} pieces [{sizes}] at {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
