"""The token view's blockwise top-k (``token_shift.top_k_ids``) against ``torch.topk``, in one run.

Rows are a random bf16 LM head's outputs read as float32, as the engine sees them. Prints, per
vocabulary size, whether the values are equal in every row, the share of rows whose ids come in the same
order (bf16 logits tie often; topk's order among equal values is unspecified), and both times.

    python3 benchmarks/gpu/bench_top_k.py            # cuda when there is one, else the CPU
"""

from __future__ import annotations

import argparse
import time

import torch

from itlens.analysis.token_shift import top_k_ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--vocabs", default="32000,151936,262144")
    p.add_argument("--k", type=int, default=10)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(a.device)

    def timed(f) -> float:
        f()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            f()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / 10 * 1e3

    for vocab in map(int, a.vocabs.split(",")):
        h = torch.randn(a.rows, 1024, device=dev, dtype=torch.bfloat16)
        w = torch.randn(vocab, 1024, device=dev, dtype=torch.bfloat16) / 32
        z = (h @ w.T).float()
        ref, ids = z.topk(a.k, -1), top_k_ids(z, a.k, blockwise=True)
        equal = torch.equal(z.gather(1, ids), ref.values)
        same = (ids == ref.indices).all(-1).float().mean().item()
        print(f"V={vocab}: values equal {equal}, rows with the same ids {same:.4f}, "
              f"topk {timed(lambda: z.topk(a.k, -1).indices):.2f} ms, "
              f"blockwise {timed(lambda: top_k_ids(z, a.k, blockwise=True)):.2f} ms", flush=True)
        if not equal:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
