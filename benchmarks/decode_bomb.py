"""Benchmark: peak memory of one aspect-ratio bomb through the eval transform (issue 16).

    python benchmarks/decode_bomb.py [--width 2000000] [--height 20]

Builds a black greyscale PNG of width x height pixels (a few KB: the same generator as the test), and runs it through
``ImageDataset`` with the cpu-lite0 recipe's eval transform (144x272). Prints whether the photo was accepted, the
seconds it took and how much the process's peak resident memory grew. Run it against an older checkout with
PYTHONPATH=that/src to compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import time
import zlib


def bomb_png(width: int, height: int) -> bytes:
    raw = zlib.compress((b"\0" + b"\0" * width) * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=2_000_000)
    ap.add_argument("--height", type=int, default=20)
    args = ap.parse_args()
    import carclf
    from carclf.config import load_config
    from carclf.data.dataset import ImageDataset
    from carclf.data.transforms import data_config_for, eval_transform

    data = bomb_png(args.width, args.height)
    dcfg = data_config_for(load_config(None, ["data.img_size=144", "data.aspect=1.89"]))
    ds = ImageDataset([data], None, eval_transform(dcfg), 144, max_pixels=90_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ok = bool(ds[0][3])
    seconds = time.perf_counter() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"carclf": carclf.__file__, "png_bytes": len(data), "pixels": args.width * args.height,
                      "accepted": ok, "seconds": round(seconds, 2), "peak_rss_growth_mb": round(grew, 1)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
