#!/usr/bin/env bash
# Checks the Helm chart and the manifests (`make chart`, part of `make test`):
#
#   1. helm lint --strict, with the default values and with every optional part switched on;
#   2. values.schema.json rejects unknown keys and bad enum values;
#   3. helm template | kubernetes-validate --strict against Kubernetes $K8S_VERSION (default and full values);
#   4. the operator's RBAC is exactly the least-privilege rule set, the Deployment is locked down
#      (non-root, read-only root fs, no privilege escalation, no capabilities, seccomp, probes) and the
#      settings file it mounts is well formed;
#   5. the chart's CRD (crds/) equals manifests/crd.yaml (the CRD the operator generates);
#   6. manifests/install.yaml equals what this script renders (helm template with default values + CRD);
#   7. every FusionCache in manifests/examples/ validates against the CRD's openAPIV3Schema, made strict
#      (additionalProperties: false wherever properties are listed, unless x-kubernetes-preserve-unknown-
#      fields), after the schema's defaults are applied, and passes its x-kubernetes-validations CEL rules;
#      examples in files named *invalid* must be rejected by it, those in files named *illegal* must be
#      accepted (they exist to show the operator's Ready=False path, which a schema rejection would hide),
#      and mutated copies of the valid ones (an unknown field in each object, a bad value for each enum) and
#      built-in negatives (unknown fields, bad enums, each CEL rule) must be rejected, so this cannot pass
#      vacuously; every other example (the app Deployment) passes kubernetes-validate --strict;
#   8. the FusionCache shown in the chart README and in NOTES.txt validates too.
#
# Usage:
#   bash scripts/chart-check.sh            run the checks; exit 1 if any fails
#   bash scripts/chart-check.sh --write    copy manifests/crd.yaml into the chart's crds/ and regenerate
#                                          manifests/install.yaml (what `make install-manifest` runs);
#                                          --write-install is the same
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CHART=charts/fusioncache-operator
CHART_CRD="$CHART/crds/fusioncaches.fusioncache.io.yaml"
CRD=manifests/crd.yaml
INSTALL=manifests/install.yaml
EXAMPLES=manifests/examples
RELEASE=fusioncache-operator
NAMESPACE=fusioncache-system
K8S_VERSION=1.35.0   # kubernetes-validate schema set; the helm we pin speaks the 1.35 client API

MODE="check"
case "${1:-}" in
  "") ;;
  --write | --write-install) MODE="write" ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "usage: $0 [--write]" >&2; exit 2 ;;
esac

bash "$ROOT/scripts/install-chart-tools.sh"
HELM="$ROOT/.tools/bin/helm"
PY="$ROOT/.tools/venv/bin/python"
KV="$ROOT/.tools/venv/bin/kubernetes-validate"
# Keep helm's cache/config/data out of $HOME.
export HELM_CACHE_HOME="$ROOT/.tools/helm/cache" HELM_CONFIG_HOME="$ROOT/.tools/helm/config" \
  HELM_DATA_HOME="$ROOT/.tools/helm/data"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# The install manifest: a restricted-PSA Namespace, then the chart rendered with default values and its CRD.
render_install() {
  cat <<EOF
# The fusioncache-operator, for \`kubectl apply -f manifests/install.yaml\` (no Helm needed): its Namespace,
# the FusionCache CRD, RBAC, settings ConfigMap, Deployment and metrics Service.
# GENERATED from $CHART with its default values by \`make install-manifest\`
# (bash scripts/chart-check.sh --write): do not edit; change the chart and regenerate.
# \`make chart\` fails when this file is out of date.
---
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
  labels:
    app.kubernetes.io/part-of: fusioncache
    pod-security.kubernetes.io/enforce: restricted
EOF
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --include-crds
}

if [[ $MODE == write ]]; then
  if [[ -f $CRD ]]; then
    cp "$CRD" "$CHART_CRD"
    echo "wrote $CHART_CRD (copy of $CRD)"
  else
    echo "note: $CRD does not exist yet; $CHART_CRD left as it is" >&2
  fi
  mkdir -p "$(dirname "$INSTALL")"
  render_install >"$TMP/install.yaml"
  mv "$TMP/install.yaml" "$INSTALL"
  echo "wrote $INSTALL"
  exit 0
fi

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); printf 'PASS: %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL: %s\n' "$*"; }
# Runs a check quietly; prints its output only when it fails.
check() {
  local name="$1"; shift
  if "$@" >"$TMP/out" 2>&1; then
    pass "$name"
  else
    fail "$name"
    sed 's/^/    /' "$TMP/out"
  fi
}

# Values that switch on every optional part of the chart, so the templates are all rendered and validated.
cat >"$TMP/full-values.yaml" <<'EOF'
image:
  digest: sha256:0000000000000000000000000000000000000000000000000000000000000000
imagePullSecrets: [{name: regcred}]
replicaCount: 2
leaderElection: {leaseName: fc-leader, leaseDuration: 20s, renewDeadline: 15s, retryPeriod: 3s}
controller: {resync: 10m, aclCheckInterval: 5s, passwordGracePeriod: 1h}
serviceAccount: {annotations: {example.com/role: operator}}
settings:
  redisEndpoints:
    - name: default
      url: redis://redis.fusioncache-system.svc.cluster.local:6379
      databases: 16
      adminUsername: fusioncache-operator
      adminPasswordSecretRef: {name: redis-admin, key: password}
    - name: shared-tls
      url: rediss://redis.example.internal:6380
      databases: 64
  defaultRedisEndpoint: shared-tls
  defaultNatsUrl: nats://nats-0.nats:4222,nats://nats-1.nats:4222
extraEnv: [{name: EXTRA, value: "1"}]
podAnnotations: {example.com/a: b}
podLabels: {team: platform}
priorityClassName: system-cluster-critical
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Equal, value: infra, effect: NoSchedule}]
affinity: {nodeAffinity: {}}
metrics: {port: 9090, service: {port: 9091, annotations: {prometheus.io/scrape: "true"}}}
serviceMonitor: {enabled: true, labels: {release: kube-prometheus-stack}}
EOF

# ---- 1. lint --------------------------------------------------------------------------------------------------
check "helm lint --strict $CHART (default values)" "$HELM" lint --strict "$CHART" --namespace "$NAMESPACE"
check "helm lint --strict $CHART (every option on)" \
  "$HELM" lint --strict "$CHART" --namespace "$NAMESPACE" -f "$TMP/full-values.yaml"

# ---- 2. values.schema.json is strict ----------------------------------------------------------------------------
expect_render_failure() { # name, then helm template arguments that must be refused
  local name="$1"; shift
  if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" >"$TMP/out" 2>&1; then
    fail "values rejected: $name (helm template accepted $*)"
  else
    pass "values rejected: $name ($(grep -m1 -o 'additional propert[^)]*\|value must be[^)]*\|is used twice\|is not the name[^)]*\|at .*' "$TMP/out" | head -c 120))"
  fi
}
expect_render_failure "unknown top-level key" --set replicas=2
expect_render_failure "unknown nested key" --set settings.redisEndpoint=x
expect_render_failure "bad enum image.pullPolicy" --set image.pullPolicy=Sometimes
expect_render_failure "two replicas without leader election" --set replicaCount=2 --set leaderElection.enabled=false
expect_render_failure "a bad namespace in watchNamespaces" --set 'watchNamespaces={Shop}'
expect_render_failure "a bad duration" --set controller.resync=5x
expect_render_failure "duplicate Redis endpoint names" \
  --set 'settings.redisEndpoints[0].name=a,settings.redisEndpoints[0].url=redis://a:6379' \
  --set 'settings.redisEndpoints[1].name=a,settings.redisEndpoints[1].url=redis://b:6379' \
  --set settings.defaultRedisEndpoint=a
expect_render_failure "defaultRedisEndpoint names no endpoint" --set settings.defaultRedisEndpoint=nope
expect_render_failure "credentials in a Redis URL" --set 'settings.redisEndpoints[0].name=a,settings.redisEndpoints[0].url=redis://u:p@a:6379' \
  --set settings.defaultRedisEndpoint=a
expect_render_failure "bad NATS URL scheme" --set settings.defaultNatsUrl=http://nats:4222

# ---- 3. render + kubernetes-validate --strict -------------------------------------------------------------------
# kubernetes-validate only warns about kinds it has no schema for; a warning fails here too (a typo in an
# apiVersion must not skip validation), except for the ServiceMonitor CRD kind.
kube_validate() { # file
  local out rc=0
  out="$("$KV" --strict --quiet -k "$K8S_VERSION" "$1" 2>&1)" || rc=$?
  out="$(grep -v -e "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1" \
    -e "Couldn't find schema for kind FusionCache with api version fusioncache.io/" <<<"$out" || true)"
  [[ -n "${out//[[:space:]]/}" ]] && printf '%s\n' "$out"
  [[ $rc == 0 && -z "$(grep -E '^(WARN|ERROR|FATAL)' <<<"$out" || true)" ]]
}
render_ok=1
render_install >"$TMP/install.yaml" 2>"$TMP/render.err" || { render_ok=0; fail "helm template (default values)"; sed 's/^/    /' "$TMP/render.err"; }
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --include-crds -f "$TMP/full-values.yaml" \
  >"$TMP/full.yaml" 2>"$TMP/render.err" || { render_ok=0; fail "helm template (every option on)"; sed 's/^/    /' "$TMP/render.err"; }
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --set 'watchNamespaces={shop,billing}' \
  --set leaderElection.enabled=false >"$TMP/namespaced.yaml" 2>"$TMP/render.err" \
  || { render_ok=0; fail "helm template (namespace-scoped)"; sed 's/^/    /' "$TMP/render.err"; }
if [[ $render_ok == 1 ]]; then
  check "helm template (namespace-scoped, no leader election) | kubernetes-validate --strict -k $K8S_VERSION" \
    kube_validate "$TMP/namespaced.yaml"
  check "helm template (default values, + Namespace and CRD) | kubernetes-validate --strict -k $K8S_VERSION" \
    kube_validate "$TMP/install.yaml"
  check "helm template (every option on) | kubernetes-validate --strict -k $K8S_VERSION" \
    kube_validate "$TMP/full.yaml"
fi

# ---- the python side: policy checks and the CRD-schema validator --------------------------------------------------
cat >"$TMP/checks.py" <<'PY'
"""Policy checks on the rendered chart, and strict validation of FusionCache resources against the CRD."""
import copy
import glob
import os
import re
import sys

import celpy
import jsonschema
import yaml

FAILED = []


def report(ok, name, detail="", always=False):
    print(("PASS: " if ok else "FAIL: ") + name)
    if detail and (always or not ok):
        for line in detail.rstrip().splitlines():
            print("    " + line)
    if not ok:
        FAILED.append(name)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ---------------------------------------------------------------- policy: RBAC and the Deployment
# Exactly what the operator uses (the operator's end-to-end tests check its request log against the rendered
# RBAC): in each watched namespace (cluster-wide by default) ...
EXPECTED_RULES = {
    ("fusioncache.io", "fusioncaches"): {"list", "watch", "patch"},
    ("fusioncache.io", "fusioncaches/status"): {"patch"},
    ("fusioncache.io", "fusioncaches/finalizers"): {"update"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# ... and, in the release namespace, its Lease: create, and get/update of that one name only.
EXPECTED_LEASE_RULES = {
    ("coordination.k8s.io", "leases", None): {"create"},
    ("coordination.k8s.io", "leases", "NAME"): {"get", "update"},
}


def rules_of(role, errors, allow_names=False):
    got = {}
    for rule in role.get("rules", []):
        if rule.get("nonResourceURLs") or (rule.get("resourceNames") and not allow_names):
            errors.append(f"unexpected rule shape in {role['metadata']['name']}: {rule}")
        names = rule.get("resourceNames") or [None]
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for n in names:
                    key = (g, r, n) if allow_names else (g, r)
                    got.setdefault(key, set()).update(rule.get("verbs", []))
    return got


def compare(got, expected, where, errors):
    for key in sorted(set(got) | set(expected), key=str):
        want, have = expected.get(key, set()), got.get(key, set())
        if "*" in have or have != want:
            errors.append(f"{where}: {key}: verbs {sorted(have)}, expected {sorted(want)}")


def policy(render_path, label, watch_namespaces=(), leader_election=True):
    docs = load_docs(render_path)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    errors = []
    deps = by_kind.get("Deployment", [])
    release_ns = deps[0]["metadata"]["namespace"] if deps else None
    sa = deps[0]["spec"]["template"]["spec"].get("serviceAccountName") if deps else None

    def bound(binding):
        return any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == release_ns
                   for s in binding.get("subjects", []))

    crbs = [b for b in by_kind.get("ClusterRoleBinding", []) if bound(b)]
    rbs = [b for b in by_kind.get("RoleBinding", []) if bound(b)]
    roles = {(r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in by_kind.get("Role", [])}
    croles = {r["metadata"]["name"]: r for r in by_kind.get("ClusterRole", [])}
    if watch_namespaces:
        if crbs:
            errors.append(f"namespace-scoped mode binds ClusterRoles: {[b['metadata']['name'] for b in crbs]}")
        scoped = {}
        for b in rbs:
            ns = b["metadata"]["namespace"]
            role = roles.get((ns, b["roleRef"]["name"]))
            if role is None or b["roleRef"]["kind"] != "Role":
                errors.append(f"RoleBinding {ns}/{b['metadata']['name']} binds a missing Role")
                continue
            if role["metadata"]["name"].endswith("-leader-election"):
                continue
            scoped[ns] = rules_of(role, errors)
        if set(scoped) != set(watch_namespaces):
            errors.append(f"operator Roles in {sorted(scoped)}, expected {sorted(watch_namespaces)}")
        for ns, got in scoped.items():
            compare(got, EXPECTED_RULES, f"Role in {ns}", errors)
    else:
        if len(crbs) != 1:
            errors.append(f"expected one ClusterRoleBinding of the operator, found {len(crbs)}")
        else:
            role = croles.get(crbs[0]["roleRef"]["name"])
            if role is None:
                errors.append(f"ClusterRole {crbs[0]['roleRef']['name']} not rendered")
            else:
                compare(rules_of(role, errors), EXPECTED_RULES, "ClusterRole", errors)
    lease_bindings = [b for b in rbs if b["roleRef"]["name"].endswith("-leader-election")]
    if leader_election:
        if len(lease_bindings) != 1 or lease_bindings[0]["metadata"]["namespace"] != release_ns:
            errors.append(f"expected one leader-election RoleBinding in {release_ns}, found {len(lease_bindings)}")
        else:
            role = roles.get((release_ns, lease_bindings[0]["roleRef"]["name"]))
            got = rules_of(role, errors, allow_names=True) if role else {}
            env = {e["name"]: e.get("value") for e in deps[0]["spec"]["template"]["spec"]["containers"][0].get("env", [])}
            lease = env.get("FUSIONCACHE_OPERATOR_LEASE_NAME")
            expected = {(g, r, lease if n == "NAME" else n): v for (g, r, n), v in EXPECTED_LEASE_RULES.items()}
            compare(got, expected, "leader-election Role", errors)
    elif lease_bindings:
        errors.append("leader election is off but a leader-election Role is bound")
    for r in by_kind.get("ClusterRole", []):
        labels = r["metadata"].get("labels", {})
        if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels):
            for rule in r.get("rules", []):
                if rule.get("apiGroups") != ["fusioncache.io"] or "*" in rule.get("verbs", []):
                    errors.append(f"aggregated role {r['metadata']['name']} grants more than FusionCaches: {rule}")
    report(not errors, f"RBAC is exactly what the operator uses ({label})", "\n".join(errors))

    # The Deployment.
    errors = []
    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        report(False, f"Deployment locked down ({label})", f"expected one Deployment, found {len(deps)}")
        return
    pod = deps[0]["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        errors.append("pod securityContext.runAsNonRoot is not true")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        errors.append("pod seccompProfile is not RuntimeDefault")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        errors.append("pod uses host namespaces")
    containers = pod["containers"]
    if len(containers) != 1:
        errors.append(f"expected one container, found {len(containers)}")
    c = containers[0]
    sc = c.get("securityContext", {})
    for key, want in [("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False), ("runAsNonRoot", True)]:
        if sc.get(key) is not want:
            errors.append(f"container securityContext.{key} is {sc.get(key)!r}, expected {want!r}")
    if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
        errors.append("container does not drop ALL capabilities (or adds some)")
    if sc.get("privileged"):
        errors.append("container is privileged")
    if c.get("args") != ["run"]:
        errors.append(f"container args are {c.get('args')!r}, expected ['run']")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        http = (c.get(probe) or {}).get("httpGet") or {}
        if http.get("path") != path or http.get("port") not in ("http", ports.get("http")):
            errors.append(f"{probe} is not httpGet {path} on the http port: {c.get(probe)!r}")
    res = c.get("resources") or {}
    if not res.get("requests") or not (res.get("limits") or {}).get("memory"):
        errors.append("container has no resource requests or no memory limit")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if env.get("FUSIONCACHE_OPERATOR_PORT") != str(ports.get("http")):
        errors.append(f"FUSIONCACHE_OPERATOR_PORT {env.get('FUSIONCACHE_OPERATOR_PORT')!r} is not the http port {ports.get('http')}")
    svcs = [d for d in by_kind.get("Service", [])]
    for svc in svcs:
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ("http", ports.get("http")):
                errors.append(f"Service {svc['metadata']['name']} targets {p.get('targetPort')!r}, not the http port")
    cfg = env.get("FUSIONCACHE_OPERATOR_CONFIG")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if not cfg:
        errors.append("FUSIONCACHE_OPERATOR_CONFIG is not set")
    elif os.path.dirname(cfg) not in mounts:
        errors.append(f"{cfg} is not on a mounted volume ({sorted(mounts)})")
    report(not errors, f"Deployment locked down: non-root, read-only root fs, no escalation, drop ALL, seccomp, probes ({label})",
           "\n".join(errors))

    # The settings file: valid YAML with the keys the operator reads, every file it names is mounted.
    errors = []
    cms = [d for d in by_kind.get("ConfigMap", []) if "settings.yaml" in (d.get("data") or {})]
    if len(cms) != 1:
        errors.append(f"expected one ConfigMap with settings.yaml, found {len(cms)}")
    else:
        try:
            s = yaml.safe_load(cms[0]["data"]["settings.yaml"]) or {}
        except yaml.YAMLError as e:
            s = {}
            errors.append(f"settings.yaml is not YAML: {e}")
        # The rules of crates/fusioncache-operator/src/settings.rs (unknown keys are errors there).
        allowed = {"redisEndpoints", "defaultRedisEndpoint", "defaultNatsUrl"}
        if set(s) - allowed:
            errors.append(f"settings.yaml has unknown keys {sorted(set(s) - allowed)}")
        names = [e.get("name") for e in s.get("redisEndpoints") or []]
        if len(names) != len(set(names)):
            errors.append(f"duplicate endpoint names {names}")
        if s.get("defaultRedisEndpoint") and s["defaultRedisEndpoint"] not in names:
            errors.append(f"defaultRedisEndpoint {s['defaultRedisEndpoint']} is not an endpoint")
        for url in (s.get("defaultNatsUrl") or "").split(",") if s.get("defaultNatsUrl") else []:
            if not re.match(r"^(nats|tls|ws|wss)://[^\s@,/]+", url.strip()):
                errors.append(f"defaultNatsUrl has a bad URL {url!r}")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        for e in s.get("redisEndpoints") or []:
            extra = set(e) - {"name", "url", "databases", "adminUsername", "adminPassword", "adminPasswordEnv",
                              "adminPasswordFile"}
            if extra:
                errors.append(f"endpoint {e.get('name')} has unknown keys {sorted(extra)}")
            if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", str(e.get("name"))):
                errors.append(f"endpoint name {e.get('name')!r} is not a DNS label")
            if not re.match(r"^rediss?://[^\s@/]+", str(e.get("url"))):
                errors.append(f"endpoint {e.get('name')} has a bad url {e.get('url')!r} (credentials are not allowed)")
            if "databases" in e and not (isinstance(e["databases"], int) and e["databases"] >= 1):
                errors.append(f"endpoint {e.get('name')} databases must be an integer >= 1")
            if sum(k in e for k in ("adminPassword", "adminPasswordEnv", "adminPasswordFile")) > 1:
                errors.append(f"endpoint {e.get('name')} sets more than one admin password source")
            f = e.get("adminPasswordFile")
            if f:
                mount = next((m for m in mounts if f.startswith(m.rstrip("/") + "/")), None)
                rel = f[len(mount) + 1:] if mount else None
                sources = (vols.get(mounts.get(mount), {}).get("projected") or {}).get("sources", [])
                paths = [i["path"] for src in sources for i in (src.get("secret") or {}).get("items", [])]
                if rel not in paths:
                    errors.append(f"adminPasswordFile {f} is not mounted from a Secret")
    report(not errors, f"operator settings file well formed and its secret files mounted ({label})", "\n".join(errors))


# ---------------------------------------------------------------- FusionCache resources vs the CRD schema
def strict_schema(node, in_combinator=False):
    """The CRD's structural schema as strict JSON Schema: additionalProperties false wherever properties are
    listed (unless x-kubernetes-preserve-unknown-fields), nullable turned into a null type, int-or-string."""
    if isinstance(node, list):
        return [strict_schema(n, in_combinator) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties", "definitions"):
            out[k] = {name: strict_schema(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = strict_schema(v, in_combinator=(k == "not")) if isinstance(v, (dict, list)) else v
        elif k in ("anyOf", "oneOf", "allOf"):
            out[k] = strict_schema(v, in_combinator=True)
        else:
            out[k] = v
    if out.get("nullable") is True and "type" in out:
        t = out["type"]
        out["type"] = (t if isinstance(t, list) else [t]) + ["null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = list(out["enum"]) + [None]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out and "oneOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}] + ([{"type": "null"}] if out.get("nullable") else [])
    if ("properties" in out and not in_combinator and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema, doc):
    """What the apiserver does before validating: fill in the schema's `default`s in the objects present."""
    if isinstance(doc, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if not isinstance(sub, dict):
                continue
            if name not in doc and "default" in sub:
                doc[name] = copy.deepcopy(sub["default"])
            if name in doc:
                apply_defaults(sub, doc[name])
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for item in doc:
            apply_defaults(schema["items"], item)
    return doc


CEL = celpy.Environment()
CEL_PROGRAMS = {}
CEL_STATS = {"evaluated": 0, "rules": set(), "failed": set()}


def cel_errors(schema, doc, path="<root>"):
    """The x-kubernetes-validations rules (CEL) of the schema, evaluated on the document like the apiserver
    does: each rule with `self` bound to the value at its node, for the nodes present. Transition rules
    (oldSelf) only apply to updates and are skipped."""
    errs = []
    if not isinstance(schema, dict) or doc is None:
        return errs
    for rule in schema.get("x-kubernetes-validations") or []:
        expr = rule["rule"]
        if "oldSelf" in expr:
            continue
        try:
            if expr not in CEL_PROGRAMS:
                CEL_PROGRAMS[expr] = CEL.program(CEL.compile(expr))
            result = CEL_PROGRAMS[expr].evaluate({"self": celpy.json_to_cel(doc)})
        except Exception as e:  # a rule this evaluator cannot run must not pass silently
            errs.append(f"{path}: CEL rule {expr!r} could not be evaluated: {e}")
            continue
        CEL_STATS["evaluated"] += 1
        CEL_STATS["rules"].add(expr)
        if isinstance(result, celpy.CELEvalError):
            errs.append(f"{path}: CEL rule {expr!r} failed to evaluate: {result}")
        elif not bool(result):
            CEL_STATS["failed"].add(expr)
            errs.append(f"{path}: {rule.get('message') or 'failed rule: ' + expr}")
    if isinstance(doc, dict):
        props = schema.get("properties") or {}
        for name, value in doc.items():
            sub = props.get(name, schema.get("additionalProperties") if name not in props else None)
            if isinstance(sub, dict):
                errs += cel_errors(sub, value, f"{path}.{name}" if path != "<root>" else name)
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            errs += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errs


def count_cel_rules(schema):
    if isinstance(schema, dict):
        return len(schema.get("x-kubernetes-validations") or []) + sum(count_cel_rules(v) for v in schema.values())
    if isinstance(schema, list):
        return sum(count_cel_rules(v) for v in schema)
    return 0


def crd_validators(crd_path):
    docs = load_docs(crd_path)
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise SystemExit(f"FAIL: {crd_path} holds {len(crds)} CustomResourceDefinitions, expected one")
    crd = crds[0]
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    validators = {}
    for v in crd["spec"]["versions"]:
        if not v.get("served"):
            continue
        schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
        # Kubernetes always allows these at the root, and the generated schema need not list them.
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props["apiVersion"] = {"type": "string", "const": f"{group}/{v['name']}"}
        props["kind"] = {"type": "string", "const": kind}
        props["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}},
            "x-kubernetes-preserve-unknown-fields": True,
        }
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
        strict = strict_schema(schema)
        jsonschema.Draft7Validator.check_schema(strict)
        validators[f"{group}/{v['name']}"] = (jsonschema.Draft7Validator(strict), strict, schema)
    return group, kind, validators


def errors_of(validators, doc):
    api = doc.get("apiVersion")
    if api not in validators:
        return [f"apiVersion {api!r} is not a served version ({sorted(validators)})"]
    v, _, original = validators[api]
    doc = apply_defaults(original, copy.deepcopy(doc))
    errs = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    # Like the apiserver, CEL rules run on a structurally valid object.
    return errs or cel_errors(original, doc)


def mutations(doc, schema, path=()):
    """(description, mutated copy) pairs that strict validation must reject: an unknown field in every
    object of the document the schema closes, and a bad value for every enum field whose parent is there."""
    if not isinstance(doc, dict) or not isinstance(schema, dict):
        return
    props = schema.get("properties") or {}
    if props and schema.get("additionalProperties") is False:
        yield (f"unknown field {'.'.join(path + ('notARealField',))}", set_at(doc, path, "notARealField", "x"))
    for name, sub in props.items():
        if isinstance(sub, dict) and sub.get("enum"):
            yield (f"bad enum {'.'.join(path + (name,))}=carrier-pigeon", set_at(doc, path, name, "carrier-pigeon"))
    for name, sub in props.items():
        if isinstance(doc.get(name), dict):
            yield from mutations(doc[name], sub, path + (name,))


ROOT_DOC = None
DELETE = object()


def set_at(_doc, path, key, value):
    out = copy.deepcopy(ROOT_DOC)
    node = out
    for p in path:
        node = node[p]
    node[key] = value
    return out


def examples(crd_path, examples_dir):
    global ROOT_DOC
    group, kind, validators = crd_validators(crd_path)
    files = sorted(glob.glob(os.path.join(examples_dir, "*.yaml")) + glob.glob(os.path.join(examples_dir, "*.yml")))
    valid_count = invalid_count = unknown_neg = enum_neg = 0
    first_valid = None
    mutation_failures = []
    others = []
    for f in files:
        base_name = os.path.basename(f).lower()
        marked_invalid = "invalid" in base_name
        marked_illegal = "illegal" in base_name and not marked_invalid
        try:
            docs = load_docs(f)
        except yaml.YAMLError as e:
            report(False, f"{f}: YAML", str(e))
            continue
        for doc in docs:
            is_cr = isinstance(doc, dict) and doc.get("kind") == kind and str(doc.get("apiVersion", "")).startswith(group + "/")
            if not is_cr:
                others.append(f)
                continue
            name = f"{f}: {kind} {doc.get('metadata', {}).get('name', '?')}"
            errs = errors_of(validators, doc)
            if marked_invalid:
                invalid_count += 1
                report(bool(errs), f"{name} (named invalid) is rejected by the CRD schema"
                       + (f" [{errs[0]}]" if errs else ""),
                       "the schema accepted it: an example named *invalid* must be refused by the API server")
                continue
            if marked_illegal:
                report(not errs, f"{name} (named illegal: for the operator, Ready=False) is accepted by the CRD schema",
                       "\n".join(errs) + "\nan *illegal* example must reach the operator; name it *invalid* if the API "
                       "server is meant to refuse it")
                continue
            report(not errs, f"{name} validates against the CRD schema (strict)", "\n".join(errs))
            if errs:
                continue
            valid_count += 1
            ROOT_DOC = doc
            first_valid = first_valid or doc
            for desc, mutated in mutations(doc, validators[doc["apiVersion"]][1]):
                if desc.startswith("unknown"):
                    unknown_neg += 1
                else:
                    enum_neg += 1
                if not errors_of(validators, mutated):
                    mutation_failures.append(f"{name}: {desc} was accepted")
    report(valid_count > 0, f"{examples_dir} has valid {kind} examples ({valid_count})",
           f"no {kind} example in {examples_dir}")
    report(not mutation_failures and unknown_neg > 0 and enum_neg > 0,
           f"mutated examples are rejected: {unknown_neg} with an unknown field, {enum_neg} with a bad enum value",
           "\n".join(mutation_failures) or "no mutation could be made: the check would pass vacuously")
    # Built-in negatives, made from a resource the schema accepts (so each is refused for its own defect,
    # not for a missing required field): unknown fields, an unserved version, bad enums, and the CEL rules.
    if first_valid is None:
        report(False, "built-in negative resources are rejected", "no valid example to build them from")
    else:
        base = copy.deepcopy(first_valid)
        base["metadata"] = {"name": "negative"}
        api = base["apiVersion"]

        def variant(**spec_changes):
            doc = copy.deepcopy(base)
            for k, val in spec_changes.items():
                if val is DELETE:
                    doc["spec"].pop(k, None)
                else:
                    doc["spec"][k] = val
            return doc

        negatives = [
            ("an unknown top-level field", dict(copy.deepcopy(base), specc={})),
            ("an unknown spec field", variant(cacheNameTypo="x")),
            ("an unserved apiVersion", dict(copy.deepcopy(base), apiVersion=f"{group}/v9")),
        ]
        spec_schema = validators[api][1]["properties"].get("spec", {})
        for field, sub in (spec_schema.get("properties") or {}).items():
            if isinstance(sub, dict) and sub.get("enum"):
                negatives.append((f"a bad spec.{field}", variant(**{field: "carrier-pigeon"})))
        cel_rules = count_cel_rules(validators[api][2])
        if cel_rules:
            # Rules only CEL can express (DESIGN section 7): they must be enforced, and evaluated here.
            negatives += [
                ("transport redis without a redis section (CEL)",
                 variant(transport="redis", redis=DELETE, distributedCache=DELETE)),
                ("redis.database neither auto nor an index (CEL)",
                 variant(transport="redis", redis={"database": "lots"}, distributedCache=True)),
                ("redis.endpoint and redis.url together (CEL)",
                 variant(transport="redis", redis={"endpoint": "default", "url": "redis://r:6379"})),
                ("redis.acl with redis.credentialsSecretRef (CEL)",
                 variant(transport="redis", redis={"acl": True, "credentialsSecretRef": {"name": "creds"}})),
                ("distributedCache without a redis section (CEL)",
                 variant(transport="nats", redis=DELETE, distributedCache=True)),
                ("transport nats with an unused redis section (CEL)",
                 variant(transport="nats", redis={}, distributedCache=False)),
            ]
        lines, accepted = [], []
        for desc, doc in negatives:
            errs = errors_of(validators, doc)
            lines.append(f"{desc}: " + (errs[0] if errs else "ACCEPTED"))
            if not errs:
                accepted.append(desc)
        report(not accepted, f"{len(negatives)} built-in negative resources are rejected", "\n".join(lines),
               always=True)
        never_failed = sorted(CEL_STATS["rules"] - CEL_STATS["failed"])
        report(cel_rules == 0 or CEL_STATS["evaluated"] > 0,
               f"CEL rules evaluated: {len(CEL_STATS['rules'])} of the CRD's {cel_rules} x-kubernetes-validations,"
               f" {CEL_STATS['evaluated']} evaluations, {len(CEL_STATS['failed'])} rules seen rejecting a negative",
               "".join(f"note: no negative here breaks the rule {r!r}\n" for r in never_failed), always=True)
    with open(os.environ.get("OTHERS_OUT", "/dev/null"), "w") as out:
        out.write("\n".join(sorted(set(others))))


def docs(crd_path, *paths):
    """The FusionCache resources shown to users (```yaml blocks of a README, the heredoc of NOTES.txt) must be
    accepted too, so the instructions work when copied."""
    import textwrap
    group, kind, validators = crd_validators(crd_path)
    for arg in paths:
        path, _, label = arg.partition("=")
        with open(path) as f:
            text = f.read()
        blocks = re.findall(r"```ya?ml\n(.*?)```", text, re.S) + re.findall(r"<<'YAML'\n(.*?)\n\s*YAML\n", text, re.S)
        found = 0
        for block in blocks:
            try:
                docs_ = [d for d in yaml.safe_load_all(textwrap.dedent(block)) if d]
            except yaml.YAMLError as e:
                report(False, f"{label or path}: a YAML block parses", str(e))
                continue
            for doc in docs_:
                if isinstance(doc, dict) and doc.get("kind") == kind:
                    found += 1
                    errs = errors_of(validators, doc)
                    report(not errs, f"{label or path}: the {kind} {doc.get('metadata', {}).get('name')} it shows validates against the CRD",
                           "\n".join(errs))
        if not found:
            report(False, f"{label or path}: shows a {kind} example", "none found")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "policy":
        namespaces = [n for n in (sys.argv[4] if len(sys.argv) > 4 else "").split(",") if n]
        leader = (sys.argv[5] if len(sys.argv) > 5 else "true") == "true"
        policy(sys.argv[2], sys.argv[3], namespaces, leader)
    elif cmd == "examples":
        examples(sys.argv[2], sys.argv[3])
    elif cmd == "docs":
        docs(sys.argv[2], *sys.argv[3:])
    sys.exit(1 if FAILED else 0)
PY

run_py() { # counts the PASS/FAIL lines the python side prints
  local out rc=0
  out="$("$PY" "$TMP/checks.py" "$@" 2>&1)" || rc=$?
  printf '%s\n' "$out"
  PASSED=$((PASSED + $(grep -c '^PASS: ' <<<"$out" || true)))
  FAILED=$((FAILED + $(grep -c '^FAIL: ' <<<"$out" || true)))
  if [[ $rc != 0 && -z "$(grep '^FAIL: ' <<<"$out" || true)" ]]; then fail "python checks $1 crashed (exit $rc)"; fi
}

# ---- 4. policy ------------------------------------------------------------------------------------------------------
if [[ $render_ok == 1 ]]; then
  run_py policy "$TMP/install.yaml" "default values"
  run_py policy "$TMP/full.yaml" "every option on"
  run_py policy "$TMP/namespaced.yaml" "namespace-scoped, no leader election" "shop,billing" false
fi

# ---- 5. CRD drift ---------------------------------------------------------------------------------------------------
if [[ ! -f $CRD ]]; then
  fail "$CRD does not exist (the operator's \`fusioncache-operator crd\` output)"
elif cmp -s "$CRD" "$CHART_CRD"; then
  pass "$CHART_CRD equals $CRD"
else
  fail "$CHART_CRD differs from $CRD: run \`make install-manifest\` (bash scripts/chart-check.sh --write) to copy it"
  diff -u "$CRD" "$CHART_CRD" | head -40 | sed 's/^/    /' || true
fi

# ---- 6. install.yaml drift ----------------------------------------------------------------------------------------
if [[ $render_ok == 1 ]]; then
  if [[ ! -f $INSTALL ]]; then
    fail "$INSTALL does not exist: run \`make install-manifest\`"
  elif cmp -s "$TMP/install.yaml" "$INSTALL"; then
    pass "$INSTALL equals helm template of $CHART with default values"
  else
    fail "$INSTALL is out of date with $CHART: run \`make install-manifest\` (bash scripts/chart-check.sh --write)"
    diff -u "$INSTALL" "$TMP/install.yaml" | head -40 | sed 's/^/    /' || true
  fi
fi

# ---- 7. examples ----------------------------------------------------------------------------------------------------
if [[ -d $EXAMPLES ]]; then
  : >"$TMP/others"
  OTHERS_OUT="$TMP/others" run_py examples "$CHART_CRD" "$EXAMPLES"
  while IFS= read -r f || [[ -n $f ]]; do
    [[ -n $f ]] || continue
    check "$f | kubernetes-validate --strict -k $K8S_VERSION" kube_validate "$f"
  done <"$TMP/others"
else
  fail "$EXAMPLES does not exist"
fi

# ---- 8. the examples shown to users: chart README and the NOTES printed after helm install ----------------------
if "$HELM" install --dry-run=client "$RELEASE" "$CHART" --namespace "$NAMESPACE" >"$TMP/install-dry-run.txt" 2>&1; then
  sed -n '/^NOTES:/,$p' "$TMP/install-dry-run.txt" >"$TMP/NOTES.txt"
  run_py docs "$CHART_CRD" "$CHART/README.md" "$TMP/NOTES.txt=$CHART/templates/NOTES.txt (as helm install prints it)"
else
  fail "helm install --dry-run=client (renders NOTES.txt)"
  sed 's/^/    /' "$TMP/install-dry-run.txt"
fi

echo
echo "chart-check: $PASSED passed, $FAILED failed"
[[ $FAILED == 0 ]]
