// Batched decode mat-vec on int8 activations, over the columns of a batched decode step
// (one token of a different sequence each): y[c * ld_y + y_offset + r] (=, or +=)
// dot(W row r, x_c) for every column c < step[0] (at most 16) and row r of the piece.
// x_c arrives quantized by quant_rows.comp (column c's blocks at c * k / 32); the
// weight blocks meet it in 4-way int8 dot products as in mvq.glsl (the same block
// layouts, split into load_x: load a column's activations for a lane's share of a block,
// with what depends on the column only (block sums, their products with the scales);
// load_w: load and unpack a row's share, nibbles to bytes and scales to f32, everything
// that depends on the row only; and wacc: their int8 dots and the f32 epilogue, fused
// into the accumulator). A workgroup computes NRB rows for its columns: for each weight
// block its lanes load and unpack the rows' shares once, into registers, then dot them
// with every column's activations, so the weights are read and unpacked once per column
// set whatever the column count. (The earlier block readers, which redid the nibble masks
// per column, measured 2-3% slower on the H100: docs/BENCHMARKS.md, session 8.)
//
// Two mains:
//   MVQN_GROUPED (mvqm_*, the default): a workgroup takes NRB rows x one group of NC = 8
//     columns (workgroup g: column group g % ncg, row group g / ncg, so the groups of one
//     row group run side by side and its weights come from memory once); each lane keeps
//     NC x NRB partial sums. The subgroup build sums them within each subgroup by a
//     transposing shuffle butterfly and then over the subgroups through ~2 KB of shared
//     memory, one barrier (H100: 6% faster steps than the shared build's pass, which
//     held ~9 KB per workgroup: what a workgroup holds in shared memory the SM's L1,
//     through which every column's activations are read, loses; docs/BENCHMARKS.md,
//     session 12). The shared build sums them in one pass through shared memory
//     (transposed: value-major, padded) with two barriers per 16 values, so the cost
//     after the dot products does not grow per column by a pair of barriers.
//   else (mvqn_*, CALDERA_VK_MVQN_OLD=1): one workgroup per NRB rows for all 16 columns,
//     reduced column after column (a vec4 reduction with two barriers each).
// Binding 0: the piece's raw blocks. 1: q (u32 words, k / 4 per column). 2: d (f32,
// k / 32 per column). 3: y. 4: step values ([0] columns). 5 (mvqm_*, mvqm8_*): with
// MVN_SUMS, the sum of each block's int8 values (i32, as d), written by quant_rows
// (QR_SUMS), which Q4_0 and Q4_K read instead of summing the block per row group; any
// buffer without.
#include "common.glsl"
#if USE_SUBGROUP && MVQN_GROUPED
#extension GL_KHR_shader_subgroup_shuffle : require
#endif
#if USE_DOT
#extension GL_EXT_spirv_intrinsics : require
#endif

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
layout(std430, binding = 0) readonly buffer Wbuf4 { uvec4 w4[]; };
layout(std430, binding = 1) readonly buffer Qbuf2 { uvec2 xq2[]; };
layout(std430, binding = 1) readonly buffer Qbuf4 { uvec4 xq4[]; };
layout(std430, binding = 2) readonly buffer Dbuf { float xd[]; };
layout(std430, binding = 3) buffer Ybuf { float y[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };
#if MVQN_GROUPED && !MVQN_V1
#define MVQN_XSUM 1
layout(std430, binding = 5) readonly buffer XSbuf { int xsum[]; };
#endif

layout(push_constant) uniform Push {
    uint k;
    uint rows;     // weight rows in this piece
    uint y_offset; // element of a column's y row that the piece's row 0 writes
    uint ld_y;     // elements between columns in y
    uint flags;    // MVN_ADD, MVN_SOFTCAP
    float cap;
#if MVQN_GROUPED
    uint ncg;      // column groups (of NC) dispatched per row group
#endif
} p;

const uint MVN_ADD = 1u;
const uint MVN_SOFTCAP = 2u;
const uint MVN_SUMS = 4u;
const uint MAXC = 16u;
// Weight rows per workgroup: 4 (reduce4 sums four), or 8 with MVQN_NRB = 8 (mvqm8_*,
// CALDERA_VK_MVQM_ROWS=8: each column's activation loads and block sums serve 8 rows,
// for NC * NRB = 64 sums and 8 rows' unpacked blocks in registers per lane, about 64 +
// 8 x 12 = 160 32-bit registers for Q4_K and Q6_K against 32 + 48 = 80 with 4).
#ifndef MVQN_NRB
#define MVQN_NRB 4
#endif
#if !MVQN_GROUPED && MVQN_NRB != 4
#error "the per-column reduction of mvqn_* sums four rows"
#endif
const uint NRB = MVQN_NRB;

#include "words.glsl"

// The current column's offsets into the activations (uvec2, uvec4 and float units).
uint XO2;
uint XO4;
uint XOD;

#include "dot8.glsl"

// Whether the activations' block sums come with them (binding 5), and block i's.
bool have_sums() {
#if MVQN_XSUM
    return (p.flags & MVN_SUMS) != 0u;
#else
    return false;
#endif
}
int xsum_at(uint i) {
#if MVQN_XSUM
    return xsum[i];
#else
    return 0;
#endif
}

#if defined(TYPE_Q4_0)
// 18 B / 32: d, qs[16]. Lane t (of 2): qs[8t .. 8t + 8], elements 8t .. + 8 (low
// nibbles) and 16 + 8t .. + 8 (high); value d (n - 8). The -8 of every weight meets
// the column's block sum once per column (IX.x = -8 Σ x), not once per row.
const uint L = 2u;
const uint BE = 32u;
void load_x(uint b, uint lane) {
    uvec2 lo = xq2[XO2 + (4u * b + lane)];
    uvec2 hi = xq2[XO2 + (4u * b + 2u + lane)];
    XA = uvec4(lo, hi);
    FX.x = xd[XOD + (b)];
    if (have_sums()) {
        // The whole block's correction on lane 0 (both lanes have the same scales).
        IX.x = lane == 0u ? -8 * xsum_at(XOD + b) : 0;
    } else {
        IX.x = -8 * (sdot(lo.x, ONES) + sdot(lo.y, ONES) + sdot(hi.x, ONES) + sdot(hi.y, ONES));
    }
}
struct WB {
    uvec4 q; // the low nibbles of the lane's two words, then the high, as bytes
    float d;
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 32u) + b) * 18u;
    uvec2 q = u64_at(o + 2u + 8u * lane);
    return WB(uvec4(q & LO4, (q >> 4) & LO4), f16_at(o));
}
float wacc(float acc, WB w) {
    int s = IX.x + udot(w.q.x, XA.x) + udot(w.q.y, XA.y) + udot(w.q.z, XA.z)
          + udot(w.q.w, XA.w);
    return fma(w.d * FX.x, float(s), acc);
}
#elif defined(TYPE_Q8_0)
// 34 B / 32: d, qs: i8[32]. Lane t (of 4): qs[8t .. 8t + 8].
const uint L = 4u;
const uint BE = 32u;
void load_x(uint b, uint lane) {
    XA.xy = xq2[XO2 + (4u * b + lane)];
    FX.x = xd[XOD + (b)];
}
struct WB {
    uvec2 q;
    float d;
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 32u) + b) * 34u;
    return WB(u64_at(o + 2u + 8u * lane), f16_at(o));
}
float wacc(float acc, WB w) {
    return fma(w.d * FX.x, float(sdot(w.q.x, XA.x) + sdot(w.q.y, XA.y)), acc);
}
#elif defined(TYPE_Q4_K)
// 144 B / 256: d, dmin, scales[12], qs[128]. Lane t (of 8), j = t / 2, h = t % 2:
// qs[32j + 16h .. + 16], elements 64j + 16h .. + 16 (low nibbles, group 2j) and
// 64j + 32 + 16h .. + 16 (high nibbles, group 2j + 1); value d sc n - dmin mn.
//
// Instruction estimate per (column, 32 weights), i.e. one lane's share of one row's
// block met by one column, counting one instruction per int8 dot (IDP4A with the
// running sum as its addend), mask, shift, conversion and f32 op, with NRB = 4 rows and
// NC = 8 columns per workgroup (so load_x's work counts 1/4, load_w's 1/8), assuming the
// driver does not share the weights' masks between the unrolled columns itself:
//   before (the earlier readers, session 8's A/B `mvqmo_q4_k`): wdot 12 mask / shift (4 AND low; 4 SHR + 4 AND
//     high) + 8 IDP4A + 2 I2F + 8 f32 (5 FMUL, 1 FFMA, the subtraction, the += ) = 30;
//     load_x ~24 / 4 = 6 (2 x 16 B + 2 x 4 B loads, ~6 address ops, 8 IDP4A for the
//     block sums, 2 I2F, 2 FMUL); load_w ~24 / 8 = 3  ->  ~39, plus the reduction
//     (~3.5 per output and lane at k = 4096 with WG = 128).
//   after (this file, mvqm_q4_k): wacc 8 IDP4A + 2 I2F + 2 FMUL + 4 FFMA (into the
//     accumulator; -dmin mn folded in load_w) = 16; load_x with quant_rows' block sums
//     (MVN_SUMS) ~14 / 4 = 3.5 (the same loads plus 2 x 4 B of sums on half the lanes,
//     no IDP4A), without them 6 as before; load_w ~36 / 8 = 4.5 (its 12 masks / shifts
//     now once per row and block)  ->  ~24, plus the same reduction: about 27.5
//     against 42.5, ~0.65x (without the sums ~30, ~0.7x).
//   mvqm8_q4_k (NRB = 8): load_x counts 1/8: ~1.75 with the sums (3 without)  ->  ~22
//     + 3.5 = 25.5, ~0.6x, if its ~160 registers per lane (see NRB) do not spill or
//     starve the SM of warps.
const uint L = 8u;
const uint BE = 256u;
void load_x(uint b, uint lane) {
    uint j = lane >> 1;
    uint e = 256u * b + 64u * j + 16u * (lane & 1u);
    XA = xq4[XO4 + (e >> 4)];
    XB = xq4[XO4 + ((e + 32u) >> 4)];
    float dl = xd[XOD + (8u * b + 2u * j)];
    float dh = xd[XOD + (8u * b + 2u * j + 1u)];
    if (have_sums()) {
        // The groups' whole dmin mn corrections on the lane of their first half (the
        // two halves have the same scales and mins), none on the other.
        int sl = 0;
        int sh = 0;
        if ((lane & 1u) == 0u) {
            sl = xsum_at(XOD + (8u * b + 2u * j));
            sh = xsum_at(XOD + (8u * b + 2u * j + 1u));
        }
        FX = vec4(dl, dh, dl * float(sl), dh * float(sh));
    } else {
        int sl = sdot(XA.x, ONES) + sdot(XA.y, ONES) + sdot(XA.z, ONES) + sdot(XA.w, ONES);
        int sh = sdot(XB.x, ONES) + sdot(XB.y, ONES) + sdot(XB.z, ONES) + sdot(XB.w, ONES);
        FX = vec4(dl, dh, dl * float(sl), dh * float(sh));
    }
}
struct WB {
    uvec4 lo; // the low nibbles of the lane's 16 bytes (group 2j), as bytes
    uvec4 hi; // the high nibbles (group 2j + 1)
    vec4 s;   // d sc (low, high groups), -dmin mn (low, high)
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 256u) + b) * 9u; // 16-byte units
    uint j = lane >> 1;
    uvec4 hd = w4[o];
    uvec4 q = w4[o + 1u + 2u * j + (lane & 1u)];
    vec2 dm = unpackHalf2x16(hd.x);
    uint sh = 16u * (j & 1u);
    uint sa = hd.y >> sh;
    uint sb = hd.z >> sh;
    uint sc = hd.w >> sh;
    uint scl = j < 2u ? sa & 0x3f3fu : (sc & 0x0f0fu) | ((sa >> 2) & 0x3030u);
    uint mnl = j < 2u ? sb & 0x3f3fu : ((sc >> 4) & 0x0f0fu) | ((sb >> 2) & 0x3030u);
    return WB(q & LO4, (q >> 4) & LO4,
              vec4(dm.x * float(scl & 255u), dm.x * float(scl >> 8),
                   -(dm.y * float(mnl & 255u)), -(dm.y * float(mnl >> 8))));
}
float wacc(float acc, WB w) {
    int lo = udot(w.lo.x, XA.x) + udot(w.lo.y, XA.y) + udot(w.lo.z, XA.z)
           + udot(w.lo.w, XA.w);
    int hi = udot(w.hi.x, XB.x) + udot(w.hi.y, XB.y) + udot(w.hi.z, XB.z)
           + udot(w.hi.w, XB.w);
    acc = fma(w.s.x * FX.x, float(lo), acc);
    acc = fma(w.s.y * FX.y, float(hi), acc);
    acc = fma(w.s.z, FX.z, acc);
    return fma(w.s.w, FX.w, acc);
}
#elif defined(TYPE_Q6_K)
// 210 B / 256: ql[128], qh[64], scales: i8[16], d. Lane t (of 8), n = t / 4,
// l0 = 8 (t % 4): l = l0 .. l0 + 8 of half n, elements 128n + 32m + l (m = 0..3) from
// the nibbles of ql[64n + l] (m = 0, 2) and ql[64n + 32 + l] (m = 1, 3) and bits 2m of
// qh[32n + l]; value d sc[8n + l0 / 16 + 2m] (q - 32). The -32 meets the column's
// group sums once per column (IX = -32 Σ x), as the first addend of each dot.
const uint L = 8u;
const uint BE = 256u;
void load_x(uint b, uint lane) {
    uint n = lane >> 2;
    uint e = 256u * b + 128u * n + 8u * (lane & 3u);
    uvec2 x0 = xq2[XO2 + (e >> 3)];
    uvec2 x1 = xq2[XO2 + ((e + 32u) >> 3)];
    uvec2 x2 = xq2[XO2 + ((e + 64u) >> 3)];
    uvec2 x3 = xq2[XO2 + ((e + 96u) >> 3)];
    XA = uvec4(x0, x1);
    XB = uvec4(x2, x3);
    uint db = 8u * b + 4u * n;
    FX = vec4(xd[XOD + (db)], xd[XOD + (db + 1u)], xd[XOD + (db + 2u)], xd[XOD + (db + 3u)]);
    IX = -32 * ivec4(sdot(x0.x, ONES) + sdot(x0.y, ONES), sdot(x1.x, ONES) + sdot(x1.y, ONES),
                     sdot(x2.x, ONES) + sdot(x2.y, ONES), sdot(x3.x, ONES) + sdot(x3.y, ONES));
}
struct WB {
    uvec4 q[2]; // the 6-bit values of the lane's four groups, as bytes (0 .. 63)
    vec4 sc;    // d sc of the four groups
};
WB load_w(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 256u) + b) * 210u;
    uint n = lane >> 2;
    uint l0 = 8u * (lane & 3u);
    uvec2 a = u64_at(o + 64u * n + l0);
    uvec2 c = u64_at(o + 64u * n + 32u + l0);
    uvec2 h = u64_at(o + 128u + 32u * n + l0);
    uvec2 s = u64_at(o + 192u + 8u * n);
    int is = int(8u * (l0 >> 4));
    float d = f16_at(o + 208u);
    vec4 sc = d * vec4(bitfieldExtract(int(s.x), is, 8), bitfieldExtract(int(s.x), is + 16, 8),
                       bitfieldExtract(int(s.y), is, 8), bitfieldExtract(int(s.y), is + 16, 8));
    const uint M2 = 0x30303030u;
    WB w;
    w.q[0] = uvec4((a.x & LO4) | ((h.x << 4) & M2), (a.y & LO4) | ((h.y << 4) & M2),
                   (c.x & LO4) | ((h.x << 2) & M2), (c.y & LO4) | ((h.y << 2) & M2));
    w.q[1] = uvec4(((a.x >> 4) & LO4) | (h.x & M2), ((a.y >> 4) & LO4) | (h.y & M2),
                   ((c.x >> 4) & LO4) | ((h.x >> 2) & M2), ((c.y >> 4) & LO4) | ((h.y >> 2) & M2));
    w.sc = sc;
    return w;
}
float wacc(float acc, WB w) {
    int d0 = IX.x + udot(w.q[0].x, XA.x) + udot(w.q[0].y, XA.y);
    int d1 = IX.y + udot(w.q[0].z, XA.z) + udot(w.q[0].w, XA.w);
    int d2 = IX.z + udot(w.q[1].x, XB.x) + udot(w.q[1].y, XB.y);
    int d3 = IX.w + udot(w.q[1].z, XB.z) + udot(w.q[1].w, XB.w);
    vec4 v = vec4(d0, d1, d2, d3) * FX;
    acc = fma(w.sc.x, v.x, acc);
    acc = fma(w.sc.y, v.y, acc);
    acc = fma(w.sc.z, v.z, acc);
    return fma(w.sc.w, v.w, acc);
}
#else
#error "no TYPE_* defined"
#endif


#if MVQN_GROUPED
const uint NC = 8u;  // columns per workgroup
const uint RV = 16u; // partial sums reduced per round (NC * NRB is a multiple)
const uint PAD = 2u; // red_m row padding: the part-sums of phase 2 read distinct banks
#if USE_SUBGROUP
// The subgroup build sums within subgroups by shuffles and meets the other subgroups in
// red_s (subgroups of at least 8 lanes: the host runs mvqn_* below that), so the
// workgroup holds ~2 KB of shared memory instead of ~9: the rest stays L1 cache, which
// the columns' activations are read through.
const uint V = NC * NRB;
shared float red_s[(WG / 8u) * V];
#else
shared float red_m[RV * (WG + PAD)];
shared float red_p[WG + RV];
#endif

// Writes (softcap, residual add) the finished sum of row row0 + r, column c.
void store(uint c, uint row, float v) {
    if ((p.flags & MVN_SOFTCAP) != 0u) {
        v = p.cap * tanh(v / p.cap);
    }
    uint yi = c * p.ld_y + p.y_offset + row;
    if ((p.flags & MVN_ADD) != 0u) {
        v += y[yi];
    }
    y[yi] = v;
}

void main() {
    uint grp = flat_group();
    uint tid = gl_LocalInvocationID.x;
    uint row0 = (grp / p.ncg) * NRB;
    uint c0 = (grp % p.ncg) * NC;
    uint live = min(step[0], MAXC);
    if (row0 >= p.rows || c0 >= live) {
        return; // uniform: the dispatch's tail or a padding column group
    }
    uint nc = min(live - c0, NC);
    uint last = p.rows - 1u;
    float a[NC * NRB];
    [[unroll]] for (uint i = 0u; i < NC * NRB; i++) {
        a[i] = 0.0;
    }
    const uint SLOTS = WG / L;
    uint lane = tid % L;
    uint nb = p.k / BE;
    for (uint b = tid / L; b < nb; b += SLOTS) {
        WB wr[NRB];
        [[unroll]] for (uint r = 0u; r < NRB; r++) {
            wr[r] = load_w(min(row0 + r, last), b, lane);
        }
        [[unroll]] for (uint c = 0u; c < NC; c++) {
            if (c < nc) {
                XO2 = (c0 + c) * (p.k / 8u);
                XO4 = (c0 + c) * (p.k / 16u);
                XOD = (c0 + c) * (p.k / 32u);
                load_x(b, lane);
                [[unroll]] for (uint r = 0u; r < NRB; r++) {
                    a[c * NRB + r] = wacc(a[c * NRB + r], wr[r]);
                }
            }
        }
    }
#if USE_SUBGROUP
    // All NC x NRB sums over each subgroup by a transposing butterfly: each step halves
    // the values a lane holds, keeping the lower or upper half by its lane bit and adding
    // the partner's copy of that half; past one value per lane (subgroups wider than V)
    // the steps just add. Lane l then holds `held` sums, of values idx .. idx + held.
    uint sgs = gl_SubgroupSize;
    uint ln = gl_SubgroupInvocationID;
    uint idx = 0u;
    [[unroll]] for (uint k = 0u; k < 8u; k++) {
        uint o = sgs >> (k + 1u);
        uint h = V >> (k + 1u);
        if (o != 0u) { // uniform
            bool up = (ln & o) != 0u;
            if (h != 0u) {
                [[unroll]] for (uint i = 0u; i < V / 2u; i++) {
                    if (i < h) {
                        float keep = up ? a[i + h] : a[i];
                        float give = up ? a[i] : a[i + h];
                        a[i] = keep + subgroupShuffleXor(give, o);
                    }
                }
                idx += up ? h : 0u;
            } else {
                a[0] += subgroupShuffleXor(a[0], o);
            }
        }
    }
    uint held = sgs >= V ? 1u : V / sgs;
    // Past V lanes, lanes that differ only in the low bits hold the same sums.
    if (sgs <= V || (ln & (sgs / V - 1u)) == 0u) {
        [[unroll]] for (uint j = 0u; j < V; j++) {
            if (j < held) {
                red_s[gl_SubgroupID * V + idx + j] = a[j];
            }
        }
    }
    barrier();
    for (uint v = tid; v < nc * NRB; v += WG) {
        float s = 0.0;
        for (uint g = 0u; g < gl_NumSubgroups; g++) {
            s += red_s[g * V + v];
        }
        uint c = v / NRB;
        uint row = row0 + v % NRB;
        if (row <= last) {
            store(c0 + c, row, s);
        }
    }
}
#else
    // All NC x NRB sums over the workgroup, RV at a time: each lane writes its partials
    // value-major (phase 1), P = WG / RV lanes per value add WG / P of them each (phase
    // 2), RV lanes add the P part-sums and store.
    const uint P = WG >= RV ? WG / RV : 1u;
    [[unroll]] for (uint r0 = 0u; r0 < NC * NRB; r0 += RV) {
        if (r0 < nc * NRB) { // uniform
            [[unroll]] for (uint j = 0u; j < RV; j++) {
                red_m[j * (WG + PAD) + tid] = a[r0 + j];
            }
            barrier();
            for (uint o = tid; o < RV * P; o += WG) {
                uint v = o % RV;
                float s = 0.0;
                for (uint i = o / RV; i < WG; i += P) {
                    s += red_m[v * (WG + PAD) + i];
                }
                red_p[o] = s;
            }
            barrier();
            for (uint v = tid; v < RV; v += WG) {
                float s = 0.0;
                for (uint q = 0u; q < P; q++) {
                    s += red_p[q * RV + v];
                }
                uint c = (r0 + v) / NRB;
                uint row = row0 + (r0 + v) % NRB;
                if (c < nc && row <= last) {
                    store(c0 + c, row, s);
                }
            }
        }
    }
}
#endif
#else
shared float red_n[NRB * WG];

// Sums the four values over the workgroup (uniform control flow).
vec4 reduce4(vec4 v) {
#if USE_SUBGROUP
    v = subgroupAdd(v);
    if (subgroupElect()) {
        red_n[gl_SubgroupID] = v.x;
        red_n[WG + gl_SubgroupID] = v.y;
        red_n[2u * WG + gl_SubgroupID] = v.z;
        red_n[3u * WG + gl_SubgroupID] = v.w;
    }
    barrier();
    vec4 s = vec4(0.0);
    for (uint i = 0u; i < gl_NumSubgroups; i++) {
        s += vec4(red_n[i], red_n[WG + i], red_n[2u * WG + i], red_n[3u * WG + i]);
    }
    barrier();
    return s;
#else
    uint t = gl_LocalInvocationID.x;
    red_n[t] = v.x;
    red_n[WG + t] = v.y;
    red_n[2u * WG + t] = v.z;
    red_n[3u * WG + t] = v.w;
    barrier();
    for (uint hs = WG / 2u; hs > 0u; hs >>= 1) {
        if (t < hs) {
            red_n[t] += red_n[t + hs];
            red_n[WG + t] += red_n[WG + t + hs];
            red_n[2u * WG + t] += red_n[2u * WG + t + hs];
            red_n[3u * WG + t] += red_n[3u * WG + t + hs];
        }
        barrier();
    }
    vec4 s = vec4(red_n[0], red_n[WG], red_n[2u * WG], red_n[3u * WG]);
    barrier();
    return s;
#endif
}

void main() {
    uint grp = flat_group();
    uint tid = gl_LocalInvocationID.x;
    uint row0 = grp * NRB;
    uint last = p.rows - 1u;
    uint ncol = min(step[0], MAXC);
    float a[MAXC * NRB];
    [[unroll]] for (uint i = 0u; i < MAXC * NRB; i++) {
        a[i] = 0.0;
    }
    const uint SLOTS = WG / L;
    uint lane = tid % L;
    uint nb = p.k / BE;
    for (uint b = tid / L; b < nb; b += SLOTS) {
        // The block's weights of every row, loaded and unpacked once, then met by each
        // column's activations.
        WB wr[NRB];
        [[unroll]] for (uint r = 0u; r < NRB; r++) {
            wr[r] = load_w(min(row0 + r, last), b, lane);
        }
        [[unroll]] for (uint c = 0u; c < MAXC; c++) {
            if (c < ncol) {
                XO2 = c * (p.k / 8u);
                XO4 = c * (p.k / 16u);
                XOD = c * (p.k / 32u);
                load_x(b, lane);
                [[unroll]] for (uint r = 0u; r < NRB; r++) {
                    a[c * NRB + r] = wacc(a[c * NRB + r], wr[r]);
                }
            }
        }
    }
    for (uint c = 0u; c < ncol; c++) {
        vec4 s = vec4(0.0);
        [[unroll]] for (uint cc = 0u; cc < MAXC; cc++) {
            if (cc == c) {
                s = vec4(a[cc * NRB], a[cc * NRB + 1u], a[cc * NRB + 2u], a[cc * NRB + 3u]);
            }
        }
        s = reduce4(s);
        if (tid < NRB && row0 + tid <= last) {
            float v = s[tid];
            if ((p.flags & MVN_SOFTCAP) != 0u) {
                v = p.cap * tanh(v / p.cap);
            }
            uint yi = c * p.ld_y + p.y_offset + row0 + tid;
            if ((p.flags & MVN_ADD) != 0u) {
                v += y[yi];
            }
            y[yi] = v;
        }
    }
}
#endif
