"""Work done in separate processes by test_megatron.py (the CPU shims patch torch.cuda for the
whole process, and EP = 2 needs two ranks). Each worker puts (rank, results) in the queue."""

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_fp8flow.megatron import FP8FlowSettings
from megatron_fp8flow.megatron import small_model as sm
from megatron_fp8flow.megatron.parallel import enable_deterministic_algorithms


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


def checkpoint_switch(rank, world, port, ckpt_root, queue):
    """Distributed checkpoints move between the stock layer and the plugin both ways, with
    Megatron's own writer and reader (torch_dist format): stock saves, the plugin loads (and
    trains a step on what it loaded), the plugin saves, a fresh stock model loads; every
    tensor is the stock model's. The sharded state dicts (keys, global shapes, offsets,
    replica ids) are identical, which is what makes the files interchangeable."""
    import os

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

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

    def save(model, name):
        path = os.path.join(ckpt_root, name)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        torch.distributed.barrier()
        strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
        dist_checkpointing.save(model.sharded_state_dict(), path, sharded_strategy=strategy)
        return path

    def load(model, path):
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path), strict=True)

    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(
            torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))

    same_layout = layout(stock) == layout(plugin)
    differed = not same(stock, plugin)  # different seeds: loading must change something
    load(plugin, save(stock, "stock"))
    plugin_loaded = same(stock, plugin)
    resumed_loss = float(sm.loss_and_backward(plugin, sm.batch(shape, seed=5 + rank)))
    fresh = sm.build(cfg, shape=shape, seed=3)
    load(fresh, save(plugin, "plugin"))
    queue.put((rank, {"same_layout": same_layout, "differed": differed, "plugin_loaded": plugin_loaded,
                      "stock_reloaded": same(stock, fresh), "resumed_loss_finite": resumed_loss == resumed_loss}))


def moe_layer_benchmark_smoke(rank, world, port, queue):
    """The MoE-layer benchmark end to end on tiny shapes (its timings mean nothing on a CPU)."""
    from megatron_fp8flow.benchmarks import moe_layer

    sm.init_parallel(rank, world, ep=world, port=port)
    width = sm.device_shape().hidden  # cuBLAS's blockwise FP8 GEMMs need K % 512 == 0 on the GPU
    tables = []
    for grads in moe_layer.CONTRACTS:
        result = moe_layer.run(hidden=width, moe_ffn=width, local_experts=2, topk=2, tokens=32,
                               modes=("stock", "bf16", "flow"), reps=1, warmup=1, grads=grads)
        tables.append(None if result is None else moe_layer.render(result))
    # two microbatches per step, the FP8 weights quantized on the first only
    from megatron_fp8flow.moe import experts as mx

    calls, original = [], mx._quantize_weights
    mx._quantize_weights = lambda weights, n: calls.append(n) or original(weights, n)
    try:
        result = moe_layer.run(hidden=width, moe_ffn=width, local_experts=2, topk=2, tokens=32, modes=("flow",),
                               reps=2, warmup=1, microbatches=2)
    finally:
        mx._quantize_weights = original
    tables.append(None if result is None else moe_layer.render(result))
    queue.put((rank, {"tables": tables, "quantized": len(calls)}))


def compact_loop_smoke(rank, world, port, queue):
    """Two steps of the compact training loop on the tiny CPU recipe (shortened): a 5-step run
    that exit_interval ends after step 2; with two ranks, EP = 2. Also returns the replicated
    (non-expert) parameters, which must stay equal on all ranks, and the learning rate the
    5-step schedule gives step 2."""
    import hashlib
    import os

    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training import loop

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port))
    recipe = load_recipe("proxies/tiny_cpu", {"seq_length": 16, "max_position_embeddings": 16, "micro_batch_size": 2,
                                              "global_batch_size": 4, "log_interval": 1, "eval_interval": 2,
                                              "eval_iters": 1, "expert_model_parallel_size": world,
                                              "exit_interval": 2, "lr_warmup_iters": 0})
    kept = {}
    history = loop.train(recipe, steps=5, keep_model=kept)
    model = kept["model"]
    shared = {n: hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()  # exact: bf16 -> fp32
              for n, p in model.named_parameters() if not loop._is_expert(p)}
    experts = sum(1 for p in model.parameters() if loop._is_expert(p))
    queue.put((rank, {"history": history, "shared": shared, "expert_params": experts,
                      "lr_step2": {n: loop._lr(recipe.args, 1, n) for n in (2, 5)}}))


def compact_loop_weight_cache(rank, world, port, queue):
    """Two steps of two microbatches of the tiny recipe (validation after step 2, past an
    optimizer step), with and without ``cache_fp8_weights``: the histories, how many times the
    expert weights were quantized, the plugin's expert blocks, and what was logged."""
    import logging
    import os

    from megatron_fp8flow.megatron.experts import FP8FlowExperts
    from megatron_fp8flow.moe import experts as block
    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training import loop

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port))
    quantize = block._quantize_weights
    calls = [0]

    def counted(*a, **k):
        calls[0] += 1
        return quantize(*a, **k)

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logging.getLogger("megatron_fp8flow").addHandler(records)
    block._quantize_weights = counted
    out = {}
    for cache in (False, True):
        calls[0] = 0
        recipe = load_recipe("proxies/tiny_cpu", {
            "seq_length": 16, "max_position_embeddings": 16, "micro_batch_size": 2, "global_batch_size": 4,
            "log_interval": 1, "eval_interval": 2, "eval_iters": 1, "lr_warmup_iters": 0,
            "fp8flow.cache_fp8_weights": cache})
        kept = {}
        history = loop.train(recipe, steps=2, keep_model=kept)
        layers = [m for m in kept["model"].modules() if isinstance(m, FP8FlowExperts)]
        out[cache] = {"history": history, "quantized": calls[0], "layers": len(layers),
                      "held_after": sum(m._fp8_weights is not None for m in layers)}
    block._quantize_weights = quantize
    out["warnings"] = records.messages
    queue.put((rank, out))


def compact_loop_on_indexed_data(rank, world, port, queue):
    """Two steps of the tiny recipe on the Megatron indexed dataset at $FP8FLOW_TEST_DATA, and
    the text the loop reads from it (its sizes and digests)."""
    import hashlib
    import os

    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training import loop

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port))
    prefix = os.environ["FP8FLOW_TEST_DATA"]
    recipe = load_recipe("proxies/tiny_cpu", {"seq_length": 16, "max_position_embeddings": 16, "micro_batch_size": 2,
                                              "global_batch_size": 2, "log_interval": 1, "eval_interval": 2,
                                              "eval_iters": 1, "data_path": [prefix], "split": "90,10,0"})
    batches = loop._batches(recipe.args, 2, 0)
    history = loop.train(recipe, steps=2)
    digest = {k: hashlib.sha256(v.cpu().numpy().tobytes()).hexdigest() for k, v in (("train", batches.train),
                                                                                ("valid", batches.valid))}
    # Small results only: the parent reads the queue after the ranks end (a full pipe would block).
    queue.put((rank, {"history": history, "sizes": (len(batches.train), len(batches.valid)), **digest}))


def model_specs(rank, world, port, queue):
    """What the compact loop's specs build for a 3-layer MLA recipe with moe_layer_freq [0,1,1]."""
    from megatron_fp8flow.megatron import compat
    from megatron_fp8flow.megatron.compat import spec_builds
    from megatron_fp8flow.megatron.spec import gpt_model_specs
    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training.model import config_class, config_kwargs

    sm.init_parallel(rank, world)
    args = load_recipe("proxies/tiny_cpu", {"num_layers": 3, "moe_layer_freq": "[0,1,1]"}).args
    cfg = config_class(args)(**config_kwargs(args))
    block, mtp = gpt_model_specs(cfg, FP8FlowSettings())
    stock, _ = gpt_model_specs(cfg, None)
    mtp_layer = compat.mtp_layer_spec(mtp.layer_specs[0].submodules)
    queue.put((rank, {
        "config": type(cfg).__name__,
        "plugin": [spec_builds(layer.submodules.mlp).__name__ for layer in block.layer_specs],
        "stock": [spec_builds(layer.submodules.mlp).__name__ for layer in stock.layer_specs],
        "mtp": spec_builds(mtp_layer.submodules.mlp).__name__,
        "attention": [layer.submodules.self_attention.submodules.core_attention.__name__
                      for layer in block.layer_specs],
    }))


def compact_loop_resume(rank, world, port, queue):
    """The tiny recipe for 3 steps in one go, and again as 2 steps (exit_interval) that save,
    then 1 more that loads and goes on: the same losses, gradient norms and final weights."""
    import os
    import tempfile

    from megatron_fp8flow.recipes import load_recipe
    from megatron_fp8flow.training import checkpoint, loop

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port))
    base = {"seq_length": 16, "max_position_embeddings": 16, "micro_batch_size": 2, "global_batch_size": 4,
            "log_interval": 1, "eval_interval": 2, "eval_iters": 1, "lr_warmup_iters": 1, "train_iters": 3,
            "deterministic_mode": True}  # on a GPU, atomics in a few backward ops would differ run to run
    whole_kept, again_kept, kept = {}, {}, {}
    whole = loop.train(load_recipe("proxies/tiny_cpu", base), keep_model=whole_kept)
    # the same uninterrupted run twice: tells nondeterminism apart from a resume that loses state
    loop.train(load_recipe("proxies/tiny_cpu", base), keep_model=again_kept)
    with tempfile.TemporaryDirectory() as d:
        parts = load_recipe("proxies/tiny_cpu", {**base, "save": d, "load": d, "exit_interval": 2})
        first = loop.train(parts)
        saved = sorted(os.listdir(d))
        resumed = loop.train(parts, keep_model=kept)
        latest = checkpoint.latest_step(d)
        try:  # a checkpoint of another model is refused before anything is loaded, naming what differs
            checkpoint.load(d, rank, world, {**parts.args, "hidden_size": 256}, "flow", None, None, None, None)
            refused = None
        except ValueError as err:
            refused = str(err)
        try:  # so is a resume on a schedule of another length (--steps)
            loop.train(parts, steps=5)
            refused_steps = None
        except ValueError as err:
            refused_steps = str(err)
    def differing_tensors(kept_a, kept_b):  # name: max |difference| of the state dicts' differing tensors
        a_state, b_state = kept_a["model"].state_dict(), kept_b["model"].state_dict()
        pairs = {n: (a, b_state[n]) for n, a in a_state.items() if isinstance(a, torch.Tensor)}
        return len(pairs), {n: float((a.float() - b.float()).abs().max()) for n, (a, b) in pairs.items()
                            if not a.equal(b)}

    compared, differing = differing_tensors(whole_kept, kept)
    # the routers' token counts are one step's: nothing left over after the last step
    leftover_counts = float(sum(m.local_tokens_per_expert.sum() for m in whole_kept["model"].modules()
                                if getattr(m, "local_tokens_per_expert", None) is not None))
    _, repeat_differing = differing_tensors(whole_kept, again_kept)
    queue.put((rank, {"whole": whole, "first": first, "resumed": resumed, "saved": saved, "latest": latest,
                      "compared": compared, "differing": differing, "repeat_differing": repeat_differing,
                      "leftover_counts": leftover_counts,
                      "refused": refused,
                      "refused_steps": refused_steps}))


def fp8_weights_once_per_step(rank, world, port, queue):
    """How often the expert weights are quantized over two steps of three microbatches, with and
    without cache_fp8_weights, when Megatron's schedule marks each step's first microbatch (and,
    with the cache, when nothing marks it); whether the cached run's gradients are the uncached
    run's bits; and, with Megatron's microbatch calculator set up as pretrain() does, whether the
    copies are released after the step's last microbatch (``held``: microbatches after which an
    expert module still holds FP8 copies)."""
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator, unset_num_microbatches_calculator

    from megatron_fp8flow.megatron.experts import FP8FlowExperts
    from megatron_fp8flow.moe import experts as mx

    enable_deterministic_algorithms()  # the check compares two GPU runs' bits
    sm.init_parallel(rank, world, ep=world, port=port)
    calls = []
    original = mx._quantize_weights

    def counting(weights, num_experts):
        calls.append(num_experts)
        return original(weights, num_experts)

    mx._quantize_weights = counting
    shape = sm.device_shape(num_layers=1, mtp_layers=0)
    cfg = sm.config(shape)
    out, grads, held = {}, {}, {}
    variants = (("plain", False, True, False), ("cached", True, True, False), ("cached_unmarked", True, False, False),
                ("cached_counted", True, True, True))
    for name, cache, marked, counted in variants:
        if counted:  # three microbatches per step, as pretrain() sets it up
            init_num_microbatches_calculator(rank, None, 3 * world, 1, world)
        model = sm.build(cfg, FP8FlowSettings(gemm_backend=BACKEND, cache_fp8_weights=cache), shape=shape, seed=5)
        experts = [m for m in model.modules() if isinstance(m, FP8FlowExperts)]
        counts, held[name] = [], []
        for step in range(2):
            calls.clear()
            if marked:
                model.set_is_first_microbatch()  # what Megatron's schedules call on microbatch 0
            for mb in range(3):
                sm.loss_and_backward(model, sm.batch(shape, seed=10 * step + mb))
                if any(m._fp8_weights is not None for m in experts):
                    held[name].append(mb)
            counts.append(len(calls))
            if step == 0:
                grads[name] = _grads(model)
                with torch.no_grad():  # an optimizer step: the next step must see new FP8 weights
                    for p in model.parameters():
                        p.add_(1e-3)
                model.zero_grad(set_to_none=True)
        out[name] = counts
        if counted:
            unset_num_microbatches_calculator()
    same = {n: all(torch.equal(grads["plain"][k], grads[n][k]) for k in grads["plain"])
            for n in ("cached", "cached_counted")}
    queue.put((rank, {"counts": out, "same_grads": same, "held": held}))


def main_grad_contract(rank, world, port, modes, queue):
    """Megatron DDP's gradient contract (fp32 main_grad, fused accumulation by the experts,
    hooks for the rest) on the small model, per mode: with and without the experts' fusion,
    and over two microbatches."""
    from megatron_fp8flow.megatron.main_grad import MainGrads, expert_weight_runs

    enable_deterministic_algorithms()  # the check compares two GPU runs' bits
    sm.init_parallel(rank, world, ep=world, port=port)
    shape = sm.device_shape(num_layers=1, mtp_layers=0)
    cfg = sm.config(shape)
    first, second = sm.batch(shape, seed=21 + rank), sm.batch(shape, seed=22 + rank)
    out = {}
    for mode in modes:
        runs = {}
        for fused in (False, True):
            # bf16 on torch's grouped GEMMs either way: auto picks DeepGEMM only when fused (on
            # Hopper), and another engine's forward would change every gradient's bits
            settings = FP8FlowSettings(mode=mode, gemm_backend=BACKEND, bf16_gemm="torch",
                                       gradient_accumulation_fusion=fused)
            model = sm.build(cfg, settings, shape=shape)
            grads = MainGrads(model)
            sm.loss_and_backward(model, first)
            names = {id(p): n for n, p in model.named_parameters()}
            one = {names[id(p)]: p.main_grad.clone() for p in grads.params}
            left_grads = [names[id(p)] for p in grads.params if p.grad is not None]
            sm.loss_and_backward(model, second)
            two = {names[id(p)]: p.main_grad.clone() for p in grads.params}
            grads.zero()
            sm.loss_and_backward(model, second)
            alone = {names[id(p)]: p.main_grad.clone() for p in grads.params}
            experts = {names[id(p)] for run in expert_weight_runs(model) for p in run}
            flagged = all(p.grad_added_to_main_grad == fused for run in expert_weight_runs(model) for p in run)
            runs[fused] = (one, two, alone, experts, left_grads, flagged)
        (one_p, _, _, experts, left_p, flag_p), (one_f, two_f, alone_f, _, left_f, flag_f) = runs[False], runs[True]
        out[mode] = {
            "experts": len(experts),
            "flagged": flag_p and flag_f,
            "grads_left": left_p + left_f,
            # fused: the fp32 gradient itself; unfused: the same rounded once to bf16 by autograd
            "experts_fused_round_to_unfused": all(torch.equal(one_f[n].bfloat16().float(), one_p[n]) for n in experts),
            "experts_fused_differs": any(not torch.equal(one_f[n], one_p[n]) for n in experts),
            "others_equal": all(torch.equal(one_f[n], one_p[n]) for n in one_p if n not in experts),
            "accumulates": all(torch.equal(two_f[n], one_f[n] + alone_f[n]) for n in experts),
            "nonzero": all(bool(one_f[n].abs().sum() > 0) for n in experts),
        }
    queue.put((rank, out))


def layer_host_syncs(rank, world, port, modes, queue):
    """Host syncs of one MoE layer's forward and backward per mode, under Megatron's DDP (fp32
    main_grad, fused expert accumulation), counted by CUDA's sync-debug mode after a warm-up."""
    import warnings

    from megatron_fp8flow.benchmarks import moe_layer

    sm.init_parallel(rank, world, ep=world, port=port)
    shape = sm.device_shape(num_layers=1, mtp_layers=0, experts=8 * world, topk=4, groups=4, group_topk=2)
    cfg = sm.config(shape)
    x = torch.randn(256, 1, shape.hidden, device="cuda", dtype=torch.bfloat16)
    out = {}
    for mode in modes:
        layer = moe_layer._layer(mode, cfg, fused=True)
        module, _ = moe_layer.with_main_grads(layer, cfg)
        for _ in range(2):
            y, _ = module(x.detach().requires_grad_(True))
            y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
        counts = {}
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y, _ = module(x.detach().requires_grad_(True))
                counts["forward"] = sum("synchroniz" in str(w.message) for w in caught)
                caught.clear()
                y.backward(torch.ones_like(y))
                counts["backward"] = sum("synchroniz" in str(w.message) for w in caught)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out[mode] = counts
    queue.put((rank, out))


def expert_buffer_layout(rank, world, port, queue):
    """Where Megatron's DDP puts the plugin's expert gradients (and, with the distributed
    optimizer, the weights): each linear's, over the local experts, as one stacked tensor."""
    from megatron_fp8flow import gemm
    from megatron_fp8flow.benchmarks import moe_layer

    sm.init_parallel(rank, world, ep=world, port=port)
    shape = sm.device_shape(num_layers=1, mtp_layers=0, experts=4 * world, topk=2)
    cfg = sm.config(shape)
    out = {}
    for dist_opt in (False, True):
        layer = moe_layer._layer("flow", cfg, fused=True)
        moe_layer.with_main_grads(layer, cfg, distributed_optimizer=dist_opt)
        w = layer.experts.expert_weights()
        e = layer.experts.num_local_experts
        out[dist_opt] = {
            "grads_stacked": all(gemm.stacked_view([p.main_grad for p in ws]) is not None for ws in (w[:e], w[e:])),
            "weights_stacked": all(gemm.stacked_view([p.data for p in ws]) is not None for ws in (w[:e], w[e:])),
        }
    queue.put((rank, out))


def expert_parameter_order(rank, world, port, queue):
    """The parameter order FP8FlowExperts gives, against nn.Module's own and DDP's layout."""
    from megatron_fp8flow import gemm
    from megatron_fp8flow.megatron import FP8FlowExperts

    sm.init_parallel(rank, world, ep=world, port=port)
    shape = sm.SmallMoE(num_layers=1, mtp_layers=0, experts=4)
    model = sm.build(sm.config(shape), FP8FlowSettings(gemm_backend=BACKEND), shape=shape)
    experts = next(m for m in model.modules() if isinstance(m, FP8FlowExperts))
    default = list(torch.nn.Module.named_modules(experts))
    ours = list(experts.named_modules())

    def layout(params):  # DDP's: named_parameters() reversed, one buffer
        buffer = torch.zeros(sum(p.numel() for p in params))
        views, offset = {}, 0
        for p in params[::-1]:
            views[p] = buffer[offset: offset + p.numel()].view(p.shape)
            offset += p.numel()
        return views

    def dfs(module):  # nn.Module's own order: parameters first, then children as registered
        yield from (p for p in module._parameters.values() if p is not None)
        for child in module._modules.values():
            if child is not None:
                yield from dfs(child)

    w, e = experts.expert_weights(), experts.num_local_experts
    ddp = layout([p for _, p in model.named_parameters()])
    plain = layout(list(dict.fromkeys(dfs(model))))
    queue.put((rank, {
        "same_modules": sorted(n for n, _ in ours) == sorted(n for n, _ in default) and len(ours) == len(default),
        "last_two": [n for n, _ in ours][-2:],
        "same_state_dict_order": list(model.state_dict()) == list(torch.nn.Module.state_dict(model)),
        "stacked_in_ddp_layout": all(gemm.stacked_view([ddp[p] for p in ws]) is not None for ws in (w[:e], w[e:])),
        "default_order_stacks": any(gemm.stacked_view([plain[p] for p in ws]) is not None for ws in (w[:e], w[e:])),
    }))


def same_seed_same_weights(rank, world, port, queue):
    """Parameters of small-model builds with Megatron initializing its linear layers under its
    own RNG states (use_cpu_initialization off, as on a GPU): two builds of one seed, and one of
    another seed."""
    sm.init_parallel(rank, world, ep=world, port=port)
    shape = sm.device_shape(num_layers=1, mtp_layers=0)
    cfg = sm.config(shape)
    cfg.use_cpu_initialization = False

    def weights(seed):
        model = sm.build(cfg, FP8FlowSettings(gemm_backend=BACKEND), shape=shape, seed=seed)
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}

    a, b, c = weights(5), weights(5), weights(6)
    random = [n for n in a if a[n].std() > 0]  # not the norms' ones or the zero biases
    queue.put((rank, {"same_seed_equal": all(torch.equal(a[n], b[n]) for n in a),
                      "random": random,
                      "other_seed_equal": [n for n in random if torch.equal(a[n], c[n])]}))
