#!/usr/bin/env bash
# One node runs the whole pipeline under torchrun: rank 0 (control plane + HTTP
# API) and every generator rank. torchrun restarts the job up to MAX_RESTARTS
# times; each restart is a new generation that starts with a hard cut.
#
#   CONFIG=deploy/configs/r0a.toml PORT=8000 deploy/torchrun-single-node.sh
#
# World size is read from the config (1 + stages * tp). Off loopback, set
# PPSTAGE_API_TOKEN (or TOKEN_FILE) and HOST=0.0.0.0.
set -euo pipefail
CONFIG=${CONFIG:-deploy/configs/r0a.toml}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_PORT=${RDZV_PORT:-29400}
PPSTAGE=${PPSTAGE:-.venv/bin}
NPROC=$("$PPSTAGE/python" -c "import sys; from ppstage.config import PPStageConfig; print(PPStageConfig.from_toml(sys.argv[1]).topology.world_size)" "$CONFIG")
EXTRA=()
if [[ -n "${TOKEN_FILE:-}" ]]; then EXTRA+=(--token-file "$TOKEN_FILE"); fi
exec "$PPSTAGE/torchrun" \
    --nnodes 1 --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$RDZV_PORT" \
    -m ppstage.cli serve --config "$CONFIG" --host "$HOST" --port "$PORT" "${EXTRA[@]}"
