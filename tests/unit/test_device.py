"""Unit tests of model/device.py's CPU description (what benchmarks report of the machine)."""

from __future__ import annotations

from model.device import COMPUTE_FLAGS, cpu_description

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma
"""


def test_a_xeon_with_amx_reports_its_model_and_bf16_and_amx_features() -> None:
    got = cpu_description(XEON_AMX)
    assert got == {
        "cpu_model": "Intel(R) Xeon(R) Processor",
        "cpu_features": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"],
    }


def test_an_avx2_cpu_reports_only_what_it_has_in_the_projects_order() -> None:
    got = cpu_description(EPYC_AVX2)
    assert got == {"cpu_model": "AMD EPYC 7B13", "cpu_features": ["avx2"]}
    assert got["cpu_features"] == [f for f in COMPUTE_FLAGS if f in EPYC_AVX2.split()]


def test_unreadable_cpuinfo_gives_empty_values() -> None:
    assert cpu_description("") == {"cpu_model": "", "cpu_features": []}
