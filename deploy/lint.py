#!/usr/bin/env python3
"""Cross-reference checks on rendered manifests that a JSON-schema validator cannot make.

Usage: lint.py RENDERED.yaml [NAME]   (NAME labels the messages, e.g. the overlay)

Checks, for every workload (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job) in the file:
  - container port names are IANA service names (<= 15 chars, [a-z0-9-], a letter, no '--', no '-' at an end);
  - every volumeMount names a volume of the pod (or a volumeClaimTemplate of the StatefulSet);
  - selector.matchLabels is a subset of the pod template's labels;
  - probes on a named port name a port of the same container;
  - resourceFieldRef.containerName names a container of the pod; $(VAR) in an env value names a
    variable defined earlier in the same container;
  - dsort containers (name starting with `dsort-`) take env only as `value`, `fieldRef`,
    `resourceFieldRef` or `secretKeyRef` (the local stand-in replays exactly these);
and across documents:
  - every Service selector matches a pod template, and each named targetPort is a port of it;
  - a StatefulSet's serviceName is a headless Service of the file;
  - every PodMonitor (monitoring.coreos.com/v1) has a well-formed spec, selects at least one pod
    template, and each endpoint's port is a container port name of a pod it selects.
Exits 1 listing every problem found.
"""

import re
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
DSORT_ENV_SOURCES = {"fieldRef", "resourceFieldRef", "secretKeyRef"}


def pod_containers(pod):
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def port_name_problem(name):
    if len(name) > 15:
        return f"longer than 15 characters ({len(name)})"
    if not PORT_NAME.match(name) or "--" in name or not re.search(r"[a-z]", name):
        return "not an IANA service name (lower-case letters, digits and single '-', with a letter)"
    return None


def lint_workload(doc, where, problems):
    spec = doc.get("spec") or {}
    template = spec.get("template") or {}
    pod = template.get("spec") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    for k, v in selector.items():
        if labels.get(k) != v:
            problems.append(f"{where}: selector label {k}={v} is not a label of the pod template")
    volumes = {v.get("name") for v in pod.get("volumes") or []}
    volumes |= {(t.get("metadata") or {}).get("name") for t in spec.get("volumeClaimTemplates") or []}
    containers = pod_containers(pod)
    names = {c.get("name") for c in containers}
    for c in containers:
        cw = f"{where} container {c.get('name')}"
        ports = set()
        for p in c.get("ports") or []:
            n = p.get("name")
            if n is None:
                continue
            ports.add(n)
            problem = port_name_problem(n)
            if problem:
                problems.append(f"{cw}: port name {n!r} is {problem}")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                problems.append(f"{cw}: volumeMount {m.get('name')!r} names no volume of the pod")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            action = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket") or {}
            port = action.get("port")
            if isinstance(port, str) and port not in ports:
                problems.append(f"{cw}: {probe} uses port {port!r}, which the container does not name")
        defined = set()
        for e in c.get("env") or []:
            name = e.get("name")
            source = e.get("valueFrom") or {}
            ref = source.get("resourceFieldRef")
            if ref and ref.get("containerName") not in (None, *names):
                problems.append(f"{cw}: env {name} reads the resources of unknown container {ref.get('containerName')!r}")
            for var in VAR_REF.findall(str(e.get("value") or "")):
                if var not in defined:
                    problems.append(f"{cw}: env {name} uses $({var}), which is not defined before it")
            if str(c.get("name", "")).startswith("dsort-"):
                kinds = set(source)
                if ("value" in e) == bool(source) or len(kinds) > 1 or not kinds <= DSORT_ENV_SOURCES:
                    problems.append(
                        f"{cw}: env {name} must be a literal value or one of {sorted(DSORT_ENV_SOURCES)}"
                    )
            defined.add(name)
        if str(c.get("name", "")).startswith("dsort-") and c.get("envFrom"):
            problems.append(f"{cw}: envFrom is not allowed in dsort containers (list each variable)")


def pods_matching(workloads, selector):
    for doc in workloads:
        template = doc["spec"].get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if all(labels.get(k) == v for k, v in selector.items()):
            yield doc, template.get("spec") or {}


def container_ports(pod):
    return {p.get("name") for c in pod_containers(pod) for p in c.get("ports") or [] if p.get("name")}


def lint_podmonitor(doc, where, workloads, problems):
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        problems.append(f"{where}: no spec")
        return
    unknown = set(spec) - {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    if unknown:
        problems.append(f"{where}: unexpected spec keys {sorted(unknown)}")
    selector = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(selector, dict) or not selector:
        problems.append(f"{where}: spec.selector.matchLabels must be a non-empty map")
        return
    pods = list(pods_matching(workloads, selector))
    if not pods:
        problems.append(f"{where}: selector {selector} matches no pod template")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append(f"{where}: spec.podMetricsEndpoints must be a non-empty list")
        return
    for i, ep in enumerate(endpoints):
        ew = f"{where} podMetricsEndpoints[{i}]"
        unknown = set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme", "authorization", "relabelings"}
        if unknown:
            problems.append(f"{ew}: unexpected keys {sorted(unknown)}")
        port = ep.get("port")
        if not isinstance(port, str):
            problems.append(f"{ew}: port must be a container port name")
        elif pods and not any(port in container_ports(pod) for _, pod in pods):
            problems.append(f"{ew}: port {port!r} is not a container port name of any pod it selects")
        if not str(ep.get("path", "")).startswith("/"):
            problems.append(f"{ew}: path must start with '/'")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not (isinstance(ep[key], str) and DURATION.match(ep[key]) and ep[key]):
                problems.append(f"{ew}: {key} {ep[key]!r} is not a Prometheus duration such as 30s")
        auth = ep.get("authorization")
        if auth is not None:
            cred = auth.get("credentials") or {}
            if auth.get("type", "Bearer") != "Bearer" or not isinstance(cred.get("name"), str) or not isinstance(
                cred.get("key"), str
            ):
                problems.append(f"{ew}: authorization must be type Bearer with credentials {{name, key}}")


def main():
    path = sys.argv[1]
    label = sys.argv[2] if len(sys.argv) > 2 else path
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []
    workloads = [d for d in docs if d.get("kind") in WORKLOADS]
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    for doc in docs:
        where = f"{label}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        kind = doc.get("kind")
        if kind in WORKLOADS:
            lint_workload(doc, where, problems)
            if kind == "StatefulSet":
                svc = services.get(doc["spec"].get("serviceName"))
                if svc is None or svc["spec"].get("clusterIP") != "None":
                    problems.append(f"{where}: serviceName {doc['spec'].get('serviceName')!r} is no headless Service here")
        elif kind == "Service":
            selector = doc["spec"].get("selector") or {}
            pods = list(pods_matching(workloads, selector)) if selector else []
            if selector and not pods:
                problems.append(f"{where}: selector {selector} matches no pod template")
            for p in doc["spec"].get("ports") or []:
                target = p.get("targetPort")
                if isinstance(target, str) and pods and not any(target in container_ports(pod) for _, pod in pods):
                    problems.append(f"{where}: targetPort {target!r} is not a container port name of its pods")
        elif kind == "PodMonitor":
            lint_podmonitor(doc, where, workloads, problems)
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
