// Tiled matmul over the tokens of one prefill step: for every token t of the step and
// every row r of one weight piece, y[t * ld_y + y_offset + r] (=, or +=) dot(W row r, x_t),
// with x_t token t's input after the same prologue as mm.glsl:
//   plain:   x_t = x[t] * gam, times 1 / rms(x[t]) when MM_NORM
//   MM_GLU_*: x_t[c] = act(x[t][2c]) * x[t][2c + 1] (gate, up pairs of one row)
// A workgroup computes a tile of BM weight rows x BN tokens. For each step of BK = 32
// elements it dequantizes the BM x 32 weight block once into shared memory (deq_tile.glsl,
// one half group per invocation) and stages the BN x 32 inputs beside it, both
// transposed (element-major) so an invocation reads its rows and tokens as vec4s; each
// invocation accumulates TM x TN = 8 x 4 outputs in f32 registers. Each step's loads are
// issued together (fetch) before any is used (decode); fetching the next step during
// the current one's arithmetic measured slower on the H100 (registers). The including
// .comp defines the weight type (TYPE_*).
//
// Launch: MMT_WG invocations; workgroup (flat index f of a 2D dispatch) covers token
// tile f % ttiles and row tile f / ttiles, so consecutive workgroups share weight rows
// (read from memory once) while the step's few MB of x stay in cache.
// Bindings as mm.glsl: 0 weight words, 1 x, 2 y, 3 gam, 4 step values.
#include "mmt_io.glsl"

// Element c of rows m..m+3 (As) / tokens n..n+3 (Bs) at [c * (BM or BN) / 4 + m / 4].
shared vec4 As[BK * BM / 4];
shared vec4 Bs[BK * BN / 4];
// MM_NORM: each invocation's sum of squares of its token's inputs, then 1 / rms per token.
shared float ss_s[MMT_WG];
shared float inv_s[BN];

#ifdef MMT_EXPERT
float glu_act(float g, float u) {
    return glu_of(g, u, (p.flags & MMX_CLAMP) != 0u, (p.flags & MMX_GELU) != 0u, p.limit, p.alpha);
}
#endif

void main() {
    uint group = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
#ifdef MMT_EXPERT
    uint slot = group / p.rtiles;
    uint row0 = (group % p.rtiles) * BM;
    if (slot >= p.max_tiles || slot >= mxg[0]) {
        return; // uniform for the workgroup: no tile here this step
    }
    uint pstart = mxg[1u + 2u * slot];
    uint tword = mxg[2u + 2u * slot];
    uint expert = tword & 0xffffu;
    uint ntile = tword >> 16;
    if (expert < p.e0 || expert - p.e0 >= p.ne || row0 >= p.rows) {
        return; // the expert lives in another piece
    }
    uint wrow0 = (expert - p.e0) * p.rows;
    uint tt = 0u;
#else
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
#endif
    uint tid = gl_LocalInvocationID.x;
    bool glu = (p.flags & (MM_GLU_SILU | MM_GLU_GELU)) != 0u;
    bool gelu = (p.flags & MM_GLU_GELU) != 0u;

    // Weight loader: row am of the tile, half group ah (adjacent invocations take
    // adjacent rows, so the transposed stores hit distinct banks).
    uint am = tid % BM;
    uint ah = tid / BM;
    bool arow_ok = row0 + am < p.rows;
    // Input loader: token bn of the tile, elements 8 bq .. 8 bq + 8 of each step.
    uint bn = tid % BN;
    uint bq = tid / BN;
    bool btok_ok = bn < ntile;
#ifdef MMT_EXPERT
    uint xb = btok_ok ? (mxg[p.pairs_at + pstart + bn] / p.x_div) * p.ld_x : 0u;
#else
    uint xb = (t0 + tt * BN + bn) * p.ld_x;
#endif
    // Outputs: rows 4 tm + i and 64 + 4 tm + i, tokens 4 tn + j. 32 adjacent
    // invocations take 8 tm x 4 tn, so each of their shared reads is one 128-byte
    // wavefront; subgroups past the step's last token skip the arithmetic.
    uint tm = tid % 8u + 8u * ((tid / 32u) % 2u);
    uint tn = (tid / 8u) % 4u + 4u * (tid / 64u);
    bool vec_x = (p.ld_x % 8u) == 0u && (p.k % 8u) == 0u;
    bool busy = tn * 4u < ntile;

    vec4 acc0[4];
    vec4 acc1[4];
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        acc0[j] = vec4(0.0);
        acc1[j] = vec4(0.0);
    }
    float ss = 0.0;
    uint nsub = (p.k + BK - 1u) / BK;
    // The raw words of this invocation's weight half group and inputs of step `sb`:
    // xr holds 8 x and 8 gam values, or 8 (gate, up) pairs.
    uint wr[16];
    float xr[16];
    for (uint sb = 0u; sb < nsub; sb++) {
#ifdef MMT_EXPERT
        fetch_step(wrow0 + row0 + am, sb, ah, arow_ok, xb, sb * BK + 8u * bq, btok_ok, glu, vec_x, wr, xr);
#else
        fetch_step(row0 + am, sb, ah, arow_ok, xb, sb * BK + 8u * bq, btok_ok, glu, vec_x, wr, xr);
#endif
        float v[16];
        decode16(wr, sb, ah, v);
        [[unroll]] for (uint e = 0u; e < 16u; e++) {
            As[(16u * ah + e) * (BM / 4u) + am / 4u][am % 4u] = arow_ok ? v[e] : 0.0;
        }
        [[unroll]] for (uint e = 0u; e < 8u; e++) {
            Bs[(8u * bq + e) * (BN / 4u) + bn / 4u][bn % 4u] = input_value(xr, e, glu, gelu, ss);
        }
        barrier();
        if (busy) {
            [[unroll]] for (uint kk = 0u; kk < BK; kk++) {
                vec4 a0 = As[kk * (BM / 4u) + tm];
                vec4 a1 = As[kk * (BM / 4u) + 16u + tm];
                vec4 b = Bs[kk * (BN / 4u) + tn];
                acc0[0] += a0 * b.x;
                acc0[1] += a0 * b.y;
                acc0[2] += a0 * b.z;
                acc0[3] += a0 * b.w;
                acc1[0] += a1 * b.x;
                acc1[1] += a1 * b.y;
                acc1[2] += a1 * b.z;
                acc1[3] += a1 * b.w;
            }
        }
        barrier();
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
    if (!busy) {
        return;
    }
#ifdef MMT_EXPERT
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint tl = 4u * tn + j;
        if (tl >= ntile) {
            break;
        }
        float inv = (p.flags & MM_NORM) != 0u ? inv_s[tl] : 1.0;
        uint q = mxg[p.pairs_at + pstart + tl];
        uint yb = q * p.ld_y;
        uint bb = expert * p.rows + row0;
        bool bias = (p.flags & MMX_BIAS) != 0u;
        if ((p.flags & MMX_GLU) != 0u) {
            // Rows r, r + 1 (r even) of this invocation are one output's (gate, up).
            [[unroll]] for (uint i = 0u; i < 8u; i += 2u) {
                uint r = (i < 4u ? 4u * tm + i : 64u + 4u * tm + i - 4u);
                if (row0 + r + 1u < p.rows) {
                    float gv = (i < 4u ? acc0[j][i] : acc1[j][i - 4u]) * inv;
                    float uv = (i < 4u ? acc0[j][i + 1u] : acc1[j][i - 3u]) * inv;
                    if (bias) {
                        gv += ebias[bb + r];
                        uv += ebias[bb + r + 1u];
                    }
                    y[yb + (row0 + r) / 2u] = glu_act(gv, uv);
                }
            }
        } else {
            float wt = (p.flags & MMX_WEIGHT) != 0u
                ? wts[(q / p.n_used) * p.pt + p.slot0 + q % p.n_used] : 1.0;
            [[unroll]] for (uint i = 0u; i < 8u; i++) {
                uint r = (i < 4u ? 4u * tm + i : 64u + 4u * tm + i - 4u);
                if (row0 + r < p.rows) {
                    float s = (i < 4u ? acc0[j][i] : acc1[j][i - 4u]) * inv;
                    if (bias) {
                        s += ebias[bb + r];
                    }
                    if ((p.flags & MMX_RELU2) != 0u) {
                        s = max(s, 0.0);
                        s *= s;
                    }
                    y[yb + row0 + r] = wt * s;
                }
            }
        }
    }
#else
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint tl = 4u * tn + j;
        if (tl >= ntile) {
            break;
        }
        float inv = (p.flags & MM_NORM) != 0u ? inv_s[tl] : 1.0;
        uint yb = (tt * BN + tl) * p.ld_y + p.y_offset + row0;
        [[unroll]] for (uint i = 0u; i < 8u; i++) {
            uint r = (i < 4u ? 4u * tm + i : 64u + 4u * tm + i - 4u);
            if (row0 + r < p.rows) {
                float s = (i < 4u ? acc0[j][i] : acc1[j][i - 4u]) * inv;
                if ((p.flags & MM_SOFTCAP) != 0u) {
                    s = p.cap * tanh(s / p.cap);
                }
                if ((p.flags & MM_ADD) != 0u) {
                    s += y[yb + r];
                }
                y[yb + r] = s;
            }
        }
    }
#endif
}
