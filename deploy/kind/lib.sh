# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts sourcing this
# Shared by up.sh, verify.sh, rotate.sh and down.sh (sourced, not run).

CLUSTER="${CLUSTER:-localkms}"
KIND_DIR="${LOCALKMS_KIND_DIR:-$HOME/.localkms-kind}"   # keys/, enc/, manifests/ live here
NODE="${CLUSTER}-control-plane"                          # kind's node (and container) name
IMAGE="localkms:dev"
SOCKET="unix:///var/run/localkms/kms.sock"
KEYSTORE="/etc/localkms/keystore.lkms"
ROOT_KEY="/etc/localkms/root.key"
PREFIX="k8s:enc:kms:v2:localkms:"                        # what the apiserver writes to etcd

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# require TOOL...: every tool must be on PATH, and a docker daemon must answer if docker is one.
require() {
  local tool missing=()
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if ((${#missing[@]} > 0)); then
    for tool in "${missing[@]}"; do
      case "$tool" in
        docker) echo "missing: docker (https://docs.docker.com/engine/install/)" >&2 ;;
        kind) echo "missing: kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)" >&2 ;;
        kubectl) echo "missing: kubectl (https://kubernetes.io/docs/tasks/tools/)" >&2 ;;
        *) echo "missing: $tool" >&2 ;;
      esac
    done
    die "install the missing tools above and run this again"
  fi
  if [[ " $* " == *" docker "* ]] && ! docker info >/dev/null 2>&1; then
    die "docker is installed but no Docker daemon answers ('docker info' fails): start Docker, or make sure this user may use it"
  fi
}

# cluster_exists: kind knows a cluster named $CLUSTER.
cluster_exists() {
  local clusters
  clusters="$(kind get clusters 2>/dev/null)" || return 1
  grep -qx -- "$CLUSTER" <<<"$clusters"
}

# require_cluster: the kind cluster exists.
require_cluster() {
  if ! cluster_exists; then
    die "no kind cluster named '$CLUSTER': run deploy/kind/up.sh first (or set CLUSTER=...)"
  fi
}

# kubectl against this cluster only, whatever the current context is.
k() { kubectl --context "kind-${CLUSTER}" "$@"; }

# plugin ARGS...: run the localkms binary inside the plugin's static pod.
plugin() { k -n kube-system exec "localkms-${NODE}" -- localkms "$@"; }

# etcd_ctl ARGS...: etcdctl inside the etcd static pod (it has the client certificates).
etcd_ctl() {
  k -n kube-system exec "etcd-${NODE}" -- etcdctl \
    --endpoints=https://127.0.0.1:2379 \
    --cacert=/etc/kubernetes/pki/etcd/ca.crt \
    --cert=/etc/kubernetes/pki/etcd/server.crt \
    --key=/etc/kubernetes/pki/etcd/server.key \
    "$@"
}

# current_key_id: the key_id the plugin's Status reports (its primary KEK).
current_key_id() {
  local json id
  json="$(plugin status --socket "$SOCKET" --json)" || die "localkms status failed in pod localkms-${NODE}"
  id="$(printf '%s\n' "$json" | sed -n 's/.*"key_id":"\([^"]*\)".*/\1/p')"
  [[ -n "$id" ]] || die "no key_id in localkms status output: $json"
  printf '%s\n' "$id"
}

# etcd_value KEY FILE: write the raw (binary) etcd value of KEY to FILE.
etcd_value() { etcd_ctl get "$1" --print-value-only >"$2"; }

# encrypted_under FILE KEY_ID: the value starts with localkms's KMS v2 prefix and names KEY_ID
# (the key id is stored in clear in the apiserver's EncryptedObject).
encrypted_under() {
  [[ "$(head -c "${#PREFIX}" "$1" | tr -d '\0')" == "$PREFIX" ]] && grep -aqF -- "$2" "$1"
}

# describe_value FILE: the first bytes of a value, printable, for error messages.
describe_value() { head -c 40 "$1" | tr -c '[:print:]' '.'; }
