"""bfloat16 against float32 matrix products on this machine's CPU (or a given device).

Usage: python bench/bf16_speed.py [--size 1024] [--repeat 20]

Prints the seconds per product of two size x size matrices in each dtype, their ratio, and
whether oneDNN reports bf16 support (true wherever it can emulate bf16, e.g. any AVX-512 CPU) and
whether the CPU has bf16 instructions (``spillover.models.native_cpu_bf16``, what ``fast_bf16``
reads to choose bf16 autocast for training and bf16-verified scoring). Run it alone.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import torch

    from spillover.models import cpu_name, fast_bf16, native_cpu_bf16

    torch.manual_seed(0)
    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeat):
            x @ y
        seconds[dtype] = (time.perf_counter() - start) / args.repeat
    print(
        f"cpu: {cpu_name()}; torch threads: {torch.get_num_threads()}; load average: {os.getloadavg()}"
    )
    print(f"oneDNN reports bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"bf16 instructions (AVX512-BF16 / AMX-BF16): {native_cpu_bf16()}")
    print(f"fast_bf16('cpu'): {fast_bf16('cpu')}")
    for dtype, s in seconds.items():
        print(f"{dtype!s:15s} {s * 1000:9.2f} ms per {args.size}x{args.size} product")
    print(f"bf16 / fp32 time: {seconds[torch.bfloat16] / seconds[torch.float32]:.2f}x")


if __name__ == "__main__":
    main()
