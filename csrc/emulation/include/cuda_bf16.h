#pragma once
#include <cstdint>
#include "svnr_math.h"
struct __nv_bfloat16 { std::uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 x) { return svnr::math::bf16_to_float(x.bits); }
inline __nv_bfloat16 __float2bfloat16(float x) { return {svnr::math::float_to_bf16(x)}; }
