# Settings shared by up.sh, down.sh and submit.sh. Override any of them in the environment.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CLUSTER_DIR="${BITLM_CLUSTER_DIR:-/tmp/bitlm-cluster}"   # state, logs, token, shared storage
NS_HEAD="${BITLM_NS_HEAD:-bitlm-head}"
NS_WORKER="${BITLM_NS_WORKER:-bitlm-worker}"
HEAD_IP="${BITLM_HEAD_IP:-10.231.0.1}"                   # exist only inside the namespaces
WORKER_IP="${BITLM_WORKER_IP:-10.231.0.2}"
RAY_PORT="${BITLM_RAY_PORT:-6380}"
DASHBOARD_PORT="${BITLM_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${BITLM_MLFLOW_PORT:-5000}"
CPUS_PER_NODE="${BITLM_CPUS_PER_NODE:-4}"   # logical: 2 training workers + Ray Data tasks
SHARED="$CLUSTER_DIR/shared"                             # stands in for an NFS mount on every node
TOKEN="$CLUSTER_DIR/auth_token"

# The environment every process of the cluster (and every client of it) runs with.
cluster_env() {
  echo PATH="$VENV/bin:$PATH" \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" \
    RAY_ADDRESS="$HEAD_IP:$RAY_PORT" \
    GLOO_SOCKET_IFNAME=eth0 \
    MLFLOW_TRACKING_URI="http://$HEAD_IP:$MLFLOW_PORT" \
    PYTHONPATH="$ROOT"
}

in_ns() {  # in_ns <namespace> <command...>: run with the cluster's environment inside a namespace
  local ns="$1"; shift
  # shellcheck disable=SC2046
  ip netns exec "$ns" env $(cluster_env) "$@"
}

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "cluster/local needs root for network namespaces (ip netns): run it as root or with sudo" >&2
    exit 1
  fi
}
