// Unit test of csrc/cpu_common.h, compiled once per instruction set like the kernels (-DSVNR_CPU_NAMESPACE=...
// and the set's -march): the vectorised Philox against math::philox4x32_10, the normals' pixel-to-draw mapping,
// and TimeLookup (direct index and binary search) against a plain search over the table. Run by
// tests/test_cpp_unit.py; exits non-zero and names every failed check.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu_common.h"

namespace svnr {
[[noreturn]] void throw_unknown_dtype(const char*, int) { std::abort(); }
}  // namespace svnr

namespace {

namespace cpu = svnr::SVNR_CPU_NAMESPACE;
namespace math = svnr::math;

int failures = 0;

void expect(bool ok, const char* what, long long a = 0, long long b = 0) {
  if (!ok && ++failures <= 20) std::printf("FAILED: %s (%lld, %lld)\n", what, a, b);
}

void test_normals() {
  const std::uint64_t seed = 0x123456789abcull, offset = 0xfedcba987ull, stream = 77;
  std::vector<float> draws(1032);
  cpu::NormalScratch scratch(1032);
  for (std::int64_t first : {0ll, 4ll, 1020ll, 4000000000ll}) {
    for (std::int64_t n : {1ll, 3ll, 5ll, 37ll, 64ll, 1024ll, 1029ll}) {
      cpu::normals_row(seed, offset, stream, first, n, scratch, draws.data());
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t pixel = first + i;
        const math::Philox r = math::philox4x32_10(std::uint32_t(pixel / 4), std::uint32_t(stream),
                                                   std::uint32_t(offset), std::uint32_t(offset >> 32),
                                                   std::uint32_t(seed), std::uint32_t(seed >> 32));
        const math::NormalPair pair = pixel % 4 < 2 ? math::box_muller(r.x0, r.x1) : math::box_muller(r.x2, r.x3);
        const float want = pixel % 2 ? pair.b : pair.a;
        expect(draws[i] == want, "normals_row draw of a pixel", pixel, n);
      }
    }
  }
}

// The last k in [0, last - 1] with table[k] <= v, else 0: the reference's searchsorted, written plainly.
template <typename T>
int plain_segment(const std::vector<T>& table, T v) {
  int k = 0;
  for (int j = 0; j <= int(table.size()) - 2; ++j)
    if (table[j] <= v) k = j;
  return k;
}

template <typename T>
void test_time_lookup(const std::vector<T>& table) {
  const int last = int(table.size()) - 1;
  std::mt19937 gen(3);
  std::uniform_real_distribution<double> uniform(-0.1, double(table[last]) * 1.1 + 0.1);
  std::vector<T> v;
  for (int i = 0; i < 5000; ++i) v.push_back(T(uniform(gen)));
  for (const T g : table) {   // the knots themselves and their neighbours
    v.push_back(g);
    v.push_back(std::nextafter(g, T(-1)));
    v.push_back(std::nextafter(g, T(10)));
  }
  for (std::int64_t lookups : {std::int64_t(1), std::int64_t(1) << 20}) {   // binary search, direct index
    const cpu::TimeLookup<T> times(table.data(), last, lookups);
    std::vector<int> segment(v.size());
    std::vector<T> tau(v.size());
    times.row(v.data(), std::int64_t(v.size()), segment.data(), tau.data());
    for (std::size_t i = 0; i < v.size(); ++i) {
      const int want = plain_segment(table, v[i]);
      expect(segment[i] == want, "TimeLookup segment", segment[i], want);
      expect(tau[i] == math::time_on_segment(v[i], want, table.data(), last), "TimeLookup time", long(i), lookups);
    }
  }
}

std::vector<float> default_table() {
  std::vector<float> table(1001, 0.0f);
  double abar = 1;
  for (int k = 1; k <= 1000; ++k) {
    abar *= 1 - (1e-4 + (0.02 - 1e-4) * (k - 1) / 999.0);
    table[k] = float(5 * (1 - abar));
  }
  return table;
}

}  // namespace

int main() {
  test_normals();
  test_time_lookup(default_table());
  test_time_lookup(std::vector<float>{0.5f, 1.0f});
  test_time_lookup(std::vector<double>{0.0, 1e-3, 2e-3, 0.5, 0.50001, 3.0});
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("cpu_common.h: all checks passed\n");
  return 0;
}
