#!/usr/bin/env bash
# Builds every kustomization under deploy/ with `kubectl kustomize` and
# validates the core objects offline against the Kubernetes schemas
# (`kubernetes-validate --strict`, PyPI). Custom resources (ServiceMonitor,
# PrometheusRule) have no bundled schema: they are built but only warned about.
# Usage: deploy/validate.sh [kubernetes-version]   (default 1.33.0, the oldest we support)
set -euo pipefail
cd "$(dirname "$0")"
version="${1:-1.33.0}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
for dir in base overlays/* examples/*; do
  [ -f "$dir/kustomization.yaml" ] || continue
  name="${dir//\//-}"
  echo "--- kubectl kustomize deploy/$dir"
  kubectl kustomize "$dir" > "$out/$name.yaml"
  echo "    $(grep -c '^kind:' "$out/$name.yaml") objects; validating against Kubernetes $version"
  kubernetes-validate --strict --quiet --no-warn -k "$version" "$out/$name.yaml" || status=1
done
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' components/monitoring/infergate-dashboard.json \
  && echo "--- Grafana dashboard JSON parses" || status=1
exit $status
