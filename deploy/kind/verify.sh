#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Check that a new secret is stored in etcd encrypted by localkms under the current key:
# the value must start with k8s:enc:kms:v2:localkms: and carry the key_id the plugin reports.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

require docker kind kubectl
require_cluster

name="localkms-verify-$(date +%s)"
tmp="$(mktemp -d)"
cleanup() {
  k -n default delete secret "$name" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

key_id="$(current_key_id)"
log "plugin's current key: $key_id"

k -n default create secret generic "$name" --from-literal=probe=localkms >/dev/null
etcd_value "/registry/secrets/default/$name" "$tmp/value" ||
  die "could not read /registry/secrets/default/$name from etcd (pod etcd-$NODE)"

if ! encrypted_under "$tmp/value" "$key_id"; then
  echo "etcd value begins: $(describe_value "$tmp/value")" >&2
  if [[ "$(head -c "${#PREFIX}" "$tmp/value" | tr -d '\0')" != "$PREFIX" ]]; then
    die "secret default/$name is NOT encrypted by localkms (no $PREFIX prefix): is --encryption-provider-config set on the apiserver?"
  fi
  die "secret default/$name is encrypted by localkms but not under the current key $key_id (the apiserver picks up a new key within about a minute of a rotation)"
fi
log "OK: default/$name is stored as ${PREFIX}... under key $key_id"
