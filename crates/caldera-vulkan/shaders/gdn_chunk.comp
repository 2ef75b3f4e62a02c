#version 450
// GatedDeltaNet prefill, part 2 of 3: the delta rule over the m = step[0] tokens of a
// step in chunks of CH = 64, in the chunked (WY) form of caldera-cpu's `delta_chunked`.
// With G_t the running sum of the log-decays g inside a chunk and S0 the state entering
// it (every exponent below is <= 0):
//   u_t = beta_t (v_t - e^{G_t} S0ᵀk_t) - Σ_{j<t} beta_t e^{G_t-G_j} (k_t·k_j) u_j,
//   o_t = e^{G_t} S0ᵀq_t + Σ_{j<=t} e^{G_t-G_j} (q_t·k_j) u_j,
//   S   = e^{G_L} S0 + Σ_j e^{G_L-G_j} k_j u_jᵀ.
// Workgroup (j, t): value head j, value columns t * WG .. (t + 1) * WG, one invocation
// per column, through every chunk (it alone owns those columns of S). The chunk's dot
// products k·k and q·k are computed once per workgroup into shared memory (cell (x, y):
// k_x·k_y below the diagonal, q_y·k_x on and above it), over dk in slices of SL.
// q and k are L2-normed (q also scaled by 1/sqrt(dk)) through per-token factors.
// Binding 0: proj rows (f32, [m][ld]: b, a at conv_dim + n_v dv as gdn_decode reads
// them), 1: constants (gdn_decode's), 2: xc (f32, [m][conv_dim], conv_rows' output),
// 3: S ([n_v][dk][dv]), 4: out (f32, [m][n_v dv], o before the gated norm), 5: u
// (f32 scratch, [m][n_v dv]), 6: step values.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) readonly buffer Xc { float xc[]; };
layout(std430, binding = 3) buffer Ssm { float ssm[]; };
layout(std430, binding = 4) buffer Out { float o[]; };
layout(std430, binding = 5) buffer Ubuf { float u[]; };
layout(std430, binding = 6) readonly buffer Sbuf { uint step[]; };

#include "act.glsl"
#include "recurrent.glsl"

const uint F_TILED = 1u;
const uint F_FUSED_BA = 2u;
const uint CH = 64u;
const uint SL = 16u;
const float L2_EPS = 1e-6;

layout(push_constant) uniform Push {
    uint n_k;
    uint n_v;
    uint dk;
    uint dv;
    uint kern;
    uint flags;
    uint ld;
    uint n_tiles;
    uint max_t; // rows the buffers hold (step[0] beyond it is clamped)
} p;

shared float m_s[CH * CH];
shared float q_sl[CH * SL];
shared float k_sl[CH * SL];
shared float iq_s[CH];
shared float ik_s[CH];
shared float beta_s[CH];
shared float g_s[CH];
shared float w_s[CH];

void main() {
    uint grp = flat_group();
    uint j = grp / p.n_tiles;
    if (j >= p.n_v) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint col = (grp % p.n_tiles) * WG + tid;
    bool act = col < p.dv;
    uint nv = p.n_v;
    uint r = nv / p.n_k;
    uint kh = (p.flags & F_TILED) != 0u ? j % p.n_k : j / r;
    uint kd = p.n_k * p.dk;
    uint cd = 2u * kd + nv * p.dv;
    uint vd = nv * p.dv;
    uint pb = cd * (p.kern + 1u);
    uint m = min(step[0], p.max_t);
    uint sb = j * p.dk * p.dv + col;
    float qscale = inversesqrt(float(p.dk));

    for (uint t0 = 0u; t0 < m; t0 += CH) {
        uint l = min(CH, m - t0);
        // Per token: the norms of q and k, beta and g.
        for (uint t = tid; t < l; t += WG) {
            uint row = (t0 + t) * cd;
            float sq = 0.0;
            float sk = 0.0;
            for (uint d = 0u; d < p.dk; d++) {
                float qv = xc[row + kh * p.dk + d];
                float kv = xc[row + kd + kh * p.dk + d];
                sq += qv * qv;
                sk += kv * kv;
            }
            iq_s[t] = inversesqrt(sq + L2_EPS) * qscale;
            ik_s[t] = inversesqrt(sk + L2_EPS);
            uint gb = (t0 + t) * p.ld + cd + vd;
            float bv;
            float av;
            if ((p.flags & F_FUSED_BA) != 0u) {
                uint base = gb + (j / r) * 2u * r + j % r;
                bv = proj[base];
                av = proj[base + r];
            } else {
                bv = proj[gb + j];
                av = proj[gb + nv + j];
            }
            beta_s[t] = sigmoid(bv);
            g_s[t] = par[pb + nv + j] * softplus(av + par[pb + j]);
        }
        for (uint i = tid; i < l * l; i += WG) {
            m_s[(i / l) * CH + i % l] = 0.0;
        }
        barrier();
        if (tid == 0u) {
            float acc = 0.0;
            for (uint t = 0u; t < l; t++) {
                acc += g_s[t];
                g_s[t] = acc;
            }
        }
        // The chunk's k·k and q·k, SL dimensions at a time.
        for (uint d0 = 0u; d0 < p.dk; d0 += SL) {
            for (uint i = tid; i < l * SL; i += WG) {
                uint t = i / SL;
                uint d = d0 + i % SL;
                uint row = (t0 + t) * cd + kh * p.dk + d;
                q_sl[i] = d < p.dk ? xc[row] : 0.0;
                k_sl[i] = d < p.dk ? xc[row + kd] : 0.0;
            }
            barrier();
            for (uint i = tid; i < l * l; i += WG) {
                uint x = i / l;
                uint y = i % l;
                float a = 0.0;
                [[unroll]] for (uint d = 0u; d < SL; d++) {
                    a += k_sl[x * SL + d] * (y < x ? k_sl[y * SL + d] : q_sl[y * SL + d]);
                }
                m_s[x * CH + y] += a;
            }
            barrier();
        }
        // Cells become the coefficients: beta_x e^{G_x-G_y} (k_x·k_y) below the
        // diagonal, e^{G_y-G_x} (q_y·k_x) on and above it.
        for (uint i = tid; i < l * l; i += WG) {
            uint x = i / l;
            uint y = i % l;
            float f = y < x ? beta_s[x] * exp(g_s[x] - g_s[y]) * ik_s[x] * ik_s[y]
                            : exp(g_s[y] - g_s[x]) * iq_s[y] * ik_s[x];
            m_s[x * CH + y] *= f;
        }
        for (uint t = tid; t < l; t += WG) {
            w_s[t] = exp(g_s[l - 1u] - g_s[t]) * ik_s[t];
        }
        barrier();

        if (act) {
            // u_t and o_t from the state entering the chunk.
            for (uint t = 0u; t < l; t++) {
                uint row = (t0 + t) * cd;
                float sk = 0.0;
                float sq = 0.0;
                for (uint a = 0u; a < p.dk; a++) {
                    float s = ssm[sb + a * p.dv];
                    sk += s * xc[row + kd + kh * p.dk + a];
                    sq += s * xc[row + kh * p.dk + a];
                }
                float eg = exp(g_s[t]);
                float v = xc[row + 2u * kd + j * p.dv + col];
                uint at = (t0 + t) * vd + j * p.dv + col;
                u[at] = beta_s[t] * (v - eg * sk * ik_s[t]);
                o[at] = eg * sq * iq_s[t];
            }
            // Forward substitution of the unit lower-triangular system.
            uint ub = t0 * vd + j * p.dv + col;
            for (uint t = 1u; t < l; t++) {
                float ut = u[ub + t * vd];
                for (uint y = 0u; y < t; y++) {
                    ut -= m_s[t * CH + y] * u[ub + y * vd];
                }
                u[ub + t * vd] = ut;
            }
            for (uint t = 0u; t < l; t++) {
                float ot = o[ub + t * vd];
                for (uint x = 0u; x <= t; x++) {
                    ot += m_s[x * CH + t] * u[ub + x * vd];
                }
                o[ub + t * vd] = ot;
            }
            // The state leaving the chunk.
            float el = exp(g_s[l - 1u]);
            for (uint a = 0u; a < p.dk; a++) {
                float s = el * ssm[sb + a * p.dv];
                for (uint t = 0u; t < l; t++) {
                    s += w_s[t] * xc[(t0 + t) * cd + kd + kh * p.dk + a] * u[ub + t * vd];
                }
                ssm[sb + a * p.dv] = s;
            }
        }
        barrier();
    }
}
