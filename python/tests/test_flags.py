"""The module's pure-Python parts: keyword options to flags, dsort's error message, finding the binary.

Runs without the binary: ``python3 -m unittest discover -s python/tests`` (CI runs it against the
installed wheel, from a fresh virtual environment).
"""

import os
import pathlib
import stat
import tempfile
import unittest
from unittest import mock

import dsort


class Flags(unittest.TestCase):
    def test_options_become_flags_in_the_order_given(self) -> None:
        got = dsort.flags({"algorithm": "shuffle", "seed": 4, "shard_records": 37, "max_mem": "2GiB"})
        self.assertEqual(got, ["--algorithm=shuffle", "--seed=4", "--shard-records=37", "--max-mem=2GiB"])

    def test_true_is_a_bare_flag_false_and_none_leave_it_out(self) -> None:
        got = dsort.flags({"decreasing": True, "dry_run": False, "key_ext": None, "concurrency": 0})
        self.assertEqual(got, ["--decreasing", "--concurrency=0"])

    def test_a_list_gives_the_flag_once_per_item(self) -> None:
        got = dsort.flags({"input": ["a.tar", pathlib.Path("d/b.tar")], "exts": (".jpg", ".cls")})
        self.assertEqual(got, ["--input=a.tar", "--input=d/b.tar", "--exts=.jpg", "--exts=.cls"])
        self.assertEqual(dsort.flags({"input": []}), [])

    def test_paths_and_numbers_are_values(self) -> None:
        got = dsort.flags({"tmp_dir": pathlib.Path("/tmp/x"), "shard_size": 1048576, "ratio": 0.5})
        self.assertEqual(got, ["--tmp-dir=/tmp/x", "--shard-size=1048576", "--ratio=0.5"])

    def test_a_value_that_starts_with_a_dash_stays_a_value(self) -> None:
        self.assertEqual(dsort.flags({"ekm_sep": "-"}), ["--ekm-sep=-"])

    def test_refused_options(self) -> None:
        for bad in ({"json": True}, {"not-a-name": 1}, {"_private": 1}):
            with self.assertRaises(TypeError, msg=str(bad)):
                dsort.flags(bad)
        with self.assertRaisesRegex(TypeError, "seed"):
            dsort.flags({"seed": {"a": 1}})
        with self.assertRaisesRegex(TypeError, "input"):
            dsort.flags({"input": ["a.tar", None]})


class ErrorMessage(unittest.TestCase):
    def test_dsorts_error_without_its_prefix_and_with_its_lines(self) -> None:
        stderr = "warning: something\ndsort: error: verify: FAILED: shard o-1.tar\n(3 more violation(s) found)\n"
        self.assertEqual(
            dsort._error_message(stderr), "verify: FAILED: shard o-1.tar\n(3 more violation(s) found)"
        )

    def test_a_refused_command_line(self) -> None:
        stderr = "error: invalid value 'bogus' for '--algorithm <ALGORITHM>'\n  [possible values: a, b]\n"
        self.assertEqual(
            dsort._error_message(stderr), "invalid value 'bogus' for '--algorithm <ALGORITHM>'\n  [possible values: a, b]"
        )

    def test_anything_else_is_the_tail(self) -> None:
        self.assertEqual(dsort._error_message("one\ntwo\n"), "one\ntwo")
        self.assertEqual(dsort._error_message(""), "dsort failed without a message")

    def test_the_exception_carries_code_and_message(self) -> None:
        e = dsort.DsortError("no .cls entry", 1, ["dsort", "reshard"], "dsort: error: no .cls entry\n")
        self.assertEqual((e.message, e.returncode), ("no .cls entry", 1))
        self.assertEqual(str(e), "no .cls entry (exit code 1)")
        self.assertIsInstance(e, RuntimeError)


class Executable(unittest.TestCase):
    def test_dsort_bin_wins(self) -> None:
        with mock.patch.dict(os.environ, {"DSORT_BIN": "/opt/x/dsort"}):
            self.assertEqual(dsort.executable(), "/opt/x/dsort")

    def test_path_is_the_fallback_and_a_missing_binary_says_how_to_get_one(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            fake = os.path.join(d, "dsort")
            with open(fake, "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(fake, stat.S_IRWXU)
            env = {k: v for k, v in os.environ.items() if k != "DSORT_BIN"}
            with mock.patch.dict(os.environ, {**env, "PATH": d}, clear=True), mock.patch(
                "dsort.sysconfig.get_path", return_value=os.path.join(d, "nothing-here")
            ), mock.patch("dsort.sys.executable", os.path.join(d, "nothing-here", "python")):
                self.assertEqual(dsort.executable(), fake)
                os.remove(fake)
                with self.assertRaisesRegex(dsort.DsortError, "DSORT_BIN"):
                    dsort.executable()


if __name__ == "__main__":
    unittest.main()
