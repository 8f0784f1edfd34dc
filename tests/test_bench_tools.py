"""The benchmark helper scripts a GPU session runs (benchmarks/overhead.py,
benchmarks/profile_e2e.py) still run, on CPU with tiny settings: a GPU session
has no time to debug them."""

import pathlib
import re
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(*args, timeout=300):
    out = subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_profile_e2e_reports_wall_and_op_time():
    text = _run("profile_e2e.py", "--impls", "eager,optimize", "--reps", "1", "--top", "3")
    heads = re.findall(r"^== (train|sample) / (\w+): wall ([\d.]+) ms per step, op self time ([\d.]+) ms",
                       text, re.M)
    assert [(k, i) for k, i, _, _ in heads] == [("train", "eager"), ("train", "optimize"),
                                                ("sample", "eager"), ("sample", "optimize")]
    assert all(float(w) > 0 and float(b) > 0 for _, _, w, b in heads)
    assert "aten::mkldnn_convolution" in text or "aten::convolution" in text


def test_overhead_cases_run():
    sys.path.insert(0, str(BENCH))
    try:
        import overhead
    finally:
        sys.path.remove(str(BENCH))
    names = set()
    for name, mode, fn, raw, eager in overhead.cases("cpu"):
        fn()
        for other in (raw, eager):
            if other is not None:
                other()
        names.add((name, mode))
    assert ("group_norm_silu", "fwd+bwd") in names and ("sampler_step", "no_grad") in names
