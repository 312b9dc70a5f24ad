// How the 4-bit matmul kernels (matmul_4bit.cu, gemm_4bit.cu) decode weights: the byte -> pair
// table and the double quant's 8-bit code in shared memory, each row's absmax blocks, and a
// chunk's scale applied to a decoded pair.
#pragma once

#include "common.cuh"

namespace qlora_kernels {

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

// The raw absmax of a lane's two rows at one K position: the float32 bits or the 8-bit code,
// and its nested absmax.
struct ScaleLoads {
  uint32_t ra, rb;   // float32 absmax bits, or the double-quant code
  float na, nb;      // the nested absmax (double quant only)
};

// Where one lane's weight row starts: its bytes, and its first element's absmax block and the
// element's offset inside that block, so that a step's block index is 32-bit arithmetic (the
// host checks that the block count fits in 31 bits).
struct RowStart {
  const uint8_t* bytes;
  uint32_t block;
  uint32_t in_block;
};

__device__ __forceinline__ RowStart row_start(const uint8_t* packed, int row, int K, int lg_bs) {
  const int64_t e = static_cast<int64_t>(row) * K;
  return {packed + e / 2, static_cast<uint32_t>(e >> lg_bs), static_cast<uint32_t>(e & ((int64_t{1} << lg_bs) - 1))};
}

// The absmax of one lane's two chunks at k0 (rows ra and rb).
__device__ __forceinline__ ScaleLoads load_scales(const RowStart& ra, const RowStart& rb, int k0, bool k_ok,
                                                  const void* __restrict__ absmax, bool nested,
                                                  const float* __restrict__ nested_absmax, int lg_bs, int lg_nbs) {
  // Predicated loads, no branch: a step past K loads nothing and its registers are zero.
  ScaleLoads l;
  const uint32_t ba = ra.block + ((ra.in_block + k0) >> lg_bs);
  const uint32_t bb = rb.block + ((rb.in_block + k0) >> lg_bs);
  if (nested) {
    l.ra = k_ok ? __ldg(static_cast<const uint8_t*>(absmax) + ba) : 0u;
    l.rb = k_ok ? __ldg(static_cast<const uint8_t*>(absmax) + bb) : 0u;
    l.na = k_ok ? __ldg(nested_absmax + (ba >> lg_nbs)) : 0.0f;
    l.nb = k_ok ? __ldg(nested_absmax + (bb >> lg_nbs)) : 0.0f;
  } else {
    l.ra = k_ok ? __float_as_uint(__ldg(static_cast<const float*>(absmax) + ba)) : 0u;
    l.rb = k_ok ? __float_as_uint(__ldg(static_cast<const float*>(absmax) + bb)) : 0u;
    l.na = l.nb = 0.0f;
  }
  return l;
}

// A chunk's absmax as a broadcast pair of T (0 for a lane past K: its MMA terms vanish).
template <typename T>
__device__ __forceinline__ uint32_t chunk_scale(uint32_t raw, float nested_value, bool k_ok,
                                                bool nested, const float* s_code8, float offset) {
  // Branch-free: a zero scale past K; the table read is harmless when not nested.
  const float decoded = fmaf(s_code8[raw & 0xffu], nested_value, offset);
  const float a = k_ok ? (nested ? decoded : __uint_as_float(raw)) : 0.0f;
  const T h = from_float<T>(a);
  typename Pair<T>::type p;
  p.x = h;
  p.y = h;
  uint32_t u;
  memcpy(&u, &p, sizeof(u));
  return u;
}

// Pair (as one 32-bit register) times the broadcast scale pair: one HMUL2.
template <typename T>
__device__ __forceinline__ uint32_t scale_pair(uint32_t v, uint32_t s) {
  typename Pair<T>::type a, b;
  memcpy(&a, &v, sizeof(a));
  memcpy(&b, &s, sizeof(b));
  const typename Pair<T>::type r = __hmul2(a, b);
  uint32_t u;
  memcpy(&u, &r, sizeof(u));
  return u;
}

// Bytes of the table: 256 entries of 128 bytes (one 4-byte copy per lane).
constexpr int kTableBytes = 256 * 128;

// Builds the byte -> pair table in shared memory (the caller syncs after). It reads constant
// memory only, so a kernel may build it before pdl_wait (load_code8 comes after).
// Entry b holds (code[b >> 4], code[b & 15]) as a pair of T, the high nibble (the element at the
// lower address) in the low half, at byte 128 b + 4 L for lane L: each lane reads its own copy
// (bank L), so the 32 lanes' random bytes never conflict, and the offset of byte j of a weight word
// is a shift and a LOP3, ((word shifted by 7 - 8 j) & 0x7f80) | 4 L. All 32 copies of an entry are
// equal: a thread writes 4 of them with one 16-byte store. (A 256-byte stride saves a shift for
// byte 1, but its 64 KB table left too little L1 for x and the absmax: the largest layers ran
// 9-15% slower on an H100.)
template <typename T>
__device__ __forceinline__ void build_pair_table(uint8_t* s_table, int quant_type, int tid, int threads) {
  for (int i = tid; i < 256 * 8; i += threads) {
    const int b = i >> 3;
    const float lo = __uint_as_float(kCodeValueBits[quant_type][b >> 4]);
    const float hi = __uint_as_float(kCodeValueBits[quant_type][b & 15]);
    const uint32_t v = pack2<T>(lo, hi);
    *reinterpret_cast<uint4*>(s_table + 128 * b + 16 * (i & 7)) = make_uint4(v, v, v, v);
  }
}

// The double quant's 8-bit code into shared memory (the caller syncs after).
__device__ __forceinline__ void load_code8(float* s_code8, const float* __restrict__ nested_code, bool nested, int tid,
                                           int threads) {
  if (nested) {
    for (int i = tid; i < 256; i += threads) s_code8[i] = nested_code[i];
  }
}

// mma_step's table lookup: the pair at a byte's table offset (byte << 7) in this lane's copy
// (lane4 = 4 * lane). A shift, a LOP3 and the LDS, the table's address coming from a uniform
// register (the lookups are most of the kernels' instructions; with the address in a regular
// register they took 2.25 ALU ops each instead of 2).
struct PairLookup {
  const uint8_t* table;
  uint32_t lane4;
  __device__ __forceinline__ uint32_t operator()(uint32_t byte_offset) const {
    return *reinterpret_cast<const uint32_t*>(table + (byte_offset | lane4));
  }
};

}  // namespace qlora_kernels
