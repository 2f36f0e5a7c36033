#!/usr/bin/env bash
# Launch one stage on every GPU of this node, or of several nodes, with torchrun. Lightning reads torchrun's
# environment (TorchElasticEnvironment): trainer.devices must equal --nproc_per_node and trainer.num_nodes --nnodes.
#   bash recipes/launch/torchrun.sh STAGE RECIPE [lit-rlhf options...]
#   one node:   bash recipes/launch/torchrun.sh rl recipes/rl/ppo_fsdp_8gpu.yaml
#   two nodes:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash recipes/launch/torchrun.sh rl recipes/rl/ppo_fsdp_8gpu.yaml \
#                 --trainer.num_nodes 2          (and NODE_RANK=1 on the second node)
set -euo pipefail
stage=$1 recipe=$2
shift 2
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m lit_rlhf.cli "$stage" fit --config "$recipe" "$@"
