// Batched mat-vec over the tokens of one step: for every token t of the step and every
// row r of one weight piece, y[t * ld_y + y_offset + r] (=, or +=) dot(W row r, x_t),
// where x_t is token t's input after an optional prologue:
//   mm_*:  x_t = x[t] * gam, times 1 / rms(x[t]) when MM_NORM (the input norm folded
//          into the mat-vec; gam is all ones for a plain mat-vec)
//   mmg_* (MM_GLU): x_t[c] = act(x[t][2c]) * x[t][2c + 1]   (gate, up pairs of one
//          row, as the interleaved gate/up weight writes them; the activation of a
//          gated MLP folded into its down projection)
// One token takes a plain mat-vec path; more are done TM at a time. The including .comp defines the weight
// type (TYPE_*) before including this file; deq.glsl decodes 32 elements at a time.
//
// Binding 0: the piece's raw blocks (row r at byte r * row_bytes), read as 32-bit words.
// Binding 1: x (f32), token t at element t * ld_x. Binding 2: y (f32).
// Binding 3: gam (f32, k values; unused by mmg_*).
// Binding 4: step values (u32): [0] tokens m, [1] first position, [2] first token whose
//            logits are wanted, [3] how many (MM_TOKSEL reads tokens [2] .. [2] + [3]).
// Specialization constant 1: ROWS, weight rows per workgroup.
#include "common.glsl"

#ifndef MM_GLU
#define MM_GLU 0
#endif

layout(constant_id = 1) const uint ROWS = 1;
const uint TM = 8;

const uint MM_NORM = 1u;
const uint MM_ADD = 2u;
const uint MM_GLU_SILU = 4u;
const uint MM_GLU_GELU = 8u;
const uint MM_SOFTCAP = 16u;
const uint MM_TOKSEL = 32u;

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
layout(std430, binding = 1) readonly buffer Xbuf { float x[]; };
layout(std430, binding = 2) buffer Ybuf { float y[]; };
layout(std430, binding = 3) readonly buffer Gbuf { float gam[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint k;        // elements per weight row
    uint rows;     // rows in this piece
    uint y_offset; // element of a token's y row that the piece's row 0 writes
    uint ld_x;     // elements between tokens in x
    uint ld_y;     // elements between tokens in y
    uint flags;    // MM_* bits
    float eps;     // MM_NORM epsilon
    float cap;     // MM_SOFTCAP: y = cap * tanh(y / cap)
} p;

#include "words.glsl"
#include "act.glsl"

// Input element c (< k) of the token whose x row starts at xb. `gam` is all ones when
// the mat-vec has no norm (the norm's 1/rms is applied to the sum). Branch-free: CPU
// drivers (lavapipe) evaluate both sides of a branch here.
float xin(uint xb, uint c) {
#if MM_GLU
    float g = x[xb + 2u * c];
    float a = (p.flags & MM_GLU_GELU) != 0u ? gelu_tanh(g) : silu(g);
    return a * x[xb + 2u * c + 1u];
#else
    return x[xb + c] * gam[c];
#endif
}

#include "deq.glsl"

shared float red_tm[TM * WG];

// Sums each of a[0..TM] over the workgroup (every invocation gets the sums). Must be
// reached by the whole workgroup.
void reduce_tm(inout float a[TM]) {
#if USE_SUBGROUP
    [[unroll]] for (uint j = 0u; j < TM; j++) {
        a[j] = subgroupAdd(a[j]);
    }
    if (subgroupElect()) {
        [[unroll]] for (uint j = 0u; j < TM; j++) {
            red_tm[j * WG + gl_SubgroupID] = a[j];
        }
    }
    barrier();
    [[unroll]] for (uint j = 0u; j < TM; j++) {
        float s = 0.0;
        for (uint i = 0u; i < gl_NumSubgroups; i++) {
            s += red_tm[j * WG + i];
        }
        a[j] = s;
    }
    barrier();
#else
    uint t = gl_LocalInvocationID.x;
    [[unroll]] for (uint j = 0u; j < TM; j++) {
        red_tm[j * WG + t] = a[j];
    }
    barrier();
    for (uint h = WG / 2u; h > 0u; h >>= 1) {
        if (t < h) {
            [[unroll]] for (uint j = 0u; j < TM; j++) {
                red_tm[j * WG + t] += red_tm[j * WG + t + h];
            }
        }
        barrier();
    }
    [[unroll]] for (uint j = 0u; j < TM; j++) {
        a[j] = red_tm[j * WG];
    }
    barrier();
#endif
}

// Writes token j's (relative to the first output token) sum for `row`.
void store(uint j, uint row, float s) {
    if ((p.flags & MM_SOFTCAP) != 0u) {
        s = p.cap * tanh(s / p.cap);
    }
    uint yi = j * p.ld_y + p.y_offset + row;
    if ((p.flags & MM_ADD) != 0u) {
        s += y[yi];
    }
    y[yi] = s;
}

// 1 / rms of token row xb (when MM_NORM), reached by the whole workgroup.
float norm_scale(uint xb) {
    if ((p.flags & MM_NORM) == 0u) {
        return 1.0;
    }
    float ss = 0.0;
    for (uint i = gl_LocalInvocationID.x; i < p.k; i += WG) {
        float v = x[xb + i];
        ss += v * v;
    }
    ss = reduce_sum(ss);
    return inversesqrt(ss / float(p.k) + p.eps);
}

#if defined(TYPE_F32) && !MM_GLU
layout(std430, binding = 0) readonly buffer Wbuf4 { vec4 w4[]; };
layout(std430, binding = 1) readonly buffer Xbuf4 { vec4 x4[]; };
layout(std430, binding = 3) readonly buffer Gbuf4 { vec4 gam4[]; };
const uint TF = 16u;
// 2 .. TF tokens over f32 weights (k and ld_x multiples of 4): a batched decode step's
// f32 rows, such as a MoE router's 128. Each invocation loads its vec4s of the row once
// and meets every token's x with them, summing the tokens' squares from the same loads
// (first row only), so a row costs one pass and one reduction per TM tokens instead of
// a norm pass per token and a dot32 (32 loads of one invocation) per sub-block and token.
void rows_f32(uint group, uint t0, uint nt) {
    uint tid = gl_LocalInvocationID.x;
    uint k4 = p.k / 4u;
    uint ld4 = p.ld_x / 4u;
    bool norm = (p.flags & MM_NORM) != 0u;
    float inv[TF];
    [[unroll]] for (uint j = 0u; j < TF; j++) {
        inv[j] = 1.0;
    }
    for (uint r = 0u; r < ROWS; r++) {
        uint row = group * ROWS + r;
        if (row >= p.rows) {
            break; // uniform for the workgroup
        }
        float acc[TF];
        float ss[TF];
        [[unroll]] for (uint j = 0u; j < TF; j++) {
            acc[j] = 0.0;
            ss[j] = 0.0;
        }
        for (uint c = tid; c < k4; c += WG) {
            vec4 wv = w4[row * k4 + c] * gam4[c];
            [[unroll]] for (uint j = 0u; j < TF; j++) {
                if (j < nt) {
                    vec4 xv = x4[(t0 + j) * ld4 + c];
                    acc[j] += dot(wv, xv);
                    ss[j] += dot(xv, xv);
                }
            }
        }
        [[unroll]] for (uint h = 0u; h < TF / TM; h++) {
            if (h * TM < nt) { // uniform for the workgroup
                float a[TM];
                if (r == 0u && norm) {
                    [[unroll]] for (uint j = 0u; j < TM; j++) {
                        a[j] = ss[h * TM + j];
                    }
                    reduce_tm(a);
                    [[unroll]] for (uint j = 0u; j < TM; j++) {
                        inv[h * TM + j] = inversesqrt(a[j] / float(p.k) + p.eps);
                    }
                }
                [[unroll]] for (uint j = 0u; j < TM; j++) {
                    a[j] = acc[h * TM + j];
                }
                reduce_tm(a);
                if (tid == 0u) {
                    [[unroll]] for (uint j = 0u; j < TM; j++) {
                        if (h * TM + j < nt) {
                            store(h * TM + j, row, a[j] * inv[h * TM + j]);
                        }
                    }
                }
            }
        }
    }
}
#endif

void main() {
    uint group = flat_group();
    uint tid = gl_LocalInvocationID.x;
    uint t0 = 0u;
    uint nt = step[0];
    if ((p.flags & MM_TOKSEL) != 0u) {
        t0 = step[2];
        nt = step[3];
    }
#if defined(TYPE_F32) && !MM_GLU
    if (nt > 1u && nt <= TF && p.k % 4u == 0u && p.ld_x % 4u == 0u) {
        rows_f32(group, t0, nt);
        return;
    }
#endif
    uint nsub = (p.k + 31u) / 32u;
    if (nt == 1u) {
        // One token (decode): a plain mat-vec.
        uint xb = t0 * p.ld_x;
        float inv = norm_scale(xb);
        for (uint r = 0u; r < ROWS; r++) {
            uint row = group * ROWS + r;
            if (row >= p.rows) {
                break; // uniform for the workgroup
            }
            float acc = 0.0;
            for (uint sb = tid; sb < nsub; sb += WG) {
                acc += dot32(row, sb, xb);
            }
            acc = reduce_sum(acc);
            if (tid == 0u) {
                store(0u, row, acc * inv);
            }
        }
        return;
    }
    for (uint tt = 0u; tt < nt; tt += TM) {
        uint nj = min(TM, nt - tt);
        float inv[TM];
        for (uint j = 0u; j < TM; j++) {
            inv[j] = j < nj ? norm_scale((t0 + tt + j) * p.ld_x) : 1.0;
        }
        for (uint r = 0u; r < ROWS; r++) {
            uint row = group * ROWS + r;
            if (row >= p.rows) {
                break; // uniform for the workgroup
            }
            float acc[TM];
            [[unroll]] for (uint j = 0u; j < TM; j++) {
                acc[j] = 0.0;
            }
            for (uint sb = tid; sb < nsub; sb += WG) {
                // The block is decoded once per token: its bytes come from cache after
                // the first.
                for (uint j = 0u; j < nj; j++) {
                    acc[j] += dot32(row, sb, (t0 + tt + j) * p.ld_x);
                }
            }
            reduce_tm(acc);
            if (tid == 0u) {
                for (uint j = 0u; j < nj; j++) {
                    store(tt + j, row, acc[j] * inv[j]);
                }
            }
        }
    }
}
