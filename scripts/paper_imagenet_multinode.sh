#!/usr/bin/env bash
# The paper's ImageNet runs on several NODES with torchrun (nccl, c10d rendezvous). Start this script
# on every node with the same RDZV_ENDPOINT and RDZV_ID and its own NODE_RANK; DATA and MODELS must be
# readable on every node (MEHL's --resume state is written next to the soup: put OUT on a shared folder).
#
#   NNODES=2 NODE_RANK=0 NGPU=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=soups1 \
#     DATA=/data MODELS=/data/model_soups bash scripts/paper_imagenet_multinode.sh mehl
#
# Expected: as scripts/paper_imagenet.sh (MEHL-Soup+ 81.62). Memory per GPU ~ K / (NNODES * NGPU)
# ingredients + one model.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT host:port}"
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
RDZV_ID=${RDZV_ID:-model-soups}
PY=${PYTHON:-.venv/bin/python}
LAUNCH="$PY -m torch.distributed.run --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $NGPU \
--rdzv_backend c10d --rdzv_endpoint $RDZV_ENDPOINT --rdzv_id $RDZV_ID" exec bash scripts/paper_imagenet.sh "$@"
