"""The executor's GEMMs against cuBLAS's own best for the same shapes, on the GPU machine (needs PyTorch).

    python3 bench/gpu_gemm_peak.py OUT/*.gemm.json

Each JSON file is `mpopt run MODEL --device cuda --gemm-profile FILE` output: every GEMM shape the model's
run made, in cuBLAS's column-major terms, with the executor's time per call. For each shape this times
`torch.matmul` (cuBLAS, with its own heuristics) on operands of the same type, sizes and transposes, f32
accumulation (reduced-precision reductions off, no TF32), as CUDA events around 20 calls after 3 warm-ups,
and prints both throughputs and their ratio, per shape and FLOP-weighted per model (the number issue #7's
"GEMM path at least 60% of cuBLAS's peak" asks for).
"""

import json
import sys

import torch


def operands(g, dtype, dev):
    """Row-major X[n,k] and Y[k,m] whose product X@Y is the column-major C = op(A) op(B) of the shape:
    torch passes the transposes to cuBLAS as the executor does (C^T = op(B)^T op(A)^T)."""
    m, n, k, b = g["m"], g["n"], g["k"], g["batch"]

    def mk(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dtype)

    # op(A) is m x k column-major: stored k x m row-major when not transposed, else m x k row-major
    y = mk(b, m, k).transpose(1, 2) if g["trans_a"] else mk(b, k, m)
    # op(B) is k x n: stored n x k row-major when not transposed, else k x n row-major
    x = mk(b, k, n).transpose(1, 2) if g["trans_b"] else mk(b, n, k)
    return x, y


def time_ms(f, reps=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    dev = torch.device("cuda")
    types = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    worst = None
    for path in sys.argv[1:]:
        j = json.load(open(path))
        print(f"\n{j['model']} ({j['device']})\n")
        print("| type | m | n | k | batch | calls | mpopt TFLOP/s | cuBLAS TFLOP/s | ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        ours = theirs = flops = 0.0
        for g in sorted(j["gemms"], key=lambda g: -g["calls"] * g["m"] * g["n"] * g["k"] * g["batch"]):
            x, y = operands(g, types[g["type"]], dev)
            ms = time_ms(lambda: torch.matmul(x, y))
            f = 2.0 * g["m"] * g["n"] * g["k"] * g["batch"]
            t_ours, t_cublas = f / (g["ms"] * 1e-3) / 1e12, f / (ms * 1e-3) / 1e12
            print(f"| {g['type']} | {g['m']} | {g['n']} | {g['k']} | {g['batch']} | {g['calls']} | "
                  f"{t_ours:.1f} | {t_cublas:.1f} | {t_ours / t_cublas:.2f} |")
            ours += g["ms"] * g["calls"]
            theirs += ms * g["calls"]
            flops += f * g["calls"]
        if ours > 0:
            r = theirs / ours
            print(f"\nall GEMMs: mpopt {flops / (ours * 1e-3) / 1e12:.1f} TFLOP/s, cuBLAS's best "
                  f"{flops / (theirs * 1e-3) / 1e12:.1f} TFLOP/s: {100 * r:.0f}% (target: 60%)")
            worst = r if worst is None else min(worst, r)
    if worst is not None:
        print(f"\ngpu_gemm_peak: lowest model ratio {100 * worst:.0f}% of cuBLAS's best (target 60%)")
        sys.exit(0 if worst >= 0.6 else 1)


if __name__ == "__main__":
    main()
