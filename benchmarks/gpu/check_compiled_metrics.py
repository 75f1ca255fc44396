"""On a GPU: do the token-shift metrics compile (no fallback warning), and how fast are they against the
eager metrics? Random bf16 logits, 4,096 positions, 32k and 152k vocabularies; ranks and ids must be equal.

    PYTHONPATH=src python3 benchmarks/gpu/check_compiled_metrics.py
"""
import time, warnings
import torch
from itlens.analysis import token_shift as ts
caught = warnings.catch_warnings(record=True).__enter__()
warnings.simplefilter("always")
torch.manual_seed(0)
for V in (32000, 151936):
    zb = torch.randn(4096, V, device="cuda").bfloat16(); zt = (zb.float() + 0.3 * torch.randn_like(zb.float())).bfloat16()
    tgt = torch.randint(0, V, (4096,), device="cuda")
    t = time.perf_counter(); f = ts.exact_metrics(zb, zt, tgt, 10, check_finite=False, fused=True); torch.cuda.synchronize()
    first = time.perf_counter() - t
    e = ts.exact_metrics(zb.float(), zt.float(), tgt, 10, check_finite=False)
    same = all(torch.equal(f[k], e[k]) for k in ("rank_base", "top1_base", "top1_tuned", "rank0_top1"))
    dkl = (f["kl"] - e["kl"]).abs().max().item()
    def tm(fn):
        fn(); torch.cuda.synchronize(); s = time.perf_counter()
        for _ in range(10): fn()
        torch.cuda.synchronize(); return (time.perf_counter() - s) / 10 * 1e3
    fe = tm(lambda: ts.exact_metrics(zb.float(), zt.float(), tgt, 10, check_finite=False))
    ff = tm(lambda: ts.exact_metrics(zb, zt, tgt, 10, check_finite=False, fused=True))
    print(f"V={V}: first fused call {first:.1f} s, ranks/ids equal {same}, max |dKL| {dkl:.1e}, eager {fe:.2f} ms, fused {ff:.2f} ms", flush=True)
fallback = [str(w.message)[:120] for w in caught if "token-shift metrics" in str(w.message)]
print("fallback warnings:", fallback)
raise SystemExit(1 if fallback else 0)
