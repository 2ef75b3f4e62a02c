// Batched decode mat-vec on cooperative matrices: for every column c < step[0] (at most
// 16, one token of a different sequence each) and row r of the piece,
// y[c * ld_y + y_offset + r] (=, or +=) dot(W row r, x_c), softcapped with MVC_SOFTCAP.
// The inputs x_c arrive as f16 (half_rows.comp: normed, or act(gate) * up), column c at
// c * k (k a multiple of RK). The weights are dequantized once per step for all the
// columns (deq_tile.glsl's fetch16 / decode16, every block type) and the products run on
// the device's matrix units (f16 * f16 + f32), so a step of 16 columns costs about what
// one column's weights cost to read: the int8 mat-vecs (mvqn.glsl) pay their dot
// products per column.
//
// Layout: a workgroup owns RT = 32 weight rows and splits k among its subgroups (NSG =
// gl_NumSubgroups): round j (RK = 2 SGS elements, 64 on 32-lane subgroups) belongs to
// subgroup j % NSG. Per round a subgroup's lanes fetch and dequantize its RT x RK
// block, 4 units of 16 elements per lane (unit u: row u / PPR, elements 16 (u % PPR)
// ..), into the subgroup's own f16 tile in shared memory (As, rows of ASTR halves), then multiply it by the columns' inputs, loaded straight from the
// input buffer as B matrices (k x 16, column-major), into RT x 16 f32 accumulators
// (CM x CN matrices, specialization constants 4-6). The next round's words and inputs
// are loaded before this round's products. Only subgroup barriers order a round's
// tile: every subgroup runs the same number of rounds (one past its last does no
// products), so the workgroup's subgroups stay in step where a CPU driver runs them as
// one program. At the end each subgroup stores its accumulators into Cs and the
// workgroup sums the NSG partial results and writes them.
//
// Constant 13 (SGS): the fewest lanes a subgroup may have (lanes past SGS units idle).
// Every matrix array has a compile-time size and every loop over one a compile-time
// bound (guarded by the specialised counts), so that after specialization all indices
// are constants: arrays of matrices indexed through specialization constants measured
// ~3x slower on the H100 (kept in memory rather than registers, presumably).
// Where it runs: the batched steps' weights of the types without an int8 mat-vec
// (mvqm: Q4_0, Q8_0, Q4_K, Q6_K), which otherwise took the tiled matmul. On the H100
// (qwen3 8b q4_k_m with f32 activations, docs/BENCHMARKS.md, session 11) it runs a step
// of 8 columns in ~15 ms against ~55 ms for the tiled matmul, but mvqm's 8.9 ms where
// mvqm applies. Its time barely moves with the column count or the decode's cost:
// each round's chain (weight loads -> decode -> shared tile -> subgroup barrier ->
// products) runs unhidden; a ring of tiles or no shared tile would be next.
// Bindings: 0: the piece's raw blocks, 1: the f16 inputs (uvec4 = 8 halves), 2: y (f32),
// 3: step values ([0] columns).
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_EXT_control_flow_attributes : enable

layout(constant_id = 0) const uint WG = 128u;
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#if MVC_FIXED16
// mvcf_*: the shape and subgroup size as compile-time constants (16 x 16 x 16, 32
// lanes: NVIDIA's), so that the SPIR-V itself has constant array sizes and loop bounds.
const uint CM = 16u;
const uint CN = 16u;
const uint CK = 16u;
const uint SGS = 32u;
#else
layout(constant_id = 4) const uint CM = 16u;
layout(constant_id = 5) const uint CN = 16u;
layout(constant_id = 6) const uint CK = 16u;
layout(constant_id = 13) const uint SGS = 32u;
#endif

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
layout(std430, binding = 0) readonly buffer Wbuf4 { uvec4 w4[]; };
layout(std430, binding = 1) readonly buffer Hbuf { uvec4 xh4[]; };
layout(std430, binding = 2) buffer Ybuf { float y[]; };
layout(std430, binding = 3) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint k;        // elements per weight row (a multiple of 64)
    uint rows;     // rows in this piece
    uint y_offset; // element of a column's y row that the piece's row 0 writes
    uint ld_y;     // elements between columns in y
    uint flags;    // MVC_ADD, MVC_SOFTCAP
    float cap;
} p;

const uint MVC_ADD = 1u;
const uint MVC_SOFTCAP = 2u;
// Profiling switches (CALDERA_VK_MVC_DEBUG; wrong results): skip the products, the
// input loads, the decode into shared memory, the weight loads.
const uint MVC_NO_MMA = 4u;
const uint MVC_NO_B = 8u;
const uint MVC_NO_STAGE = 16u;
const uint MVC_NO_FETCH = 32u;

#include "words.glsl"
#include "deq_tile.glsl"

const uint TN = 16u;           // columns (tokens) of the output tile
const uint RT = 32u;           // weight rows per workgroup
const uint UPL = 4u;           // 16-element units per lane and round
const uint RK = 2u * SGS;      // elements per round: RT x RK = UPL units per lane
const uint PPR = RK / 16u;     // units per row and round
const uint NU = RT * PPR;
const uint NWM = RT / CM;
const uint NWN = TN / CN;
const uint NKK = RK / CK;
// Compile-time bounds of the matrix arrays (the host keeps NWM * NWN and NKK * NWN
// within them), so that every index is a constant once the loops unroll.
#if MVC_FIXED16
const uint MAXACC = NWM * NWN;
const uint MAXB = NKK * NWN;
#else
const uint MAXACC = 8u;
const uint MAXB = 8u;
#endif
const uint ASTR = RK + 8u;     // halves per tile row (padding against bank conflicts)
const uint ASTR4 = ASTR / 8u;  // uvec4s per tile row
const uint TILE4 = RT * ASTR4; // uvec4s per subgroup tile

// Per subgroup its tile, which also holds its RT x TN f32 partial sums at the end.
const uint REG4 = TILE4 > RT * TN / 4u ? TILE4 : RT * TN / 4u;
shared uvec4 As4[(WG / SGS) * REG4];

// One unit's 16 weights as halves, each group of 4 in the order 0, 2, 1, 3 (words
// (v0, v2), (v1, v3)): Q4_K and Q6_K turn 4-bit / 6-bit values into halves two at a
// time (or-ing them into the mantissa of 1024.0, then one f16x2 subtraction and
// multiply-add per pair); the other types through deq_tile.glsl's decode16.
#if defined(TYPE_Q4_K)
void stage16(uint r[16], uint sb, uint h, out uvec4 t[2]) {
    uint g = sb & 7u;
    vec2 dm = unpackHalf2x16(r[8]);
    uint sc;
    uint mn;
    scale_min(r, g, sc, mn);
    f16vec2 d2 = f16vec2(float16_t(dm.x * float(sc)));
    f16vec2 m2 = f16vec2(float16_t(-dm.y * float(mn)));
    f16vec2 k2 = f16vec2(float16_t(1024.0));
    uint shift = 4u * (g & 1u);
    uint w[8];
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = (r[j] >> shift) & 0x0f0f0f0fu;
        f16vec2 a = unpackFloat2x16(q & 0x000f000fu | 0x64006400u) - k2;
        f16vec2 b = unpackFloat2x16((q >> 8) & 0x000f000fu | 0x64006400u) - k2;
        w[2u * j] = packFloat2x16(fma(a, d2, m2));
        w[2u * j + 1u] = packFloat2x16(fma(b, d2, m2));
    }
    t[0] = uvec4(w[0], w[1], w[2], w[3]);
    t[1] = uvec4(w[4], w[5], w[6], w[7]);
}
#elif defined(TYPE_Q6_K)
void stage16(uint r[16], uint sb, uint h, out uvec4 t[2]) {
    uint c = sb & 3u;
    uint shift = 4u * (c >> 1);
    f16vec2 s2 = f16vec2(float16_t(unpackHalf2x16(r[8]).x * float(bitfieldExtract(int(r[9]), 0, 8))));
    f16vec2 k2 = f16vec2(float16_t(1056.0));
    uint w[8];
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = ((r[j] >> shift) & 0x0f0f0f0fu) | (((r[4u + j] >> (2u * c)) & 0x03030303u) << 4);
        f16vec2 a = unpackFloat2x16(q & 0x00ff00ffu | 0x64006400u) - k2;
        f16vec2 b = unpackFloat2x16((q >> 8) & 0x00ff00ffu | 0x64006400u) - k2;
        w[2u * j] = packFloat2x16(a * s2);
        w[2u * j + 1u] = packFloat2x16(b * s2);
    }
    t[0] = uvec4(w[0], w[1], w[2], w[3]);
    t[1] = uvec4(w[4], w[5], w[6], w[7]);
}
#else
void stage16(uint r[16], uint sb, uint h, out uvec4 t[2]) {
    float v[16];
    decode16(r, sb, h, v);
    [[unroll]] for (uint q = 0u; q < 2u; q++) {
        uint o = 8u * q;
        t[q] = uvec4(packHalf2x16(vec2(v[o], v[o + 2u])), packHalf2x16(vec2(v[o + 1u], v[o + 3u])),
                     packHalf2x16(vec2(v[o + 4u], v[o + 6u])), packHalf2x16(vec2(v[o + 5u], v[o + 7u])));
    }
}
#endif

// The raw words of this lane's units in round `rd` (zeros past the rows).
void fetch_units(uint rd, bool ok, uint row0, uint lane, uint sgsz, out uint wr[UPL][16]) {
    [[unroll]] for (uint i = 0u; i < UPL; i++) {
        [[unroll]] for (uint e = 0u; e < 16u; e++) {
            wr[i][e] = 0u;
        }
        uint u = lane + i * sgsz;
        uint row = row0 + u / PPR;
        if (ok && u < NU && row < p.rows && (p.flags & MVC_NO_FETCH) == 0u) {
            uint c = rd * RK + 16u * (u % PPR);
            fetch16(row, c / 32u, (c / 16u) & 1u, wr[i]);
        }
    }
}

void load_b(uint rd, uint nwn, inout coopmat<float16_t, gl_ScopeSubgroup, CK, CN, gl_MatrixUseB> b[MAXB]) {
    [[unroll]] for (uint i = 0u; i < MAXB; i++) {
        uint kk = i / NWN;
        uint j = i % NWN;
        if (i < NKK * NWN && j < nwn) {
            coopMatLoad(b[i], xh4, ((j * CN) * p.k + rd * RK + kk * CK) / 8u, p.k / 8u,
                        gl_CooperativeMatrixLayoutColumnMajor);
        }
    }
}

void main() {
    uint grp = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint row0 = grp * RT;
    uint live = min(step[0], TN);
    if (row0 >= p.rows || live == 0u) {
        return; // uniform for the workgroup
    }
    uint sg = gl_SubgroupID;
    uint nsg = gl_NumSubgroups;
    uint lane = gl_SubgroupInvocationID;
    uint sgsz = gl_SubgroupSize;
    uint nround = p.k / RK;
    uint nrd = (nround + nsg - 1u) / nsg; // rounds per subgroup, the same for all
    uint tile = sg * REG4;
    // Column tiles holding live columns (uniform).
    uint nwn = min(NWN, (live + CN - 1u) / CN);

    coopmat<float, gl_ScopeSubgroup, CM, CN, gl_MatrixUseAccumulator> acc[MAXACC];
    [[unroll]] for (uint i = 0u; i < MAXACC; i++) {
        acc[i] = coopmat<float, gl_ScopeSubgroup, CM, CN, gl_MatrixUseAccumulator>(0.0);
    }
    coopmat<float16_t, gl_ScopeSubgroup, CK, CN, gl_MatrixUseB> bx[MAXB];
    coopmat<float16_t, gl_ScopeSubgroup, CK, CN, gl_MatrixUseB> bn[MAXB];

    uint wr[UPL][16];
    bool do_b = (p.flags & MVC_NO_B) == 0u;
    bool do_mma = (p.flags & MVC_NO_MMA) == 0u;
    bool do_stage = (p.flags & MVC_NO_STAGE) == 0u;
    fetch_units(sg, sg < nround, row0, lane, sgsz, wr);
    if (sg < nround && do_b) {
        load_b(sg, nwn, bx);
    }
    for (uint t = 0u; t < nrd; t++) {
        uint rd = t * nsg + sg;
        bool ok = rd < nround;
        // This round's tile: dequantized, as halves, into the subgroup's rows.
        [[unroll]] for (uint i = 0u; i < UPL; i++) {
            uint u = lane + i * sgsz;
            if (u < NU && do_stage) {
                uint c = rd * RK + 16u * (u % PPR);
                uint at = tile + (u / PPR) * ASTR4 + 2u * (u % PPR);
                uvec4 t[2];
                stage16(wr[i], c / 32u, (c / 16u) & 1u, t);
                As4[at] = t[0];
                As4[at + 1u] = t[1];
            }
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        // The next round's words and inputs, in flight during this round's products.
        uint nx = rd + nsg;
        bool nok = nx < nround;
        fetch_units(nx, nok, row0, lane, sgsz, wr);
        if (nok && do_b) {
            load_b(nx, nwn, bn);
        }
        if (ok && do_mma) {
            [[unroll]] for (uint kk = 0u; kk < MAXB; kk++) {
                if (kk < NKK) {
                    [[unroll]] for (uint i = 0u; i < MAXACC; i++) {
                        if (i < NWM) {
                            coopmat<float16_t, gl_ScopeSubgroup, CM, CK, gl_MatrixUseA> a;
                            coopMatLoad(a, As4, tile + (i * CM) * ASTR4 + (kk * CK) / 8u, ASTR4,
                                        gl_CooperativeMatrixLayoutRowMajor);
                            [[unroll]] for (uint j = 0u; j < 2u; j++) {
                                if (j < NWN && j < nwn) {
                                    acc[i * NWN + j] =
                                        coopMatMulAdd(a, bx[kk * NWN + j], acc[i * NWN + j]);
                                }
                            }
                        }
                    }
                }
            }
        }
        [[unroll]] for (uint i = 0u; i < MAXB; i++) {
            bx[i] = bn[i];
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();
    }

    // Each subgroup's partial sums into its own region (element (r, c) at c * RT + r,
    // as f32 bits; its last round ended with a subgroup barrier), then their sum.
    [[unroll]] for (uint i = 0u; i < MAXACC; i++) {
        if (i < NWM * NWN) {
            uint im = i / NWN;
            uint j = i % NWN;
            coopMatStore(acc[i], As4, tile + ((j * CN) * RT + im * CM) / 4u, RT / 4u,
                         gl_CooperativeMatrixLayoutColumnMajor);
        }
    }
    barrier();
    for (uint e = gl_LocalInvocationID.x; e < RT * TN; e += WG) {
        uint r = e % RT;
        uint c = e / RT;
        if (c < live && row0 + r < p.rows) {
            float s = 0.0;
            for (uint g = 0u; g < nsg; g++) {
                s += uintBitsToFloat(As4[g * REG4 + e / 4u][e % 4u]);
            }
            if ((p.flags & MVC_SOFTCAP) != 0u) {
                s = p.cap * tanh(s / p.cap);
            }
            uint yi = c * p.ld_y + p.y_offset + row0 + r;
            if ((p.flags & MVC_ADD) != 0u) {
                s += y[yi];
            }
            y[yi] = s;
        }
    }
}
