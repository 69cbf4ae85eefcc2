"""The fused kernel's int4 codes (``kernels/codes_int4.h``) against their definition, in C++.

On AVX2 lanes the kernel finds the level below ``u`` by comparing it with the float32 thresholds
where ``floor(sqrt_f64(u) * top)`` steps, not by the float64 square root of the Python codec. This
checks that the two agree for every float32 ``u`` in [0, 1] (about 1.07e9 of them, per code map),
and that the AVX2 codes of 8 lanes equal the scalar ones on random and special values, block
scales 0, subnormal (inverse inf) and ordinary. The training tests compare the whole kernel with
the Python codec (tests/test_compressed_kernels.py); this covers the values they cannot aim at.
"""

from __future__ import annotations

import subprocess

import pytest

from adabelief.kernels import cpu

CHECK = r"""
#include <cstdio>
#include <random>
#include "codes_int4.h"

template <int TOP> long bad_thresholds(const Int4Map& map) {
  long bad = 0;
  for (uint32_t bits = 0; bits <= 0x3f800000u; ++bits) {  // every float in [0, 1]
    const float u = from_bits(bits);
    int count = 0;
    for (int j = 1; j < TOP; ++j) count += u >= map.threshold[j];
    bad += count != level_below<TOP>(u);
  }
  return bad;
}

#if defined(__AVX2__)
template <bool BELIEF> long bad_lanes(long trials) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> any;
  std::uniform_real_distribution<float> unit(-1.5f, 1.5f);
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, 1e-45f, -1e-45f,
                            1.0f, -1.0f, 3e38f};
  long bad = 0;
  for (long t = 0; t < trials; ++t) {
    const float inverses[] = {1.0f, 0.0f, INFINITY, from_bits(any(rng) & 0x7f7fffffu)};
    const float inv = inverses[t % 4];
    float v[8];
    uint32_t d[8];
    for (int k = 0; k < 8; ++k) {
      const uint32_t r = any(rng);
      if (r % 7 == 0) {
        v[k] = specials[r % 11];
      } else if (r % 7 == 1) {
        v[k] = from_bits(any(rng));
      } else {
        v[k] = unit(rng) / (inv > 0.0f && inv < INFINITY ? inv : 1.0f);
      }
      d[k] = any(rng) & 0xffffu;
    }
    const Int4Lanes<BELIEF> lanes(inv);
    const __m256i dither = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d));
    int32_t out[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        int4_codes<BELIEF>(load8(v), lanes, dither));
    for (int k = 0; k < 8; ++k) bad += out[k] != int4_code<BELIEF>(v[k], inv, d[k]);
  }
  return bad;
}
#else
template <bool BELIEF> long bad_lanes(long) { return 0; }
#endif

int main() {
  printf("%ld %ld %ld %ld\n", bad_thresholds<7>(kSignedMap), bad_thresholds<15>(kBeliefMap),
         bad_lanes<false>(1000000), bad_lanes<true>(1000000));
}
"""


@pytest.mark.slow  # a compiler build, and 2.1e9 square roots
@pytest.mark.skipif(cpu.compiler() is None, reason="no C++ compiler here")
def test_thresholds_and_lanes_agree_with_the_definition(tmp_path):
    cpu.write_sources(tmp_path)
    (tmp_path / "check.cpp").write_text(CHECK)
    flags = ["-O2", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    kernel = cpu.kernel()
    if kernel is not None and kernel.avx2:  # this CPU runs AVX2: check the lanes too
        flags += ["-mavx2", "-mfma"]
    macros = [f"-D{name}={value}" for name, value in cpu.CPU_ABI.items()]
    command = [str(cpu.compiler()), *flags, *macros, "check.cpp", "-o", "check"]
    built = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    done = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0", "0", "0"], done.stdout
