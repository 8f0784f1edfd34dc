"""``python -m fastdiff bench / sample / train`` with tiny settings."""

import io
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from fastdiff import cli


def _png_info(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks.setdefault(tag, b"")
        chunks[tag] += body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    channels = {0: 1, 2: 3}[color]
    assert depth == 8 and len(raw) == h * (1 + w * channels)
    assert b"IEND" in chunks
    return w, h


def test_write_png_grid(tmp_path):
    x = torch.linspace(-1, 1, 5 * 16 * 16).reshape(5, 1, 16, 16)
    path = tmp_path / "g.png"
    cli.write_png(path, cli.make_grid(x, scale=2))
    gh, gw = cli.grid_size(5, 16, 16, scale=2)
    assert _png_info(path) == (gw, gh)
    cli.write_png(tmp_path / "rgb.png", cli.make_grid(torch.zeros(2, 3, 4, 4), scale=1))
    assert _png_info(tmp_path / "rgb.png") == cli.grid_size(2, 4, 4, scale=1)[::-1]


def test_bench_tiny(capsys):
    assert cli.main(["bench", "--tiny", "--no-compile", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for op in ("ddim step", "group_norm_silu", "attention"):
        assert op in out
    assert "fastdiff ms" in out and "vs eager" in out
    assert "note:" not in out  # no implementation failed


def test_bench_tiny_compile():
    """Every row has all three columns; with diffusers installed, the U-Net rows (a
    sampling and a training step of UNet2DModel: eager, optimize, compile) are there."""
    buf = io.StringIO()
    rows = cli.bench("cpu", size="tiny", compile=True, reps=1, progress=False, file=buf)
    for r in rows:
        assert all(r[k] is not None for k in ("fastdiff", "eager", "compile")), r
    ops = [r["op"] for r in rows]
    assert "group_norm_silu" in ops
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return
    assert ops[-2:] == ["unet sample step", "unet train step"]


@pytest.fixture
def _restore_threads():
    n = torch.get_num_threads()  # --threads sets it process-wide
    yield
    torch.set_num_threads(n)


def test_train_then_sample(tmp_path, _restore_threads):
    pytest.importorskip("sklearn")
    weights = tmp_path / "w.pt"
    assert cli.main(["train", "--iters", "2", "--batch", "4", "--out", str(weights), "--threads", "1", "--no-progress"]) == 0
    assert weights.exists() and weights.stat().st_size < 1_000_000
    for sampler, steps in (("ddim", 2), ("heun", 3), ("dpmpp_2m", 2)):
        out = tmp_path / f"{sampler}.png"
        assert cli.main(["sample", "--weights", str(weights), "--sampler", sampler, "--steps", str(steps),
                         "--n", "3", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
        gh, gw = cli.grid_size(3, 16, 16, scale=4)
        assert _png_info(out) == (gw, gh)


def test_sample_shipped_weights_is_seeded(tmp_path):
    if not cli.ASSET.exists():
        pytest.skip("no fastdiff/assets/digits_unet.pt")
    a = cli.sample(n=2, steps=2, seed=3, progress=False)
    b = cli.sample(n=2, steps=2, seed=3, progress=False)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastdiff", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout and "sample" in out.stdout
