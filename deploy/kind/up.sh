#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a kind cluster whose kube-apiserver encrypts secrets and configmaps with localkms.
#   CLUSTER            cluster name (default localkms)
#   LOCALKMS_KIND_DIR  host directory for keys and rendered files (default ~/.localkms-kind)
#   KIND_NODE_IMAGE    optional kindest/node image (Kubernetes 1.29+ for KMS v2 "v2")
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

require docker kind kubectl
if cluster_exists; then
  die "a kind cluster named '$CLUSTER' already exists: run deploy/kind/down.sh first (or set CLUSTER=...)"
fi

log "building $IMAGE from $repo"
docker build -t "$IMAGE" "$repo"

# Host layout, kept across up/down so the cluster can be recreated with the same keys:
#   keys/       -> /etc/localkms            (created by docker, root-owned like on a real node)
#   enc/        -> /etc/kubernetes/enc      (encryption-config.yaml)
#   manifests/localkms.yaml -> /etc/kubernetes/manifests/localkms.yaml
mkdir -p "$KIND_DIR"
chmod 0700 "$KIND_DIR"
KIND_DIR="$(cd "$KIND_DIR" && pwd)"   # docker -v needs an absolute path
case "$KIND_DIR" in
  *'"'* | *'|'* | *'&'* | *\\* | *$'\n'*)
    die "LOCALKMS_KIND_DIR must not contain quotes, '|', '&', backslashes or newlines: $KIND_DIR" ;;
esac
keys="$KIND_DIR/keys"
enc="$KIND_DIR/enc"
manifests="$KIND_DIR/manifests"
mkdir -p "$enc" "$manifests"

# Run the image itself as root so the key files are root-owned 0600, as the plugin (uid 0 in
# the static pod) requires.
in_image() { docker run --rm --network none --user 0 -v "$keys:/etc/localkms" "$IMAGE" "$@"; }
if in_image keystore verify --keystore "$KEYSTORE" --root-key-file "$ROOT_KEY" >/dev/null 2>&1; then
  log "reusing the keystore in $keys"
else
  log "creating a root key and keystore in $keys"
  in_image init --keystore "$KEYSTORE" --root-key-file "$ROOT_KEY"
fi

# Single sources: the production encryption config and static pod, the latter with
# imagePullPolicy: Never added after its image: line (the image is loaded, not pulled).
cp "$repo/deploy/kubernetes/encryption-config.yaml" "$enc/encryption-config.yaml"
sed -e '/^ *image: localkms:dev$/{p;s/image: .*/imagePullPolicy: Never/;}' \
  "$repo/deploy/kubernetes/localkms.yaml" >"$manifests/localkms.yaml"
grep -q '^ *imagePullPolicy: Never$' "$manifests/localkms.yaml" ||
  die "could not add imagePullPolicy to the static pod: deploy/kubernetes/localkms.yaml has no 'image: localkms:dev' line"

tmp="$(mktemp -d)"
create_pid=""
cleanup() {
  if [[ -n "$create_pid" ]] && kill -0 "$create_pid" 2>/dev/null; then
    kill "$create_pid" 2>/dev/null || true
    echo "interrupted: a partial cluster may remain; remove it with deploy/kind/down.sh" >&2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

sed -e "s|@KEYS_DIR@|$keys|g" -e "s|@ENC_DIR@|$enc|g" -e "s|@STATIC_POD@|$manifests/localkms.yaml|g" \
  "$here/cluster.yaml.tmpl" >"$tmp/cluster.yaml"

create_args=(create cluster --name "$CLUSTER" --config "$tmp/cluster.yaml" --wait 5m)
if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
  create_args+=(--image "$KIND_NODE_IMAGE")
fi
log "kind ${create_args[*]}"
kind "${create_args[@]}" &
create_pid=$!

# The static pod uses imagePullPolicy: Never and the apiserver cannot become healthy until the
# plugin runs, so the image must reach the node's containerd while `kind create` is running.
log "waiting for node container $NODE"
until docker inspect "$NODE" >/dev/null 2>&1; do
  kill -0 "$create_pid" 2>/dev/null || break
  sleep 1
done
log "loading $IMAGE into $NODE (retrying until its containerd accepts it)"
loaded=false
load_err=""
while kill -0 "$create_pid" 2>/dev/null; do
  if load_err="$(kind load docker-image "$IMAGE" --name "$CLUSTER" 2>&1)"; then
    loaded=true
    break
  fi
  sleep 2
done

if ! wait "$create_pid"; then
  create_pid=""
  [[ "$loaded" == true ]] || echo "last 'kind load' error: $load_err" >&2
  die "kind create cluster failed. Inspect the plugin with: docker exec $NODE crictl ps -a; docker exec $NODE crictl logs <id>. Then run deploy/kind/down.sh"
fi
create_pid=""
if [[ "$loaded" != true ]]; then
  kind load docker-image "$IMAGE" --name "$CLUSTER"
fi

log "waiting for the apiserver's /healthz (includes the KMS provider check)"
healthy=false
for _ in $(seq 90); do
  if [[ "$(k get --raw /healthz 2>/dev/null)" == "ok" ]]; then
    healthy=true
    break
  fi
  sleep 2
done
if [[ "$healthy" != true ]]; then
  k get --raw '/healthz?verbose' >&2 || true
  die "the apiserver is not healthy after 3 minutes; check: kubectl --context kind-$CLUSTER -n kube-system logs localkms-$NODE"
fi

cat <<EOF

Cluster '$CLUSTER' is up (kubectl context kind-$CLUSTER); secrets and configmaps are encrypted
by localkms. Keys: $keys (root-owned; kept by down.sh unless --purge).

Next:
  $here/verify.sh    # a new secret is stored in etcd as ${PREFIX}... under the current key
  $here/rotate.sh    # rotate the KEK, migrate storage, check nothing uses the old key
  kubectl --context kind-$CLUSTER -n kube-system exec localkms-$NODE -- localkms keys list --keystore $KEYSTORE --root-key-file $ROOT_KEY
  $here/down.sh      # delete the cluster
EOF
