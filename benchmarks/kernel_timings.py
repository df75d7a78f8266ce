"""Benchmark the kernels of kvp_gym.kernels on a GPU; without one, check them in the Triton interpreter.

On a CUDA device, for keys S in --keys (default 4k to 32k), bfloat16, B=1, Hq=32, Hkv=8, D=128:
(a) attention statistics (T = S causal queries, reduce "max" as future_importance and "none" as
    attention_received): the Triton kernel vs the torch path vs the forward pass of
    torch.nn.functional.scaled_dot_product_attention on the same q, k (and v) (target: Triton <= 2x SDPA).
(b) compaction (keep half the rows of keys and values [1, 8, S, 128]): Triton vs the torch gather, and the achieved
    bandwidth (bytes read + written / time) against the device's nominal peak (target >= 60%) and a plain copy of
    the same bytes measured in the same run.
(c) KVP scoring (agents/kvp.py, torch only: no kernel, see docs/kernels.md): the forward pass of one layer's 8
    per-head networks over S tokens, and its achieved TFLOP/s, the measurement a fused kernel would have to beat.
Times are medians of triton.testing.do_bench. Without a GPU, no timing is possible: the script runs every Triton
kernel in the interpreter against its torch path on small shapes and prints the largest differences.

    python benchmarks/kernel_timings.py [--keys 4096 8192 16384 32768] [--peak-gbps 4800]
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton (see kvp_gym.kernels)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402

from kvp_gym.attention import AttentionSpec  # noqa: E402
from kvp_gym.kernels import use_backend  # noqa: E402
from kvp_gym.kernels.attention_stats import attention_stats  # noqa: E402
from kvp_gym.kernels.compaction import gather_rows  # noqa: E402

# Nominal HBM bandwidth (GB/s) by device name, for the compaction target; --peak-gbps overrides.
PEAK_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "A100-SXM4-80GB": 2039,
    "A100-SXM4-40GB": 1555,
    "A100 80GB PCIe": 1935,
    "A100-PCIE-40GB": 1555,
    "L40S": 864,
}


def interpreter_pass() -> None:
    """Every Triton kernel against its torch path on small shapes, float32 and float16 (bfloat16: GPU only)."""
    torch.manual_seed(0)
    print("No CUDA device: no timing is possible. Triton interpreter correctness pass (Triton vs torch path):")
    window = AttentionSpec(scale=0.3, sliding_window=21, softcap=4.0)
    for dtype in (torch.float32, torch.float16):
        for reduce, group, spec in (("max", 3, None), ("mean", 4, None), ("none", 1, None), ("max", 2, window)):
            q, k = torch.randn(2, 2 * group, 70, 16).to(dtype), torch.randn(2, 2, 80, 16).to(dtype)
            query_valid = torch.rand(2, 70) > 0.2
            key_valid = torch.arange(80) < torch.tensor([[80], [63]])
            results = []
            for backend in ("torch", "triton"):
                with use_backend(backend):
                    results.append(attention_stats(q, k, reduce, query_valid, key_valid, spec))
            error = (results[1] - results[0]).abs()
            relative = (error / results[0].abs().clamp_min(1e-3)).max()
            label = f"reduce={reduce} G={group}" + (" window+softcap" if spec else "")
            print(f"  attention_stats {str(dtype)[6:]:8} {label:30} max |diff| {error.max():.1e} rel {relative:.1e}")
        keys, values = torch.randn(2, 4, 90, 16).to(dtype), torch.randn(2, 4, 90, 32).to(dtype)
        rows = torch.rand(2, 4, 90).argsort(-1)[..., :50].sort(-1).values
        with use_backend("torch"):
            expected = gather_rows(keys, values, rows)
        with use_backend("triton"):
            got = gather_rows(keys, values, rows)
        same = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        print(f"  gather_rows     {str(dtype)[6:]:8} {'':30} {'identical' if same else 'DIFFERENT'}")


def gpu_benchmark(key_counts: list[int], peak_gbps: float | None) -> None:
    from triton.testing import do_bench

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_gbps or next((gbps for key, gbps in PEAK_GBPS.items() if key in name), None)
    print(f"{name}, torch {torch.__version__}; medians of triton.testing.do_bench, ms")
    print("\n| keys S | statistic | Triton | torch path | SDPA forward | Triton / SDPA | Triton / torch |")
    print("|---|---|---|---|---|---|---|")
    for keys_count in key_counts:
        q = torch.randn(1, 32, keys_count, 128, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, keys_count, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        sdpa = do_bench(
            lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
        )
        for reduce in ("max", "none"):
            times = {}
            for backend in ("triton", "torch"):
                with use_backend(backend):
                    times[backend] = do_bench(lambda q=q, k=k, reduce=reduce: attention_stats(q, k, reduce))
            print(
                f"| {keys_count} | {reduce} | {times['triton']:.2f} | {times['torch']:.2f} | {sdpa:.2f} | "
                f"{times['triton'] / sdpa:.2f}x | {times['torch'] / times['triton']:.1f}x faster |"
            )
    print("\n| keys S | compaction | Triton | torch gather | copy | Triton GB/s | % of peak | % of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for keys_count in key_counts:
        keys, values = (torch.randn(1, 8, keys_count, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        rows = torch.rand(1, 8, keys_count, device=device).argsort(-1)[..., : keys_count // 2].sort(-1).values
        moved = 2 * 2 * rows.numel() * 128 * keys.element_size() + rows.numel() * rows.element_size()  # r+w, k+v
        times = {}
        for backend in ("triton", "torch"):
            with use_backend(backend):
                times[backend] = do_bench(lambda keys=keys, values=values, rows=rows: gather_rows(keys, values, rows))
        half = keys[..., : keys_count // 2, :]
        copy = do_bench(lambda half=half: (half.clone(), half.clone()))  # the same bytes read and written
        gbps = moved / times["triton"] / 1e6
        share = f"{gbps / peak:.0%}" if peak else "peak unknown (--peak-gbps)"
        print(
            f"| {keys_count} | half the rows | {times['triton']:.3f} | {times['torch']:.3f} | {copy:.3f} | "
            f"{gbps:.0f} | {share} | {copy / times['triton']:.0%} |"
        )
    kvp_scoring(key_counts, device, do_bench)


def kvp_scoring(key_counts: list[int], device: torch.device, do_bench) -> None:
    from kvp_gym_agents.kvp import KVPNetwork

    network = KVPNetwork(heads=8, head_dim=128).to(device)
    width = network.width
    print("\n| tokens | KVP scoring, 8 heads (torch) | TFLOP/s |\n|---|---|---|")
    for tokens in key_counts:
        keys, values = (torch.randn(8, 1, tokens, 128, device=device) for _ in range(2))
        positions = torch.arange(tokens, device=device).expand(8, 1, tokens)
        with torch.inference_mode():
            ms = do_bench(lambda k=keys, v=values, p=positions: network(k, v, p, p.flip(-1)))
        flops = 2 * 8 * tokens * (2 * 128 * width + 3 * width * width + width)  # branches, hidden 1 (folded), 2, out
        print(f"| {tokens} | {ms:.3f} ms | {flops / ms / 1e9:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--peak-gbps", type=float, default=None, help="the device's peak memory bandwidth, GB/s")
    args = parser.parse_args()
    if torch.cuda.is_available():
        gpu_benchmark(args.keys, args.peak_gbps)
    else:
        interpreter_pass()


if __name__ == "__main__":
    main()
