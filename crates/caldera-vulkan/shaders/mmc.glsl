// The tiled prefill matmul on cooperative matrices (GL_KHR_cooperative_matrix): the
// same op, bindings, push constants, tile (BM = 128 weight rows x BN = 64 tokens, steps
// of BK = 32 elements) and dispatch as mmt.glsl, whose loads (mmt_io.glsl: fetch_step,
// deq_tile.glsl) it shares; the products run on the device's matrix units in f16 with
// f32 accumulators.
//
// Per step the workgroup dequantizes the BM x 32 weight block into As (f16, row-major:
// row m at m * BKP) and stages the BN x 32 inputs after the prologue into Bs (f16,
// token n at n * BKP; as a K x N matrix that is column-major), BKP = 40 (padding against
// bank conflicts; 80-byte rows keep 16-byte alignment); the raw words of the next step
// are loaded before or after this step's products (PREFETCH). The device's shape (CM x CN x
// CK, f16 * f16 + f32, specialization constants 4-6) tiles the workgroup's output: a
// subgroup owns a block of WM x WN accumulators (constants 7, 8; WM * WN is 4 or 8),
// block g = gl_SubgroupID at rows (g % GR) * WM * CM, tokens (g / GR) * WN * CN, GR =
// BM / (WM * CM). The host picks WM, WN so that no more blocks exist than the fewest
// subgroups the device may launch (256 / largest subgroup size); spare subgroups only
// load. After the last step each subgroup stores its accumulators one at a time into its
// own CM x CN slice of Cs (column-major: consecutive lanes take consecutive rows of a
// token, as y is laid out) and applies the epilogue from there: 1 / rms per token
// (MM_NORM, from sums of squares of the f32 inputs as mmt.glsl), softcap, residual add,
// bounds. The host guarantees blocks * CM * CN <= 2048 (WM * WN >= 4).
//
// Numerics: weights and inputs are rounded to f16 (relative error 2^-11 each, so each
// product within 2^-10 of exact), sums in f32. The input entering f16 is x * gam (the
// norm's 1 / rms is applied to the sums), or act(gate) * up: magnitudes past 65504
// overflow, as in other engines' f16 matmuls.
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require

#include "mmt_io.glsl"

layout(constant_id = 4) const uint CM = 16u;
layout(constant_id = 5) const uint CN = 16u;
layout(constant_id = 6) const uint CK = 16u;
layout(constant_id = 7) const uint WM = 2u;
layout(constant_id = 8) const uint WN = 2u;
// Constant 9: 1 issues the next step's loads before this step's products (their latency
// hidden behind the matrix units, 32 more live registers), 0 after them.
layout(constant_id = 9) const uint PREFETCH = 0u;
// Constant 10: 32-element steps staged per round (1 or 2): two halve the rounds, so
// half as many load latencies and barrier pairs are exposed, for twice the shared
// memory (36 KiB in all) and 32 more live registers.
layout(constant_id = 10) const uint KS = 1u;
const uint GR = BM / (WM * CM); // subgroup blocks along the rows
const uint BLOCKS = GR * (BN / (WN * CN));

const uint BKR = BK * KS; // elements per round
const uint BKP = BKR + 8u;
shared float16_t As[BM * BKP];
shared float16_t Bs[BN * BKP];
// Each subgroup's CM x CN staging slice for the epilogue.
shared float Cs[2048];
// MM_NORM: each invocation's sum of squares of its token's inputs, then 1 / rms per token.
shared float ss_s[MMT_WG];
shared float inv_s[BN];

// Dequantizes one step's weights into As and stages its inputs (after the prologue)
// into Bs, at column `off` of the round; returns the sum of squares of the raw inputs
// (MM_NORM). `arow_ok` false stores zero weights.
float stage(uint wr[16], float xr[16], uint sb, uint off, uint am, uint ah, bool arow_ok,
            uint bn, uint bq, bool glu, bool gelu) {
    float v[16];
    decode16(wr, sb, ah, v);
    [[unroll]] for (uint e = 0u; e < 16u; e++) {
        As[am * BKP + off + 16u * ah + e] = float16_t(arow_ok ? v[e] : 0.0);
    }
    float ss = 0.0;
    [[unroll]] for (uint e = 0u; e < 8u; e++) {
        Bs[bn * BKP + off + 8u * bq + e] = float16_t(input_value(xr, e, glu, gelu, ss));
    }
    return ss;
}

// fetch_step for step sb when it exists (sb < nsub), else zeros.
void fetch_round2(uint sb, uint nsub, uint row, uint ah, bool arow_ok, uint xb, uint bq,
                  bool btok_ok, bool glu, bool vec_x, out uint wr[16], out float xr[16]) {
    if (sb < nsub) {
        fetch_step(row, sb, ah, arow_ok, xb, sb * BK + 8u * bq, btok_ok, glu, vec_x, wr, xr);
    } else {
        [[unroll]] for (uint e = 0u; e < 16u; e++) {
            wr[e] = 0u;
            xr[e] = 0.0;
        }
    }
}

void main() {
    uint group = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint tt = group % p.ttiles;
    uint row0 = (group / p.ttiles) * BM;
    uint t0 = 0u;
    uint nt = step[0];
    if ((p.flags & MM_TOKSEL) != 0u) {
        t0 = step[2];
        nt = step[3];
    }
    if (tt * BN >= nt || row0 >= p.rows) {
        return; // uniform for the workgroup
    }
    uint ntile = min(BN, nt - tt * BN);
    uint tid = gl_LocalInvocationID.x;
    bool glu = (p.flags & (MM_GLU_SILU | MM_GLU_GELU)) != 0u;
    bool gelu = (p.flags & MM_GLU_GELU) != 0u;

    // Loaders as mmt.glsl: weight row am, half group ah; token bn, elements 8 bq ...
    uint am = tid % BM;
    uint ah = tid / BM;
    bool arow_ok = row0 + am < p.rows;
    uint bn = tid % BN;
    uint bq = tid / BN;
    bool btok_ok = bn < ntile;
    uint xb = (t0 + tt * BN + bn) * p.ld_x;
    bool vec_x = (p.ld_x % 8u) == 0u && (p.k % 8u) == 0u;

    // This subgroup's block of accumulators; blocks past the step's tokens skip the
    // arithmetic (uniform for the subgroup).
    uint sg = gl_SubgroupID;
    uint sr = (sg % GR) * WM * CM;
    uint sc = (sg / GR) * WN * CN;
    bool busy = sg < BLOCKS && sc < ntile;

    coopmat<float, gl_ScopeSubgroup, CM, CN, gl_MatrixUseAccumulator> acc[8];
    [[unroll]] for (uint i = 0u; i < WM * WN; i++) {
        acc[i] = coopmat<float, gl_ScopeSubgroup, CM, CN, gl_MatrixUseAccumulator>(0.0);
    }
    float ss = 0.0;
    uint nsub = (p.k + BK - 1u) / BK;
    uint nround = (nsub + KS - 1u) / KS;
    // The raw words and inputs of the round's steps (the second only with KS = 2).
    uint wr[16];
    float xr[16];
    uint wr2[16];
    float xr2[16];
    fetch_step(row0 + am, 0u, ah, arow_ok, xb, 8u * bq, btok_ok, glu, vec_x, wr, xr);
    if (KS > 1u) {
        fetch_round2(1u, nsub, row0 + am, ah, arow_ok, xb, bq, btok_ok, glu, vec_x, wr2, xr2);
    }
    for (uint rd = 0u; rd < nround; rd++) {
        uint sb = rd * KS;
        ss += stage(wr, xr, sb, 0u, am, ah, arow_ok, bn, bq, glu, gelu);
        if (KS > 1u) {
            // Past the last step: zeros (its words were not read).
            ss += stage(wr2, xr2, sb + 1u, BK, am, ah, arow_ok && sb + 1u < nsub, bn, bq, glu, gelu);
        }
        barrier();
        uint nb = sb + KS;
        if (PREFETCH != 0u && nb < nsub) {
            fetch_step(row0 + am, nb, ah, arow_ok, xb, nb * BK + 8u * bq, btok_ok, glu, vec_x, wr, xr);
            if (KS > 1u) {
                fetch_round2(nb + 1u, nsub, row0 + am, ah, arow_ok, xb, bq, btok_ok, glu, vec_x, wr2, xr2);
            }
        }
        if (busy) {
            [[unroll]] for (uint kk = 0u; kk < BKR; kk += CK) {
                coopmat<float16_t, gl_ScopeSubgroup, CM, CK, gl_MatrixUseA> a[4];
                coopmat<float16_t, gl_ScopeSubgroup, CK, CN, gl_MatrixUseB> b[4];
                [[unroll]] for (uint i = 0u; i < WM; i++) {
                    coopMatLoad(a[i], As, (sr + i * CM) * BKP + kk, BKP,
                                gl_CooperativeMatrixLayoutRowMajor);
                }
                [[unroll]] for (uint j = 0u; j < WN; j++) {
                    coopMatLoad(b[j], Bs, (sc + j * CN) * BKP + kk, BKP,
                                gl_CooperativeMatrixLayoutColumnMajor);
                }
                [[unroll]] for (uint i = 0u; i < WM; i++) {
                    [[unroll]] for (uint j = 0u; j < WN; j++) {
                        acc[i * WN + j] = coopMatMulAdd(a[i], b[j], acc[i * WN + j]);
                    }
                }
            }
        }
        barrier();
        if (PREFETCH == 0u && nb < nsub) {
            fetch_step(row0 + am, nb, ah, arow_ok, xb, nb * BK + 8u * bq, btok_ok, glu, vec_x, wr, xr);
            if (KS > 1u) {
                fetch_round2(nb + 1u, nsub, row0 + am, ah, arow_ok, xb, bq, btok_ok, glu, vec_x, wr2, xr2);
            }
        }
    }

    if ((p.flags & MM_NORM) != 0u) {
        ss_s[tid] = ss;
        barrier();
        if (tid < BN) {
            float s = ss_s[tid] + ss_s[tid + BN] + ss_s[tid + 2u * BN] + ss_s[tid + 3u * BN];
            inv_s[tid] = inversesqrt(s / float(p.k) + p.eps);
        }
        barrier();
    }
    // Workgroup barriers, not subgroup ones: idle subgroups stay to the end (a CPU
    // driver runs a workgroup's subgroups as one program, and its subgroup barrier
    // waited for the ones that had left).
    uint cs = sg * CM * CN;
    [[unroll]] for (uint i = 0u; i < WM; i++) {
        [[unroll]] for (uint j = 0u; j < WN; j++) {
            if (busy) {
                coopMatStore(acc[i * WN + j], Cs, cs, CM, gl_CooperativeMatrixLayoutColumnMajor);
            }
            barrier();
            if (busy) {
                for (uint e = gl_SubgroupInvocationID; e < CM * CN; e += gl_SubgroupSize) {
                    uint r = sr + i * CM + e % CM;
                    uint tl = sc + j * CN + e / CM;
                    if (tl < ntile && row0 + r < p.rows) {
                        float s = Cs[cs + e];
                        if ((p.flags & MM_NORM) != 0u) {
                            s *= inv_s[tl];
                        }
                        if ((p.flags & MM_SOFTCAP) != 0u) {
                            s = p.cap * tanh(s / p.cap);
                        }
                        uint yi = (tt * BN + tl) * p.ld_y + p.y_offset + row0 + r;
                        if ((p.flags & MM_ADD) != 0u) {
                            s += y[yi];
                        }
                        y[yi] = s;
                    }
                }
            }
            barrier();
        }
    }
}
