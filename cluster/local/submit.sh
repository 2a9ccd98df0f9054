#!/usr/bin/env bash
# Submit a job to the cluster/local cluster, from inside the head's namespace (its address
# exists nowhere else). Points the job at the head's MLflow server and the shared storage.
#
#   bash cluster/local/submit.sh [ray job submit options] -- python pipelines/train.py --config configs/small.yaml
#
# Training jobs get `--set run.storage_path=... --set data.output_dir=...` (sweeps:
# sweep.storage_path) under the shared storage appended unless they set them; everything else
# is passed to `ray job submit` unchanged.
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_root
opts=() ; entry=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; entry=("$@"); break; fi
  opts+=("$1"); shift
done
[ ${#entry[@]} -gt 0 ] || { echo "usage: submit.sh [options] -- <entrypoint...>" >&2; exit 2; }
joined=" ${entry[*]} "
case "$joined" in
  *pipelines/train.py*)
    [[ "$joined" == *run.storage_path=* ]] || entry+=(--set "run.storage_path=$SHARED/ray")
    [[ "$joined" == *data.output_dir=* ]] || entry+=(--set "data.output_dir=$SHARED/data/prepared")
    ;;
  *tune/sweep.py*)
    [[ "$joined" == *sweep.storage_path=* ]] || entry+=(--set "sweep.storage_path=$SHARED/tune")
    [[ "$joined" == *data.output_dir=* ]] || entry+=(--set "data.output_dir=$SHARED/data/prepared")
    ;;
esac
env_json="{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://$HEAD_IP:$MLFLOW_PORT\"}}"
cd "$ROOT"
in_ns "$NS_HEAD" env RAY_ADDRESS="http://$HEAD_IP:$DASHBOARD_PORT" \
  ray job submit --working-dir . --runtime-env-json "$env_json" "${opts[@]}" -- "${entry[@]}"
