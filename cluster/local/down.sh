#!/usr/bin/env bash
# Tear down the cluster that up.sh started: stop exactly the processes inside its two network
# namespaces (SIGTERM, then SIGKILL after a grace period) and delete the namespaces. The shared
# storage (MLflow database, checkpoints) stays in $CLUSTER_DIR/shared; --purge removes it too.
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_root
for ns in "$NS_WORKER" "$NS_HEAD"; do
  ip netns list | grep -qw "$ns" || continue
  pids=$(ip netns pids "$ns" || true)
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 20); do
    [ -z "$(ip netns pids "$ns" || true)" ] && break
    sleep 0.5
  done
  pids=$(ip netns pids "$ns" || true)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  for _ in $(seq 20); do
    [ -z "$(ip netns pids "$ns" || true)" ] && break
    sleep 0.25
  done
  ip netns del "$ns"
  echo "removed $ns"
done
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$CLUSTER_DIR"
  echo "removed $CLUSTER_DIR"
else
  rm -rf "$CLUSTER_DIR/ray-head" "$CLUSTER_DIR/ray-worker"
fi
