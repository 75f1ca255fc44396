"""On a GPU: do the token-shift metrics compile (no fallback warning), and how fast are they against the
eager metrics? Random bf16 logits, 4,096 positions, 32k and 152k vocabularies; ranks and ids must be equal.

    PYTHONPATH=src python3 benchmarks/gpu/check_compiled_metrics.py      # exit 1 on a fallback or a mismatch
"""

from __future__ import annotations

import time
import warnings

import torch

from itlens.analysis import token_shift as ts


def timed_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> int:
    torch.manual_seed(0)
    ok = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for vocab in (32000, 151936):
            zb = torch.randn(4096, vocab, device="cuda").bfloat16()
            zt = (zb.float() + 0.3 * torch.randn_like(zb.float())).bfloat16()
            tgt = torch.randint(0, vocab, (4096,), device="cuda")
            t = time.perf_counter()
            fused = ts.exact_metrics(zb, zt, tgt, 10, check_finite=False, fused=True)
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            eager = ts.exact_metrics(zb.float(), zt.float(), tgt, 10, check_finite=False)
            same = all(torch.equal(fused[k], eager[k]) for k in ("rank_base", "top1_base", "top1_tuned", "rank0_top1"))
            ok &= same
            dkl = (fused["kl"] - eager["kl"]).abs().max().item()
            t_eager = timed_ms(lambda: ts.exact_metrics(zb.float(), zt.float(), tgt, 10, check_finite=False))
            t_fused = timed_ms(lambda: ts.exact_metrics(zb, zt, tgt, 10, check_finite=False, fused=True))
            print(f"V={vocab}: first fused call {first:.1f} s, ranks/ids equal {same}, max |dKL| {dkl:.1e}, "
                  f"eager {t_eager:.2f} ms, fused {t_fused:.2f} ms", flush=True)
    fallback = [str(w.message)[:120] for w in caught if "token-shift metrics" in str(w.message)]
    print("fallback warnings:", fallback)
    return 0 if ok and not fallback else 1


if __name__ == "__main__":
    raise SystemExit(main())
