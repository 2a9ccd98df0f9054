#!/usr/bin/env bash
# Bring up a real 2-node Ray cluster on this machine: two network namespaces joined by a veth
# pair (HEAD_IP and WORKER_IP exist only inside them), a Ray head (with the dashboard, for
# `ray job submit`) in one, a Ray worker in the other, an MLflow tracking server on the head
# (SQLite backend, proxied artifacts), and $CLUSTER_DIR/shared as storage both nodes use.
# Token authentication is on, with a token file private to this cluster.
#
#   make cluster-up          (or: sudo bash cluster/local/up.sh)
#   make cluster-down
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_root
test -x "$VENV/bin/ray" || { echo "no Ray in $VENV: run 'make install' first" >&2; exit 1; }
if ip netns list | grep -qw "$NS_HEAD"; then
  echo "namespace $NS_HEAD exists: the cluster is up already (make cluster-down first)" >&2; exit 1
fi

mkdir -p "$CLUSTER_DIR"/{logs,ray-head,ray-worker} "$SHARED"
chmod 700 "$CLUSTER_DIR"
if [ ! -s "$TOKEN" ]; then
  (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN")
fi

echo "network: $NS_HEAD ($HEAD_IP) <-veth-> $NS_WORKER ($WORKER_IP)"
ip netns add "$NS_HEAD"
ip netns add "$NS_WORKER"
ip link add bitlm-veth0 type veth peer name bitlm-veth1
ip link set bitlm-veth0 netns "$NS_HEAD"
ip link set bitlm-veth1 netns "$NS_WORKER"
# Inside its namespace each end is eth0, as on two real hosts: gloo (torch.distributed on CPU)
# is told which interface to use by GLOO_SOCKET_IFNAME=eth0 (see common.sh).
ip -n "$NS_HEAD" link set bitlm-veth0 name eth0
ip -n "$NS_WORKER" link set bitlm-veth1 name eth0
ip -n "$NS_HEAD" addr add "$HEAD_IP/24" dev eth0
ip -n "$NS_WORKER" addr add "$WORKER_IP/24" dev eth0
for ns in "$NS_HEAD" "$NS_WORKER"; do
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
done

echo "ray head on $HEAD_IP:$RAY_PORT (dashboard :$DASHBOARD_PORT)"
in_ns "$NS_HEAD" ray start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" \
  --dashboard-host "$HEAD_IP" --dashboard-port "$DASHBOARD_PORT" --num-cpus "$CPUS_PER_NODE" \
  --temp-dir "$CLUSTER_DIR/ray-head" --disable-usage-stats > "$CLUSTER_DIR/logs/ray-head.log" 2>&1 \
  || { cat "$CLUSTER_DIR/logs/ray-head.log" >&2; exit 1; }

echo "ray worker on $WORKER_IP"
in_ns "$NS_WORKER" ray start --address "$HEAD_IP:$RAY_PORT" --node-ip-address "$WORKER_IP" \
  --num-cpus "$CPUS_PER_NODE" --temp-dir "$CLUSTER_DIR/ray-worker" --disable-usage-stats \
  > "$CLUSTER_DIR/logs/ray-worker.log" 2>&1 || { cat "$CLUSTER_DIR/logs/ray-worker.log" >&2; exit 1; }

echo "mlflow server on http://$HEAD_IP:$MLFLOW_PORT"
mkdir -p "$SHARED/mlflow"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false in_ns "$NS_HEAD" setsid mlflow server \
  --host "$HEAD_IP" --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$SHARED/mlflow/mlflow.db" \
  --artifacts-destination "$SHARED/mlflow/artifacts" --serve-artifacts \
  --allowed-hosts "$HEAD_IP:$MLFLOW_PORT,$HEAD_IP,localhost:*" \
  > "$CLUSTER_DIR/logs/mlflow.log" 2>&1 < /dev/null &
for _ in $(seq 120); do
  if ip netns exec "$NS_WORKER" "$VENV/bin/python" -c \
    "import urllib.request; urllib.request.urlopen('http://$HEAD_IP:$MLFLOW_PORT/health', timeout=2)" 2>/dev/null; then
    break
  fi
  sleep 1
done
ip netns exec "$NS_WORKER" "$VENV/bin/python" -c \
  "import urllib.request; urllib.request.urlopen('http://$HEAD_IP:$MLFLOW_PORT/health', timeout=2)" \
  || { echo "mlflow server did not come up:" >&2; tail -20 "$CLUSTER_DIR/logs/mlflow.log" >&2; exit 1; }

in_ns "$NS_HEAD" python - <<PY
import ray
ray.init(address="$HEAD_IP:$RAY_PORT", _node_ip_address="$HEAD_IP", logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
print(f"cluster up: {len(nodes)} nodes", sorted(n["NodeManagerAddress"] for n in nodes))
assert len(nodes) == 2, nodes
PY
cat <<MSG
shared storage: $SHARED   (set run.storage_path and data.output_dir under it; submit.sh does)
MLflow:         http://$HEAD_IP:$MLFLOW_PORT   (reachable from inside the namespaces)
submit a job:   bash cluster/local/submit.sh -- python pipelines/train.py --config configs/small.yaml
tear down:      make cluster-down
MSG
