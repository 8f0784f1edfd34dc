"""Run the benchmarks and rewrite benchmarks/RESULTS.md from that run.

    python benchmarks/make_results.py [extra pytest args, e.g. -k latent]

Numbers are never typed by hand: the table is rendered from pytest-benchmark's
JSON of this run, with the device, versions and backend named.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run_benchmarks(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", HERE, "--benchmark-only", "-q",
               f"--benchmark-json={out}", "-p", "no:cacheprovider", *extra]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def render(data: dict) -> str:
    import torch

    import fastdiff
    from sampler_cases import backend_used, device_name

    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        key = (info["device"], info["dtype"], info["shape"], info["kind"])
        rows[key][info["impl"]] = b["stats"]["median"]
        rows[key]["bytes"] = info["bytes"]
        if info.get("flops"):
            rows[key]["flops"] = info["flops"]

    devices = sorted({k[0] for k in rows})
    lines = [
        "# Benchmark results",
        "",
        "Rewritten by `python benchmarks/make_results.py` from one run of "
        "`pytest benchmarks --benchmark-only`; do not edit by hand.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- torch {torch.__version__}, fastdiff {fastdiff.__version__}",
    ]
    for dev in devices:
        lines.append(f"- {dev}: {device_name(dev)}; fastdiff backend: `{backend_used(dev)}`")
    lines += [
        "",
        "## Fused ops",
        "",
        "Median time per call (µs). Sampler steps: `fastdiff` is one `sampler_step` pass reading a",
        "precomputed coefficient table with per-sample timesteps; `eager` the diffusers /",
        "k-diffusion multi-kernel formulation. GroupNorm: `eager` is group_norm -> add -> silu.",
        "`compile`: `torch.compile` of eager. `copy`: `out.copy_(x)` of the same size, the",
        "one-read-one-write floor. GB/s counts the bytes the fused pass must move at least.",
        "",
        "| device | dtype | shape | case | fastdiff µs | eager µs | compile µs | copy µs "
        "| vs eager | vs compile | / copy | GB/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    other = {}
    for (dev, dtype, shape, kind), r in sorted(rows.items()):
        if not all(k in r for k in ("fastdiff", "eager", "compile", "copy")):
            other[(dev, dtype, shape, kind)] = r
            continue
        fd = r["fastdiff"]
        lines.append(
            f"| {dev} | {dtype} | {shape} | {kind} | {fd * 1e6:.1f} | {r['eager'] * 1e6:.1f} "
            f"| {r['compile'] * 1e6:.1f} | {r['copy'] * 1e6:.1f} | {r['eager'] / fd:.2f}x "
            f"| {r['compile'] / fd:.2f}x | {fd / r['copy']:.2f} | {r['bytes'] / fd / 1e9:.1f} |"
        )
    lines += ["", "`vs eager` / `vs compile`: their time divided by fastdiff's (higher is better).", ""]
    if other:
        lines += [
            "## Loops, schedulers and other cases",
            "",
            "Median time per call (ms) of every implementation measured; `fastdiff speedup`",
            "is each other implementation's time divided by fastdiff's.",
            "",
            "| device | dtype | shape | case | implementations (ms) | fastdiff speedup | fastdiff rate |",
            "|---|---|---|---|---|---|---:|",
        ]
        for (dev, dtype, shape, kind), r in other.items():
            impls = {k: v for k, v in r.items() if k not in ("bytes", "flops")}
            cells = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in sorted(impls.items()))
            speedup = "-"
            if "fastdiff" in impls:
                speedup = ", ".join(f"vs {k} {v / impls['fastdiff']:.2f}x"
                                    for k, v in sorted(impls.items()) if k != "fastdiff") or "-"
            rate = "-"
            if "fastdiff" in impls:
                t = impls["fastdiff"]
                rate = (f"{r['flops'] / t / 1e12:.2f} TFLOP/s" if "flops" in r
                        else f"{r['bytes'] / t / 1e9:.1f} GB/s")
            lines.append(f"| {dev} | {dtype} | {shape} | {kind} | {cells} | {speedup} | {rate} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    data = run_benchmarks(sys.argv[1:])
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(render(data))
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
