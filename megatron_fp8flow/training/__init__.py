"""Training with the plugin: a recipe-driven compact loop (where Megatron's ``pretrain()`` is not
installed, as with the megatron-core 0.16 wheel) and byte-level real text."""
