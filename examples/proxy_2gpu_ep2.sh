#!/usr/bin/env bash
# The DeepSeek-V3 proxy on two GPUs at expert parallelism 2 (compact loop under torchrun).
set -euo pipefail
fp8flow train proxies/deepseek_v3_proxy_2gpu --nproc 2 --compare bf16,fp8flow "$@"
