#!/usr/bin/env bash
# Start this node's torchrun agent of a multi-node pipeline (c10d rendezvous).
#
#   deploy/multinode/run-node.sh deploy/multinode/node0.env     # on the first host
#   deploy/multinode/run-node.sh deploy/multinode/node1.env     # on the second host
#
# Every node uses the same CONFIG file and the same RDZV_ENDPOINT; the job starts
# once NNODES agents have joined. torchrun's c10d rendezvous orders nodes by
# LOCAL_ADDR: the node whose address sorts first hosts global rank 0, so that is
# where the HTTP API listens (node0.env's address must sort first).
# NPROC_PER_NODE over all nodes must add up to 1 + stages * tp.
set -euo pipefail
ENV_FILE=${1:?usage: run-node.sh NODE_ENV_FILE}
# shellcheck disable=SC1090
source "$ENV_FILE"
EXTRA=()
if [[ -n "${TOKEN_FILE:-}" ]]; then EXTRA+=(--token-file "$TOKEN_FILE"); fi
exec "${PPSTAGE:-.venv/bin}/torchrun" \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
    --local-addr "$LOCAL_ADDR" \
    -m ppstage.cli serve --config "$CONFIG" --host "$HOST" --port "$PORT" "${EXTRA[@]}"
