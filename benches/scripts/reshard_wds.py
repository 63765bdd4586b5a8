#!/usr/bin/env python3
"""The WebDataset peer of `reshard_bench.sh`: reshard tar shards the way webdataset users do it.

Every sample is read with `webdataset.WebDataset` (raw bytes, no decoding), the list is sorted by key,
by the integer in the `.cls` entry, or shuffled with a seeded `random.Random`, and written back with
`webdataset.ShardWriter` (no encoder, mtime 0) in shards closed once they reach `--shard-size` bytes.
The whole dataset sits in memory: that is what the usual script does (webdataset has no external sort).

    pip install webdataset
    reshard_wds.py --output-dir OUT --order name|shuffle|content [--seed 7] [--shard-size 268435456] \\
        [--limit N] SHARD.tar...

Prints one JSON line: records, input bytes of the shards read, seconds (read + order + write, without
the interpreter's start), output shards. `--limit N` stops after N records (for a subset run on a slow
machine; the time scales linearly with the records).
"""

import argparse
import json
import os
import random
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", nargs="+", help="input .tar shards")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--order", choices=["name", "shuffle", "content"], default="name")
    ap.add_argument("--key-ext", default="cls", help="content order: extension holding an integer")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--shard-size", type=int, default=256 << 20, help="bytes per output shard (at least)")
    ap.add_argument("--limit", type=int, default=0, help="read at most this many records (0: all)")
    a = ap.parse_args()

    import webdataset as wds

    os.makedirs(a.output_dir, exist_ok=True)
    t0 = time.perf_counter()
    samples = []
    for s in wds.WebDataset(a.shards, shardshuffle=False, empty_check=False):
        s.pop("__url__", None)
        s.pop("__local_path__", None)
        samples.append(s)
        if a.limit and len(samples) >= a.limit:
            break
    if a.order == "shuffle":
        random.Random(a.seed).shuffle(samples)
    elif a.order == "name":
        samples.sort(key=lambda s: s["__key__"])
    else:
        samples.sort(key=lambda s: (int(s[a.key_ext]), s["__key__"]))
    pattern = os.path.join(a.output_dir, "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=10**12, maxsize=a.shard_size, encoder=False, mtime=0, verbose=0) as sink:
        for s in samples:
            sink.write(s)
        shards = sink.shard
    seconds = time.perf_counter() - t0
    in_bytes = sum(os.path.getsize(f) for f in a.shards)
    print(json.dumps({"records": len(samples), "input_file_bytes": in_bytes, "seconds": seconds, "output_shards": shards}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
