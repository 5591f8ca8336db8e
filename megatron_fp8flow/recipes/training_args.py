"""Megatron-LM training arguments a recipe may set besides ``TransformerConfig``'s fields.

``TransformerConfig`` (and ``MLATransformerConfig``) fields are read from the installed
megatron-core; these are the ``megatron.training`` arguments (model shape, data, optimizer,
schedule, parallelism, checkpointing, logging) that recipes use, in snake_case.
"""

TRAINING_ARGS = {
    # model and tokenizer
    "seq_length", "max_position_embeddings", "vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by",
    "position_embedding_type", "rotary_base", "rotary_percent", "rotary_scaling_factor", "mscale", "mscale_all_dim",
    "untie_embeddings_and_output_weights", "swiglu", "disable_bias_linear", "norm_epsilon", "group_query_attention",
    "num_query_groups", "tokenizer_type", "tokenizer_model", "spec", "use_mcore_models", "transformer_impl",
    "moe_grouped_gemm", "moe_router_load_balancing_type", "moe_token_dispatcher_type", "mtp_num_layers",
    "mtp_loss_scaling_factor",
    # data
    "data_path", "split", "mock_data", "num_workers", "data_cache_path", "no_create_attention_mask_in_dataloader",
    # optimizer and schedule
    "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "lr", "min_lr", "lr_decay_style",
    "lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters", "weight_decay", "clip_grad", "adam_beta1",
    "adam_beta2", "adam_eps", "init_method_std", "optimizer", "use_distributed_optimizer", "seed",
    # precision and recompute
    "bf16", "fp16", "fp8_format", "fp8_recipe", "recompute_granularity", "recompute_method", "recompute_num_layers",
    "recompute_modules",
    # parallelism
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "context_parallel_size", "sequence_parallel",
    "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
    "overlap_grad_reduce", "overlap_param_gather",
    # checkpoints and logging
    "save", "load", "save_interval", "eval_interval", "eval_iters", "log_interval", "tensorboard_dir",
    "log_throughput", "no_load_optim", "no_load_rng", "ckpt_format", "exit_interval",
}
