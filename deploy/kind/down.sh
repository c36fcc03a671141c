#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete the kind cluster. The key directory is kept (the next up.sh reuses the keys) unless
# --purge is given.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

purge=false
case "${1:-}" in
  "") ;;
  --purge) purge=true ;;
  *) die "usage: $0 [--purge]" ;;
esac

require docker kind
if cluster_exists; then
  kind delete cluster --name "$CLUSTER"
else
  log "no kind cluster named '$CLUSTER'"
fi

if [[ "$purge" != true ]]; then
  log "kept $KIND_DIR (keys in $KIND_DIR/keys); delete it with: $0 --purge"
  exit 0
fi
[[ -e "$KIND_DIR" ]] || exit 0
# The key files were created by root inside a container; an ordinary user may not remove them.
if rm -rf "$KIND_DIR" 2>/dev/null; then
  log "removed $KIND_DIR (the keys are gone: anything encrypted under them is unreadable)"
else
  die "could not remove $KIND_DIR (its keys/ is root-owned): run  sudo rm -rf '$KIND_DIR'"
fi
