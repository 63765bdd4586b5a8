"""Reshuffle, sort and re-cut WebDataset tar shards from Python.

``pip install`` puts the ``dsort`` binary on the ``PATH`` of the environment; this module runs it. Every
function takes the command line's flags as keyword arguments, ``_`` for ``-``, and returns the summary the
binary prints with ``--json`` as a dict::

    import dsort

    summary = dsort.reshard(
        input="data/shard-{000..099}.tar",
        output="shuffled/shard-{00000..99999}.tar",
        algorithm="shuffle",
        seed=4,
        shard_size="256MiB",
        max_mem="2GiB",
    )
    print(summary["records"], summary["bytes"], summary["seconds"])
    dsort.verify(input="data/shard-{000..099}.tar", output="shuffled/shard-{00000..99999}.tar",
                 algorithm="shuffle", seed=4, shard_size="256MiB")

Keyword values: ``True`` is a bare flag (``decreasing=True`` → ``--decreasing``), ``False`` and ``None``
leave the flag out, a list or tuple gives the flag once per item (``input=[a, b]`` → ``--input=a
--input=b``, a list of files), anything else is one value (``str()``, or ``os.fspath()`` for paths).
A failing run raises :class:`DsortError` with dsort's own error message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["DsortError", "reshard", "verify", "run", "executable", "flags", "__version__"]

try:
    #: The version of this package (the same as ``dsort --version``).
    __version__ = _dist_version("dsort")
except PackageNotFoundError:  # imported from a source tree, not installed
    __version__ = "0+unknown"

Value = Union[None, bool, int, float, str, "os.PathLike[str]", Sequence[Union[int, float, str, "os.PathLike[str]"]]]

_EXE = "dsort.exe" if os.name == "nt" else "dsort"


class DsortError(RuntimeError):
    """A ``dsort`` run that failed (or could not start).

    Attributes:
        message: dsort's error message (its ``dsort: error:`` text, without that prefix).
        returncode: the exit code (1 for an error, 130 when interrupted; ``None`` if it did not start).
        args_: the command line that was run.
        stderr: everything the run wrote on stderr (warnings, then the error).
        summary: the JSON document printed on stdout, if any (``verify`` prints its report, with the
            violation, before it fails); else ``None``.
    """

    def __init__(
        self,
        message: str,
        returncode: Optional[int] = None,
        args_: Optional[List[str]] = None,
        stderr: str = "",
        summary: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.returncode = returncode
        self.args_ = args_ or []
        self.stderr = stderr
        self.summary = summary

    def __str__(self) -> str:
        if self.returncode is None:
            return self.message
        return f"{self.message} (exit code {self.returncode})"


def executable() -> str:
    """The path of the ``dsort`` binary this module runs.

    In order: ``$DSORT_BIN``; the binary installed with this package (the scripts folder of the running
    environment, or of the user scheme for ``pip install --user``); ``dsort`` on ``PATH``.
    """
    explicit = os.environ.get("DSORT_BIN")
    if explicit:
        return explicit
    candidates = [sysconfig.get_path("scripts")]
    user_scheme = f"{os.name}_user"
    if user_scheme in sysconfig.get_scheme_names():
        candidates.append(sysconfig.get_path("scripts", user_scheme))
    candidates.append(os.path.dirname(sys.executable))
    for folder in candidates:
        if folder:
            path = os.path.join(folder, _EXE)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    found = shutil.which("dsort")
    if found:
        return found
    raise DsortError(
        "the dsort binary was not found: install this package with pip (it ships the binary), "
        "put dsort on PATH, or set DSORT_BIN"
    )


def flags(options: Mapping[str, Value]) -> List[str]:
    """The command-line flags for keyword options, in the order given.

    >>> flags({"algorithm": "shuffle", "seed": 4, "shard_records": 37, "decreasing": True, "dry_run": False})
    ['--algorithm=shuffle', '--seed=4', '--shard-records=37', '--decreasing']
    >>> flags({"input": ["a.tar", "b.tar"], "key_ext": None})
    ['--input=a.tar', '--input=b.tar']

    Values are joined to their flag with ``=``, so a value that starts with ``-`` stays a value.
    """
    out: List[str] = []
    for key, value in options.items():
        if not key.isidentifier() or key.startswith("_"):
            raise TypeError(f"not a dsort option: {key!r}")
        if key == "json":
            raise TypeError("json: always passed (the functions return the --json summary)")
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out.extend(f"{flag}={_value(key, v)}" for v in value)
        else:
            out.append(f"{flag}={_value(key, value)}")
    return out


def _value(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{key}: {value!r} cannot be one of several values")
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{key}: expected a string, number, path or a list of them, not {type(value).__name__}")


def _error_message(stderr: str) -> str:
    """dsort's error: the text after the first ``dsort: error:`` (it may span lines), or after a line's
    ``error:`` (a refused command line), else stderr's last lines."""
    marker = "dsort: error: "
    at = stderr.find(marker)
    if at >= 0:
        return stderr[at + len(marker) :].strip()
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            return "\n".join([line[len("error: ") :], *lines[i + 1 :]]).strip()
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(lines[-5:]) if lines else "dsort failed without a message"


def run(verb: str, *positional: Union[str, "os.PathLike[str]"], **options: Value) -> Dict[str, Any]:
    """Run ``dsort VERB [POSITIONAL...] --FLAG=VALUE... --json`` and return its JSON document as a dict.

    ``reshard`` and ``verify`` are this with their verb; ``run("gen", output=..., records_per_shard=...)``
    and ``run("inspect", "a.tar")`` work the same way. Raises :class:`DsortError` when dsort exits non-zero
    (with its message). On ``KeyboardInterrupt`` the run is interrupted like Ctrl-C on the command line
    (dsort removes its temp files first), then the interrupt is raised again.
    """
    args = [executable(), verb, *(os.fspath(p) for p in positional), *flags(options), "--json"]
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise DsortError(f"cannot run {args[0]}: {e}", args_=args) from e
    try:
        stdout, stderr = proc.communicate()
    except KeyboardInterrupt:
        if os.name != "nt":
            proc.send_signal(signal.SIGINT)
        proc.communicate()
        raise
    document = _json_document(stdout)
    if proc.returncode != 0:
        raise DsortError(_error_message(stderr), proc.returncode, args, stderr, document)
    if document is None:
        raise DsortError(f"dsort {verb} printed no JSON summary: {stdout.strip()[:200]!r}", 0, args, stderr)
    return document


def _json_document(stdout: str) -> Optional[Dict[str, Any]]:
    text = stdout.strip()
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else {"result": doc}


def reshard(
    input: Union[None, str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]] = None,
    output: Union[None, str, "os.PathLike[str]"] = None,
    **options: Value,
) -> Dict[str, Any]:
    """Reshard offline (``dsort reshard``): extract every record, order them, cut and write new shards.

    Args:
        input: a template (``"data/shard-{000..099}.tar"``, ``"s3://bucket/shard-{0..9}.tar"``) or a list of
            shard files. Not needed with ``spec=``.
        output: the output template; its extension picks the format (``"out/shard-{00000..99999}.tar"``).
        **options: the other flags of ``dsort reshard --help``: ``algorithm`` (``"alphanumeric"``,
            ``"shuffle"``, ``"content"``, ``"none"``), ``seed``, ``shard_size`` (``"256MiB"``),
            ``shard_records``, ``key_ext``, ``key_type``, ``decreasing``, ``ekm``, ``ekm_sep``,
            ``max_mem`` (``"40%"``, ``"2GiB"``), ``tmp_dir``, ``concurrency``, ``corrupted_shards``,
            ``tar_format``, ``dry_run``, ``spec``, ``root``.

    Returns:
        The ``--json`` summary: ``records``, ``entries``, ``bytes``, ``input_shards``, ``skipped_shards``,
        ``output_shards``, ``input_file_bytes``, ``output_file_bytes``, ``seconds``, ``mb_per_s``,
        ``extract_seconds``, ``sort_seconds``, ``create_seconds``, ``memory_budget``, ``peak_reserved``,
        ``peak_rss``, ``spilled_bytes``, ``sort_runs``, ``merge_levels``, ``merge_ranges``, ``seed``,
        ``dry_run``, ``warnings``, and ``s3`` when an S3 bucket is used: for each bucket name, its
        ``get_requests``, ``get_bytes``, ``put_requests``, ``put_bytes``, ``list_requests``,
        ``other_requests`` (README, "S3 buckets").

    Raises:
        DsortError: the job failed; ``str(e)`` and ``e.message`` are dsort's error message.
    """
    return run("reshard", input=input, output=output, **options)


def verify(
    input: Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]],
    output: Union[str, "os.PathLike[str]"],
    **options: Value,
) -> Dict[str, Any]:
    """Prove an output is an exact permutation of the input records, in order, cut by the rule (``dsort verify``).

    Args:
        input, output: as given to :func:`reshard`.
        **options: the flags of ``dsort verify --help``: ``algorithm``, ``seed``, ``key_ext``, ``key_type``,
            ``decreasing``, ``shard_size``, ``shard_records``, ``concurrency``.

    Returns:
        The report (``ok``, ``records``, ``entries``, ``bytes``, ``input_shards``, ``output_shards``,
        ``outputs``, ``seconds``, ...).

    Raises:
        DsortError: the output does not verify (``e.message`` names the first violation and
            ``e.summary`` is the report, with ``violation`` and ``violations``), or the run failed.
    """
    return run("verify", input=input, output=output, **options)

