"""End to end through the installed wheel (`.ci/run` runs this with a fresh virtual environment's python,
after `pip install dsort-*.whl webdataset`):

- `dsort` on the environment's PATH is the binary installed with the package, at the package's version;
- `dsort.reshard(...)` (a seeded shuffle, then a sort by the class label inside each record) returns the
  `--json` summary as a dict, and `dsort.verify(...)` accepts both outputs;
- failures raise `dsort.DsortError` with dsort's message (a job error, a refused option, a wrong seed);
- the `webdataset` package reads every sample of the outputs back, with the input's bytes, in the order
  the algorithm defines (the class-label order is computed here, independently of dsort).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import webdataset as wds

import dsort

SHARDS, PER_SHARD, PER_OUTPUT = 4, 25, 37


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def samples(paths: List[Path]) -> List[Dict[str, object]]:
    """Every sample of the shards, in order, as webdataset yields them (bytes per extension)."""
    urls = [str(p) for p in paths]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def content(sample: Dict[str, object]) -> Tuple[str, Dict[str, bytes]]:
    return sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def main() -> None:
    scripts = sysconfig.get_path("scripts")
    on_path = shutil.which("dsort")
    check(on_path is not None and Path(on_path).parent == Path(scripts), f"dsort on PATH is {scripts}/dsort")
    check(dsort.executable() == os.path.join(scripts, "dsort"), "the module runs the binary installed beside it")
    check(Path(dsort.__file__).resolve().is_relative_to(Path(sysconfig.get_path("purelib")).resolve()),
          "the module is the installed one")
    version = subprocess.run(["dsort", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    check(version == f"dsort {dsort.__version__}", f"`dsort --version` is {version!r}")

    with tempfile.TemporaryDirectory(prefix="dsort-wheel-") as tmp:
        root = Path(tmp)
        inputs = f"{root}/in/shard-{{00..{SHARDS - 1:02d}}}.tar"
        gen = dsort.run("gen", output=inputs, records_per_shard=PER_SHARD, record_size="1KiB..4KiB",
                        exts=[".jpg", ".cls"], seed=7)
        total = SHARDS * PER_SHARD
        check(gen["records"] == total, f"dsort.run('gen') made {total} records")
        in_paths = sorted((root / "in").iterdir())
        originals = [content(s) for s in samples(in_paths)]
        check(len(originals) == total, "webdataset reads every input sample")
        unique_name = {s["__key__"]: f"{Path(s['__url__']).name}|{s['__key__']}" for s in samples(in_paths)}

        # A seeded shuffle, cut by record count.
        shuffled = f"{root}/shuffled/shard-{{000..999}}.tar"
        summary = dsort.reshard(input=inputs, output=shuffled, algorithm="shuffle", seed=4,
                                shard_records=PER_OUTPUT, max_mem="256MiB")
        check(isinstance(summary, dict), "reshard returns a dict")
        for key in ("records", "bytes", "seconds", "output_shards", "seed", "warnings"):
            check(key in summary, f"the summary has `{key}`")
        expected_shards = -(-total // PER_OUTPUT)
        check((summary["records"], summary["output_shards"], summary["seed"]) == (total, expected_shards, 4),
              f"{total} records in {expected_shards} shards, seed 4")
        check(summary["bytes"] == gen["bytes"], "every content byte moved")
        report = dsort.verify(input=inputs, output=shuffled, algorithm="shuffle", seed=4, shard_records=PER_OUTPUT)
        check(report["ok"] is True and report["records"] == total, "verify accepts the shuffle")

        out_paths = sorted((root / "shuffled").iterdir())
        check(len(out_paths) == expected_shards, "the output shards are on disk")
        got = samples(out_paths)
        check(len(got) == total, "webdataset reads every output sample")
        check(sorted(content(s) for s in got) == sorted(originals), "with the input's keys and bytes")
        sizes = [sum(1 for _ in samples([p])) for p in out_paths]
        check(sizes == [PER_OUTPUT] * (expected_shards - 1) + [total - PER_OUTPUT * (expected_shards - 1)],
              f"{PER_OUTPUT} samples per shard, the rest in the last")
        check([content(s) for s in got] != originals, "in another order than the input")
        listed = dsort.run("inspect", *out_paths)
        dsort_order = [r["name"] for shard in listed["shards"] for r in shard["records"]]
        check([s["__key__"] for s in got] == dsort_order, "in the order dsort wrote them")

        # A sort by the class label inside each record: the order computed here, independently.
        by_class = f"{root}/by_class/shard-{{000..999}}.tar"
        summary = dsort.reshard(input=inputs, output=by_class, algorithm="content", key_ext=".cls",
                                key_type="int", shard_records=PER_OUTPUT)
        check(summary["records"] == total, "the class sort moved every record")
        got = samples(sorted((root / "by_class").iterdir()))
        want = sorted(originals, key=lambda kv: (int(kv[1]["cls"].decode().strip()), unique_name[kv[0]]))
        check([content(s) for s in got] == want, "webdataset reads every sample in class order, ties by name")
        check(dsort.verify(input=inputs, output=by_class, algorithm="content", key_ext=".cls", key_type="int",
                           shard_records=PER_OUTPUT)["ok"], "verify accepts the class sort")

        # Failures raise with dsort's message.
        try:
            dsort.reshard(input=inputs, output=f"{root}/bad/shard-{{000..999}}.tar", algorithm="content",
                          key_ext=".nope", key_type="int")
            raise SystemExit("FAILED: a job without its key entry must raise")
        except dsort.DsortError as e:
            check(e.returncode == 1 and "no .nope entry" in str(e) and "record" in e.message,
                  f"a failed job raises DsortError with dsort's message: {e}")
        check(not (root / "bad").exists() or not any((root / "bad").iterdir()), "and writes no output")
        try:
            dsort.reshard(input=inputs, output=shuffled, algorithm="bogus")
            raise SystemExit("FAILED: a refused option must raise")
        except dsort.DsortError as e:
            check(e.returncode == 2 and "bogus" in e.message, f"a refused option raises: {e.message.splitlines()[0]}")
        try:
            dsort.verify(input=inputs, output=shuffled, algorithm="shuffle", seed=5, shard_records=PER_OUTPUT)
            raise SystemExit("FAILED: verify with another seed must raise")
        except dsort.DsortError as e:
            check(e.message.startswith("verify: FAILED") and e.summary is not None and e.summary["ok"] is False,
                  "verify with the wrong seed raises, with its report")
    print("the installed wheel works")


if __name__ == "__main__":
    sys.exit(main())
