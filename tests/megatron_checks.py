"""Work done in separate processes by test_megatron.py (the CPU shims patch torch.cuda for the
whole process, and EP = 2 needs two ranks). Each worker puts (rank, results) in the queue."""

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_fp8flow.megatron import FP8FlowSettings
from megatron_fp8flow.megatron import small_model as sm


BACKEND = "auto" if torch.cuda.is_available() else "emulated"  # cuBLAS on the GPU


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / (b.norm() + 1e-30))


def compare_with_stock(rank, world, port, modes, queue):
    """The plugin model in each mode against the stock MoE model with the same weights (loaded
    from the stock state dict: same keys and shapes).

    * the full small model (2 layers + MTP): loss, and the median gradient difference; a
      rounding difference can flip a token's top-k choice in a later layer, which changes
      that layer's expert gradients wholesale, so only the median is bounded here;
    * one MoE layer, no MTP: the layer's input and so its routing are bit-identical between the
      two models, and every gradient difference is rounding: the maximum is bounded."""
    import statistics

    sm.init_parallel(rank, world, ep=world, port=port)
    out = {}
    for name, shape in (("full", sm.device_shape()), ("one_layer", sm.device_shape(num_layers=1, mtp_layers=0))):
        cfg = sm.config(shape)
        stock = sm.build(cfg, shape=shape)
        data = sm.batch(shape, seed=11 + rank)
        stock_loss = float(sm.loss_and_backward(stock, data))
        ref = _grads(stock)
        res = {"stock_loss": stock_loss, "modes": {}}
        kept = {}
        for mode in modes:
            plugin = sm.build(cfg, FP8FlowSettings(mode=mode, gemm_backend=BACKEND), shape=shape, seed=99)
            plugin.load_state_dict(stock.state_dict(), strict=True)
            loss = float(sm.loss_and_backward(plugin, data))
            grads = _grads(plugin)
            rels = [_rel(grads[n], ref[n]) for n in ref if n in grads]
            moe_layers = [m for m in plugin.modules() if isinstance(m, MoELayer)]
            moe = moe_layers[0]
            res["modes"][mode] = {
                "loss": loss,
                "missing_grads": sorted(set(ref) ^ set(grads)),
                "max_grad_rel": max(rels),
                "median_grad_rel": statistics.median(rels),
                "finite": all(bool(torch.isfinite(g).all()) for g in grads.values()),
                "classes": (type(moe).__name__, type(moe.experts).__name__, type(moe.token_dispatcher).__name__),
                "moe_layers": sorted({type(m).__name__ for m in moe_layers}),
                "num_moe_layers": len(moe_layers),  # decoder layers + MTP layers
            }
            kept[mode] = (loss, grads)
        if "flow" in kept and "flow_double_quant" in kept:
            (la, ga), (lb, gb) = kept["flow"], kept["flow_double_quant"]
            res["flow_equals_double_quant"] = la == lb and all(torch.equal(ga[n], gb[n]) for n in ga)
        out[name] = res
    queue.put((rank, out))


def checkpoint_switch(rank, world, port, queue):
    """Checkpoints move between the stock layer and the plugin both ways.

    * Distributed checkpoints are a function of the sharded state dict: the plugin's has the
      same keys, global shapes, offsets, fragmentation and replica ids as the stock one, so a
      checkpoint written by either is the same file set and loads into the other. (Writing
      one in this harness hung: Megatron's writer forks processes from these spawned ranks.)
    * Plain state dicts: stock -> plugin -> stock gives back every tensor unchanged."""
    sm.init_parallel(rank, world, ep=world, port=port)
    shape = sm.device_shape()
    cfg = sm.config(shape)
    stock = sm.build(cfg, shape=shape, seed=1)
    plugin = sm.build(cfg, FP8FlowSettings(mode="flow", gemm_backend=BACKEND), shape=shape, seed=2)

    def layout(model):
        out = {}
        for k, v in model.sharded_state_dict().items():
            fields = ("key", "global_shape", "global_offset", "axis_fragmentations", "replica_id", "dtype")
            out[k] = (type(v).__name__, *(str(getattr(v, f, None)) for f in fields))
        return out

    same_layout = layout(stock) == layout(plugin)
    plugin.load_state_dict(stock.state_dict(), strict=True)
    fresh = sm.build(cfg, shape=shape, seed=3)
    before = [p.detach().clone() for p in fresh.parameters()]
    fresh.load_state_dict(plugin.state_dict(), strict=True)
    a, b = stock.state_dict(), fresh.state_dict()
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    changed = any(not torch.equal(p, q) for p, q in zip(before, fresh.parameters()))
    queue.put((rank, {"same_layout": same_layout, "identical": identical, "loaded_something": changed}))


def moe_layer_benchmark_smoke(rank, world, port, queue):
    """The MoE-layer benchmark end to end on tiny shapes (its timings mean nothing on a CPU)."""
    from megatron_fp8flow.benchmarks import moe_layer

    sm.init_parallel(rank, world, ep=world, port=port)
    result = moe_layer.run(hidden=128, moe_ffn=128, local_experts=2, topk=2, tokens=32,
                           modes=("stock", "bf16", "flow"), reps=1, warmup=1)
    queue.put((rank, None if result is None else moe_layer.render(result)))


def compact_loop_smoke(rank, world, port, queue):
    """Two steps of the compact training loop on the tiny CPU recipe (shortened)."""
    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training.loop import train

    recipe = load_recipe("proxies/tiny_cpu", {"seq_length": 16, "max_position_embeddings": 16, "micro_batch_size": 2,
                                              "global_batch_size": 4, "log_interval": 1})
    queue.put((rank, train(recipe, steps=2)))
