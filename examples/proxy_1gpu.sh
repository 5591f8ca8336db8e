#!/usr/bin/env bash
# The DeepSeek-V3 proxy on one GPU, bf16 and fp8flow side by side (compact loop): progress lines,
# a table (loss, tokens/s, peak memory) and loss curves in fp8flow_results/.
set -euo pipefail
fp8flow train proxies/deepseek_v3_proxy_1gpu --compare bf16,fp8flow "$@"
