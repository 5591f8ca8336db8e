#!/usr/bin/env bash
# The eight-GPU DeepSeek-V3 proxy through Megatron's own pretrain() (needs megatron-core >= 0.19,
# whose wheel ships megatron.training): mock data and the null tokenizer unless the recipe or
# --set names data (e.g. --set data_path=/data/my_text_document --set tokenizer_type=...).
set -euo pipefail
fp8flow train proxies/deepseek_v3_proxy_8gpu --megatron --nproc 8 "$@"
