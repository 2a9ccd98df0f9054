#!/usr/bin/env bash
# Tear down the cluster that up.sh started: stop exactly the processes inside its two network
# namespaces (SIGTERM, then SIGKILL after a grace period) and delete the namespaces. The shared
# storage (MLflow database, checkpoints) stays in $CLUSTER_DIR/shared; --purge removes it too.
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_root
# signal_and_wait NS SIGNAL INTERVAL: signal every process in NS, then wait up to 20 intervals
# for them to exit.
signal_and_wait() {
  local pids
  pids=$(ip netns pids "$1" || true)
  [ -n "$pids" ] && kill "-$2" $pids 2>/dev/null || true
  for _ in $(seq 20); do
    [ -z "$(ip netns pids "$1" || true)" ] && return
    sleep "$3"
  done
}
for ns in "$NS_WORKER" "$NS_HEAD"; do
  ip netns list | grep -qw "$ns" || continue
  signal_and_wait "$ns" TERM 0.5
  signal_and_wait "$ns" KILL 0.25
  ip netns del "$ns"
  echo "removed $ns"
done
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$CLUSTER_DIR"
  echo "removed $CLUSTER_DIR"
else
  rm -rf "$CLUSTER_DIR/ray-head" "$CLUSTER_DIR/ray-worker"
fi
