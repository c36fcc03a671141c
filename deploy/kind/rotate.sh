#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Rotate the KEK in the kind cluster and prove the old one is no longer needed:
#   1. `localkms keys rotate` inside the plugin pod (the plugin reloads within 2 s);
#   2. wait until the apiserver writes under the new key: it polls Status about once a
#      minute, so this takes up to ~2 minutes (APISERVER_WAIT seconds, default 150);
#   3. storage migration: rewrite every secret and configmap;
#   4. every secret and configmap in etcd must now carry the new key id;
#   5. the old key's decrypt count (`keys list --json`) must not grow over USAGE_WINDOW
#      seconds (default 70). The plugin writes its usage file at most once a minute (and at
#      shutdown), so the script first waits one window for counts from step 3 to be written,
#      then compares two readings one window apart: about 2.5 minutes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

APISERVER_WAIT="${APISERVER_WAIT:-150}"
USAGE_WINDOW="${USAGE_WINDOW:-70}"

require docker kind kubectl
require_cluster

tmp="$(mktemp -d)"
probe=""
cleanup() {
  if [[ -n "$probe" ]]; then
    k -n default delete secret "$probe" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

keystore_args=(--keystore "$KEYSTORE" --root-key-file "$ROOT_KEY")

# old_key_decrypts: the retired key's decrypt count from the plugin's usage file.
old_key_decrypts() {
  local json count
  json="$(plugin keys list --json "${keystore_args[@]}")" || die "localkms keys list failed"
  count="$(printf '%s\n' "$json" | tr '{' '\n' | grep -F "\"id\":\"$old\"" |
    sed -n 's/.*"decrypts":\([0-9]*\).*/\1/p' || true)"
  [[ -n "$count" ]] || die "key $old not found in keys list: $json"
  printf '%s\n' "$count"
}

# 1. Rotate.
old="$(current_key_id)"
log "current key: $old"
new="$(plugin keys rotate "${keystore_args[@]}" | head -n 1)"
[[ "$new" =~ ^[a-z0-9._-]+$ && "$new" != "$old" ]] || die "keys rotate printed an unexpected key id: '$new'"
log "new primary key: $new"
for _ in $(seq 10); do
  [[ "$(current_key_id)" == "$new" ]] && break
  sleep 1
done
[[ "$(current_key_id)" == "$new" ]] || die "the plugin still reports $(current_key_id) 10 s after the rotation"

# 2. Wait for the apiserver to write under the new key.
log "waiting up to ${APISERVER_WAIT}s for the apiserver to encrypt new writes under $new"
deadline=$((SECONDS + APISERVER_WAIT))
switched=false
while ((SECONDS < deadline)); do
  probe="localkms-rotate-probe-$(date +%s)"
  k -n default create secret generic "$probe" --from-literal=probe=localkms >/dev/null
  etcd_value "/registry/secrets/default/$probe" "$tmp/value"
  k -n default delete secret "$probe" --wait=false >/dev/null
  probe=""
  if encrypted_under "$tmp/value" "$new"; then
    switched=true
    break
  fi
  sleep 10
done
[[ "$switched" == true ]] ||
  die "after ${APISERVER_WAIT}s the apiserver still does not encrypt under $new (last value begins: $(describe_value "$tmp/value"))"
log "the apiserver encrypts under $new"

# 3. Storage migration. A replace can hit a conflict if a controller updates an object in
#    between; the whole pass is then simply repeated.
for resource in secrets configmaps; do
  log "storage migration: rewriting all $resource"
  for attempt in 1 2 3; do
    if k get "$resource" -A -o json | k replace -f - >/dev/null; then
      break
    fi
    ((attempt < 3)) || die "kubectl replace of $resource failed 3 times"
    log "retrying the $resource migration (attempt $((attempt + 1)))"
    sleep 2
  done
done

# 4. Every stored secret and configmap must carry the new key id.
bad=()
checked=0
for prefix in /registry/secrets/ /registry/configmaps/; do
  listing="$(etcd_ctl get "$prefix" --prefix --keys-only)"
  mapfile -t keys <<<"$listing"
  for key in "${keys[@]}"; do
    [[ -n "$key" ]] || continue
    etcd_value "$key" "$tmp/value"
    [[ -s "$tmp/value" ]] || continue # deleted since the listing
    checked=$((checked + 1))
    encrypted_under "$tmp/value" "$new" || bad+=("$key")
  done
done
if ((${#bad[@]} > 0)); then
  printf '  not under %s: %s\n' "$new" "${bad[@]}" >&2
  die "${#bad[@]} of $checked objects in etcd are not encrypted under the new key"
fi
log "all $checked secrets and configmaps in etcd are encrypted under $new"

# 5. Nothing should decrypt under the old key any more.
log "waiting ${USAGE_WINDOW}s for the plugin to write its usage file, then ${USAGE_WINDOW}s more to compare"
sleep "$USAGE_WINDOW"
before="$(old_key_decrypts)"
sleep "$USAGE_WINDOW"
after="$(old_key_decrypts)"
if ((after > before)); then
  die "the old key $old still served decrypts ($before -> $after over ${USAGE_WINDOW}s): something still reads data under it"
fi
log "OK: the old key $old served no decrypts over ${USAGE_WINDOW}s ($before in total)"
cat <<EOF

$old is retired (it still decrypts). To retire it for good on a real cluster: keep watching
'localkms keys list' on every node, then 'keys disable $old', and later 'keys destroy $old'.
EOF
