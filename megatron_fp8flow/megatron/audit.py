"""``fp8flow audit``: the explicit BF16 <-> FP8 casts one MoE layer makes per training step.

Runs one forward + backward of a one-layer DeepSeek-style MoE GPT (the small model of
:mod:`.small_model`) in each mode and counts casts with :func:`megatron_fp8flow.fp8.audit.cast_audit`:
the plugin's cast points, plus any FP8 conversion anywhere else in the step.
"""

from __future__ import annotations

from typing import Dict, Sequence

from ..fp8.audit import cast_audit
from ..moe.experts import MODES
from . import small_model as sm
from .settings import FP8FlowSettings

PAPER_COUNTS = {"blockwise": 12, "flow": 2}  # per MoE layer, with the FP8 all-to-all (EP > 1)


def count_casts(modes: Sequence[str] = MODES, gemm_backend: str = "auto") -> Dict[str, dict]:
    """Counts by kind for each mode (torch.distributed and Megatron's groups must be set up)."""
    shape = sm.device_shape(num_layers=1, mtp_layers=0)
    cfg = sm.config(shape)
    results = {}
    for mode in modes:
        model = sm.build(cfg, FP8FlowSettings(mode=mode, gemm_backend=gemm_backend), shape)
        data = sm.batch(shape)
        with cast_audit() as audit:
            sm.loss_and_backward(model, data)
        results[mode] = {"explicit": audit.explicit, **audit.as_dict()}
    return results


def _worker(rank: int, world: int, port: int, modes, backend, queue) -> None:
    sm.init_parallel(rank, world, ep=world, port=port)
    queue.put((rank, count_casts(modes, backend)))


def run(ep: int = 1, modes: Sequence[str] = MODES, gemm_backend: str = "auto") -> Dict[str, dict]:
    """Counts at expert parallel size ``ep`` (``ep`` > 1 starts that many processes)."""
    if ep == 1:
        sm.init_parallel(0, 1, 1)
        return count_casts(modes, gemm_backend)
    return sm.spawn(_worker, ep, modes, gemm_backend)[0]


def render(results: Dict[str, dict], ep: int) -> str:
    kinds = ["quantize", "dequantize", "other", "fused_quantize", "transpose", "weight_quantize"]
    lines = [f"Casts per MoE layer per step (forward + backward), EP = {ep}", "",
             "| mode | explicit casts | paper | " + " | ".join(kinds) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for mode, c in results.items():
        paper = PAPER_COUNTS.get(mode, "-") if ep > 1 else "-"
        lines.append(f"| {mode} | {c['explicit']} | {paper} | " + " | ".join(str(c.get(k, 0)) for k in kinds) + " |")
    lines += ["", "explicit = quantize + dequantize + other (standalone conversions of activations and "
              "gradients); fused_quantize happens inside the weighted SwiGLU; transpose = scaling-aware "
              "transposes (FP8 to FP8)."]
    if ep == 1:
        lines.append("At EP = 1 there is no all-to-all, so the baseline's four casts around it are absent "
                     "(blockwise: 8; 12 with EP > 1).")
    return "\n".join(lines)
