#version 450
// Mamba2 prefill, part 2 of 3, in the chunked (SSD) form: the SSM over the m = step[0]
// tokens of a step in chunks of CH = 64, as caldera-cpu's `mamba2::ssm` with
// `SsmForm::Chunked(64)`, gated by silu(z) (mamba2_scan's output, before the group norm).
// Per token dt = max(softplus(dt + dt_bias), dt_min); inside a chunk c_t is the running
// sum of dt A and S the state entering it (every exponent below is <= 0, A < 0):
//   L[t][j] = exp(c_t - c_j) dt_j (C_t·B_j)  for j <= t, else 0,
//   y_t     = (exp(c_t) C_t·S + Σ_j L[t][j] x_j + D x_t) * silu(z_t),
//   S      <- exp(c_L) S + Σ_j exp(c_L - c_j) dt_j B_j x_jᵀ.
// Workgroup (h, i): head h, head channels i * TP .. (i + 1) * TP, which it alone updates,
// through every chunk. Per chunk, over the state in slices of SL rows staged in shared
// memory: the C·B products (invocation: key j = tid % CH, queries 32 * (tid / CH) + q,
// q < 32, in registers) and C_t·S (invocation: channel c = tid % TP, tokens TPI * r + k,
// r = tid / TP, k < TPI, in registers); then L (transposed) and the chunk's x in shared
// memory, the outputs, and the state, slice by slice (invocation: channel c, rows
// r * SL / RS ..). S lives in the state buffer between the phases (coherent: other
// invocations of the workgroup read what one wrote).
// Binding 0: proj rows (f32, [m][ld]: z | xBC | dt), 1: constants (mamba2_decode's),
// 2: xc (f32, [m][conv_dim], conv_rows' output), 3: S ([H][N][P], mamba2_decode's),
// 4: out (f32, [m][d_inner]), 5: step values.
#extension GL_EXT_control_flow_attributes : enable

const uint WGF = 128u; // invocations
layout(local_size_x = 128, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) readonly buffer Xc { float xc[]; };
layout(std430, binding = 3) coherent buffer Ssm { float ssm[]; };
layout(std430, binding = 4) writeonly buffer Out { float y[]; };
layout(std430, binding = 5) readonly buffer Sbuf { uint step[]; };

#include "act.glsl"
#include "recurrent.glsl"

layout(push_constant) uniform Push {
    uint n_h;
    uint hp;
    uint ns;
    uint n_g;
    uint n_tiles; // ceil(hp / TP)
    uint ld;
    uint max_t;   // rows the buffers hold (step[0] beyond it is clamped)
    uint pb;      // offset of dt_bias in the constants (A, D follow)
    float dt_min;
} p;

const uint CH = 64u;         // tokens per chunk
const uint TP = 32u;         // head channels per workgroup
const uint RS = WGF / TP;    // token groups (outputs) and row groups (state)
const uint TPI = CH / RS;    // tokens per invocation (outputs)
const uint QPI = CH * CH / WGF; // C·B products per invocation
const uint SL = 16u;         // state rows per slice
const uint RPI = SL / RS;    // rows of a slice per invocation (state)
const uint CS = CH + 1u;     // row stride of the [SL][CH] and [CH][CH] tiles

// [SL][CS] C rows then [SL][CS] B rows of a slice; then x of the chunk, [CH][TP].
shared float work_s[2u * SL * CS];
// L transposed: l_s[j * CS + t].
shared float l_s[CH * CS];
// exp(c_L - c_j) dt_j B_j of a slice, [CH][SL].
shared float bw_s[CH * SL];
shared float dt_s[CH];
shared float cum_s[CH];
shared float w_s[CH];

void main() {
    uint grp = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint h = grp / p.n_tiles;
    if (h >= p.n_h) {
        return; // uniform for the workgroup
    }
    uint c0 = (grp % p.n_tiles) * TP;
    uint tid = gl_LocalInvocationID.x;
    uint g = h / (p.n_h / p.n_g);
    uint di = p.n_h * p.hp;
    uint gn = p.n_g * p.ns;
    uint cd = di + 2u * gn;
    uint bo = di + g * p.ns; // B of group g in an xc row; C at bo + gn
    uint c = tid % TP;
    uint r = tid / TP;
    bool act = c0 + c < p.hp;
    uint ch = h * p.hp + c0 + c;
    uint sbase = h * p.ns * p.hp + c0 + c; // S[h][n][c0 + c] at sbase + n * hp
    uint jc = tid % CH;                    // the C·B products' key token
    uint tq = (tid / CH) * QPI;            // and their first query token
    uint tb = r * TPI;                     // the outputs' first token
    float a = par[p.pb + p.n_h + h];
    float dskip = par[p.pb + 2u * p.n_h + h];
    float dtb = par[p.pb + h];
    uint m = min(step[0], p.max_t);

    for (uint t0 = 0u; t0 < m; t0 += CH) {
        uint l = min(CH, m - t0);
        if (tid < CH) {
            dt_s[tid] = tid < l
                ? max(softplus(proj[(t0 + tid) * p.ld + di + cd + h] + dtb), p.dt_min)
                : 0.0;
        }
        barrier();
        if (tid == 0u) {
            // Tokens past l add nothing: c stays at c_{l-1}.
            float acc = 0.0;
            for (uint t = 0u; t < CH; t++) {
                acc += dt_s[t] * a;
                cum_s[t] = acc;
            }
        }

        // C·B (registers lc) and C_t·S (registers acc), slice by slice of the state.
        float lc[QPI];
        float acc[TPI];
        [[unroll]] for (uint q = 0u; q < QPI; q++) {
            lc[q] = 0.0;
        }
        [[unroll]] for (uint k = 0u; k < TPI; k++) {
            acc[k] = 0.0;
        }
        for (uint n0 = 0u; n0 < p.ns; n0 += SL) {
            for (uint i = tid; i < CH * SL; i += WGF) {
                uint d = i % SL;
                uint t = i / SL;
                bool ok = t < l && n0 + d < p.ns;
                uint at = (t0 + t) * cd + bo + n0 + d;
                work_s[d * CS + t] = ok ? xc[at + gn] : 0.0;
                work_s[(SL + d) * CS + t] = ok ? xc[at] : 0.0;
            }
            barrier();
            if (jc < tq + QPI) { // some query at or after the key
                for (uint d = 0u; d < SL; d++) {
                    float bv = work_s[(SL + d) * CS + jc];
                    [[unroll]] for (uint q = 0u; q < QPI; q++) {
                        lc[q] += work_s[d * CS + tq + q] * bv;
                    }
                }
            }
            if (act) {
                uint nd = min(SL, p.ns - n0);
                for (uint d = 0u; d < nd; d++) {
                    float s = ssm[sbase + (n0 + d) * p.hp];
                    [[unroll]] for (uint k = 0u; k < TPI; k++) {
                        acc[k] += work_s[d * CS + tb + k] * s;
                    }
                }
            }
            barrier();
        }

        // L (decayed, masked, transposed), the chunk's x, the state update's weights.
        [[unroll]] for (uint q = 0u; q < QPI; q++) {
            uint t = tq + q;
            l_s[jc * CS + t] = t >= jc ? exp(cum_s[t] - cum_s[jc]) * dt_s[jc] * lc[q] : 0.0;
        }
        for (uint i = tid; i < CH * TP; i += WGF) {
            uint j = i / TP;
            uint cc = i % TP;
            bool ok = j < l && c0 + cc < p.hp;
            work_s[i] = ok ? xc[(t0 + j) * cd + h * p.hp + c0 + cc] : 0.0;
        }
        float cl = cum_s[l - 1u];
        if (tid < CH) {
            w_s[tid] = exp(cl - cum_s[tid]) * dt_s[tid];
        }
        barrier();

        // The outputs.
        [[unroll]] for (uint k = 0u; k < TPI; k++) {
            acc[k] *= exp(cum_s[tb + k]);
        }
        for (uint j = 0u; j < tb + TPI; j++) {
            float xv = work_s[j * TP + c];
            [[unroll]] for (uint k = 0u; k < TPI; k++) {
                acc[k] += l_s[j * CS + tb + k] * xv;
            }
        }
        if (act) {
            [[unroll]] for (uint k = 0u; k < TPI; k++) {
                uint t = tb + k;
                if (t < l) {
                    float v = acc[k] + dskip * work_s[t * TP + c];
                    y[(t0 + t) * di + ch] = v * silu(proj[(t0 + t) * p.ld + ch]);
                }
            }
        }

        // The state leaving the chunk, slice by slice.
        float el = exp(cl);
        for (uint n0 = 0u; n0 < p.ns; n0 += SL) {
            for (uint i = tid; i < CH * SL; i += WGF) {
                uint j = i / SL;
                uint n = n0 + i % SL;
                bool ok = j < l && n < p.ns;
                bw_s[i] = ok ? w_s[j] * xc[(t0 + j) * cd + bo + n] : 0.0;
            }
            // Every read of S above (C_t·S) precedes every write below.
            memoryBarrierBuffer();
            barrier();
            float s[RPI];
            [[unroll]] for (uint e = 0u; e < RPI; e++) {
                s[e] = 0.0;
            }
            for (uint j = 0u; j < l; j++) {
                float xv = work_s[j * TP + c];
                [[unroll]] for (uint e = 0u; e < RPI; e++) {
                    s[e] += bw_s[j * SL + r * RPI + e] * xv;
                }
            }
            if (act) {
                [[unroll]] for (uint e = 0u; e < RPI; e++) {
                    uint n = n0 + r * RPI + e;
                    if (n < p.ns) {
                        uint at = sbase + n * p.hp;
                        ssm[at] = el * ssm[at] + s[e];
                    }
                }
            }
            // The next chunk reads S written by other invocations.
            memoryBarrierBuffer();
            barrier();
        }
    }
}
