"""benchmarks/predict.py says what the machine is: CPU features and the right compute limit, with and without
native bf16 (fake flags and peaks here; the benchmark itself measures them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "predict.py"
AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_predict", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_are_read_from_cpuinfo(bench):
    cpuinfo = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n"
    assert bench.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert bench.cpu_flags("no flags here") == set()


def test_features_are_listed(bench):
    assert bench.features_text(AVX2) == ("CPU features: avx2 yes, avx512f no, avx512_bf16 no, amx no "
                                         "(native bf16: no, bf16 is emulated)")
    assert bench.features_text(SAPPHIRE_RAPIDS) == ("CPU features: avx2 yes, avx512f yes, avx512_bf16 yes, amx yes "
                                                    "(native bf16: yes)")


def test_native_bf16_cpu_is_limited_by_bf16(bench):
    """The CPU the issue saw: bf16 365.7 GFLOP/s was reported as '0x it: no native bf16'."""
    text = bench.limit_text(120.0, fp32=180.0, bf16=365.7, flags=SAPPHIRE_RAPIDS)
    assert "bf16 is 2.0x faster (native bf16), so bf16 is the limit: 33% of it reached" in text
    assert "67% of the fp32 peak" in text
    assert "no native bf16" not in text and "0x" not in text.replace("2.0x", "")


def test_cpu_without_native_bf16_is_limited_by_fp32(bench):
    text = bench.limit_text(60.0, fp32=150.0, bf16=2.5, flags=AVX2)
    assert text == ("this CPU's matmul peaks: fp32 150 GFLOP/s, bf16 2.5 GFLOP/s; bf16 is 60.0x slower "
                    "(no native bf16: it is emulated), so fp32 is the limit: 40% of it reached")


def test_the_measurement_decides_not_the_flags(bench):
    slow_native = bench.limit_text(60.0, fp32=150.0, bf16=100.0, flags=SAPPHIRE_RAPIDS)
    assert "so fp32 is the limit" in slow_native and "native bf16, yet slower here" in slow_native
    fast_unflagged = bench.limit_text(60.0, fp32=150.0, bf16=300.0, flags=set())
    assert "so bf16 is the limit" in fast_unflagged and "no native bf16 flag was found" in fast_unflagged
