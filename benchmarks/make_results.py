"""Run the benchmarks and rewrite benchmarks/RESULTS.md.

    python benchmarks/make_results.py [extra pytest args, e.g. -k latent]
    FASTDIFF_BENCH_DEVICES=cuda python benchmarks/make_results.py   # GPU rows only
    python benchmarks/make_results.py --import run.json [device=... torch=... backend=...]

Numbers are never typed by hand.  Each run's pytest-benchmark results are
stored per device in benchmarks/results/<device>.json (a re-measured case
replaces its old row; the device, versions and date of every run are kept),
and RESULTS.md is rendered from all stored devices: the CPU rows measured on a
CPU machine and the GPU rows measured on a GPU machine sit in one table, each
device's provenance named in the header.
"""

from __future__ import annotations

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
        code = subprocess.run(cmd).returncode
        # 1: some cases failed (their agreement check, say): the others' timings are
        # still real, so they are stored, and the failures are named here
        if code not in (0, 1) or not os.path.exists(out):
            raise SystemExit(f"pytest exited with {code}; nothing stored")
        if code == 1:
            print("make_results: some benchmark cases FAILED (see above); storing the ones "
                  "that passed", file=sys.stderr)
        with open(out) as f:
            return json.load(f)


RESULTS_DIR = os.path.join(HERE, "results")


def _key(b: dict) -> tuple:
    i = b["extra_info"]
    return (i["dtype"], i["shape"], i["kind"], i["impl"])


def _run_info(data: dict, dev: str, cases: int, overrides: dict) -> dict:
    """Where and with what a run was measured: the stack named in the JSON by
    benchmarks/conftest.py, else this process's; ``overrides`` (from --import) win."""
    stack = data.get("machine_info", {}).get("fastdiff")
    if stack is None:
        import torch

        import fastdiff
        from sampler_cases import device_name

        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        stack = {"torch": torch.__version__, "triton": triton_version, "fastdiff": fastdiff.__version__,
                 "cuda_device": device_name("cuda") if dev == "cuda" and not overrides else None,
                 "cpu": device_name("cpu")}
    info = {"date": data.get("datetime", "")[:16].replace("T", " ") + " UTC",
            "device": stack["cuda_device"] if dev == "cuda" else stack["cpu"],
            "backend": None, "torch": stack["torch"], "triton": stack["triton"],
            "fastdiff": stack["fastdiff"], "cases": cases}
    if not overrides.get("backend"):
        from sampler_cases import backend_used

        info["backend"] = backend_used(dev)
    info.update(overrides)
    return info


def store(data: dict, overrides: dict) -> None:
    """Merge a run's rows into benchmarks/results/<device>.json."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    by_device = defaultdict(list)
    for b in data["benchmarks"]:
        by_device[b["extra_info"]["device"]].append(
            {"extra_info": b["extra_info"], "stats": {"median": b["stats"]["median"]}})
    for dev, rows in by_device.items():
        path = os.path.join(RESULTS_DIR, f"{dev}.json")
        old = {"runs": [], "benchmarks": []}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        run = _run_info(data, dev, len(rows), overrides)
        merged = {_key(b): b for b in old["benchmarks"]}
        merged.update({_key(b): b for b in rows})
        with open(path, "w") as f:
            json.dump({"runs": old["runs"] + [run], "benchmarks": list(merged.values())}, f, indent=1)


def load() -> dict:
    """{device: stored results} for every device measured so far."""
    out = {}
    if os.path.isdir(RESULTS_DIR):
        for name in sorted(os.listdir(RESULTS_DIR)):
            if name.endswith(".json"):
                with open(os.path.join(RESULTS_DIR, name)) as f:
                    out[name[:-5]] = json.load(f)
    return out


def render(stored: dict) -> str:
    rows = defaultdict(dict)
    for b in (b for dev in stored.values() for b in dev["benchmarks"]):
        info = b["extra_info"]
        key = (info["device"], info["dtype"], info["shape"], info["kind"])
        rows[key][info["impl"]] = b["stats"]["median"]
        rows[key]["bytes"] = info["bytes"]
        if info.get("flops"):
            rows[key]["flops"] = info["flops"]

    lines = [
        "# Benchmark results",
        "",
        "Rendered by `python benchmarks/make_results.py` from runs of "
        "`pytest benchmarks --benchmark-only` stored in `benchmarks/results/`; do not edit by hand.",
        "Runs per device (a later run's cases replace the same cases of an earlier one):",
        "",
    ]
    for dev, data in stored.items():
        for run in data["runs"]:
            lines.append(f"- {dev}: {run['device']}, {run['date']}, {run['cases']} cases; torch "
                         f"{run['torch']}, triton {run['triton']}, fastdiff {run['fastdiff']}; "
                         f"fastdiff backend `{run['backend']}`")
    lines += [
        "",
        "## Fused ops",
        "",
        "Median time per call (µs). Sampler steps: `fastdiff` is one `sampler_step` pass reading a",
        "precomputed coefficient table with per-sample timesteps; `eager` the diffusers /",
        "k-diffusion multi-kernel formulation. GroupNorm: `eager` is group_norm -> add -> silu.",
        "RMSNorm: `eager` is denoising-diffusion-pytorch 2.x's F.normalize * g * sqrt(C) ->",
        "scale-shift -> silu.",
        "`compile`: `torch.compile` of eager. `copy`: `out.copy_(x)` of the same size, the",
        "one-read-one-write floor. GB/s counts the bytes the fused pass must move at least.",
        "`other backends`: the fused op forced onto another fastdiff backend (`fastdiff[cuda]`:",
        "the CUDA C++ kernels, beside the Triton default), with its speed vs eager.",
        "",
        "| device | dtype | shape | case | fastdiff µs | eager µs | compile µs | copy µs "
        "| vs eager | vs compile | / copy | GB/s | other backends µs |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    other = {}
    for (dev, dtype, shape, kind), r in sorted(rows.items()):
        if not all(k in r for k in ("fastdiff", "eager", "compile", "copy")):
            other[(dev, dtype, shape, kind)] = r
            continue
        fd = r["fastdiff"]
        forced = ", ".join(f"{k[len('fastdiff['):-1]} {v * 1e6:.1f} ({r['eager'] / v:.2f}x)"
                           for k, v in sorted(r.items()) if k.startswith("fastdiff[")) or "-"
        lines.append(
            f"| {dev} | {dtype} | {shape} | {kind} | {fd * 1e6:.1f} | {r['eager'] * 1e6:.1f} "
            f"| {r['compile'] * 1e6:.1f} | {r['copy'] * 1e6:.1f} | {r['eager'] / fd:.2f}x "
            f"| {r['compile'] / fd:.2f}x | {fd / r['copy']:.2f} | {r['bytes'] / fd / 1e9:.1f} | {forced} |"
        )
    lines += ["", "`vs eager` / `vs compile`: their time divided by fastdiff's (higher is better).", ""]
    if other:
        lines += [
            "## Loops, schedulers and other cases",
            "",
            "Median time per call (ms) of every implementation measured; `fastdiff speedup`",
            "is each other implementation's time divided by fastdiff's (`fastdiff`, or `optimize`",
            "where a row has no `fastdiff` implementation, e.g. the 2.x U-Net `unet64v2`). In the",
            "end-to-end rows `fastdiff` is `fastdiff.nn.UNet` + fastdiff's sampler and `optimize`",
            "the library's U-Net after `fastdiff.optimize` + fastdiff's sampler.",
            "",
            "| device | dtype | shape | case | implementations (ms) | fastdiff speedup | fastdiff rate |",
            "|---|---|---|---|---|---|---:|",
        ]
        for (dev, dtype, shape, kind), r in other.items():
            impls = {k: v for k, v in r.items() if k not in ("bytes", "flops")}
            cells = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in sorted(impls.items()))
            speedup = "-"
            # fastdiff's own implementation, else fastdiff.optimize of the library's model
            ours = next((k for k in ("fastdiff", "optimize") if k in impls), None)
            if ours:
                speedup = ", ".join(f"{ours} vs {k} {v / impls[ours]:.2f}x"
                                    for k, v in sorted(impls.items()) if k != ours) or "-"
            rate = "-"
            if ours:
                t = impls[ours]
                rate = (f"{r['flops'] / t / 1e12:.2f} TFLOP/s" if "flops" in r
                        else f"{r['bytes'] / t / 1e9:.1f} GB/s")
            lines.append(f"| {dev} | {dtype} | {shape} | {kind} | {cells} | {speedup} | {rate} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--import"]:
        # a pytest-benchmark JSON made elsewhere (a GPU machine); KEY=VALUE pairs name
        # what the JSON does not (device=..., torch=..., triton=..., backend=...)
        with open(args[1]) as f:
            data = json.load(f)
        store(data, dict(a.split("=", 1) for a in args[2:]))
    else:
        store(run_benchmarks(args), {})
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(render(load()))
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
