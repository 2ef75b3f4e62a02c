#version 450
// Decode attention for one token at position pos = step[1], one workgroup per query
// head h (kv head g = h / (n_heads / n_kv)): q/k RMSNorm and RoPE of the token's q and
// k rows, the KV-cache write of its k and v (by the first head of each group), then
// attention over positions [lo, pos] of the f32 caches in tiles of TILE with an online
// softmax (the token's own k and v come from shared memory, not the cache the same
// dispatch writes). With F_Q8 the head's output is also quantized to int8 blocks of 32
// for the o-projection (quant_x.comp's format), so no separate quantize pass runs.
// Scores: with subgroups, each subgroup takes one position at a time, its lanes
// splitting the head dims (coalesced k rows); without, one invocation per position.
// Binding 0: qkv (f32: q | k | v of the token), 1: k cache, 2: v cache ([pos][kv][hd]),
// 3: out (f32, n_heads * hd), 4: step values ([1] position), 5: q norm, 6: k norm,
// 7: RoPE table ((cos, sin) of pair i at position p at 2 (p * n_rot / 2 + i)),
// 8: q8 values (u32), 9: q8 scales (f32).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Qkv { float qkv[]; };
layout(std430, binding = 1) buffer Kc { float kc[]; };
layout(std430, binding = 2) buffer Vc { float vc[]; };
layout(std430, binding = 3) writeonly buffer Out { float o[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 5) readonly buffer Qn { float qn[]; };
layout(std430, binding = 6) readonly buffer Kn { float kn[]; };
layout(std430, binding = 7) readonly buffer Rope { float rope[]; };
layout(std430, binding = 8) writeonly buffer Q8 { uint xq[]; };
layout(std430, binding = 9) writeonly buffer D8 { float xd[]; };

const uint F_QNORM = 1u;
const uint F_KNORM = 2u;
const uint F_ROPE = 4u;
const uint F_INTERLEAVED = 8u;
const uint F_Q8 = 16u;
const uint MAX_HD = 512u;
const uint TILE = 1024u;

layout(push_constant) uniform Push {
    uint n_heads;
    uint n_kv;
    uint hd;
    uint n_rot;
    uint flags;
    uint ld_qkv;
    uint window; // 0: none; else keys at positions > pos - window
    float eps;
    float scale;
    float softcap; // 0: none
} p;

shared float q_s[MAX_HD];
shared float k_s[MAX_HD];
shared float v_s[MAX_HD];
shared float acc_s[MAX_HD];
shared float sc[TILE];
shared float red_max[WG];

float reduce_max(float v) {
    uint t = gl_LocalInvocationID.x;
    red_max[t] = v;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (t < s) {
            red_max[t] = max(red_max[t], red_max[t + s]);
        }
        barrier();
    }
    float r = red_max[0];
    barrier();
    return r;
}

// RMSNorm (when `norm`) and RoPE of the hd values in buf (shared), in place.
void norm_rope(bool norm, bool is_q, uint pos) {
    uint tid = gl_LocalInvocationID.x;
    if (norm) {
        float ss = 0.0;
        for (uint i = tid; i < p.hd; i += WG) {
            float v = is_q ? q_s[i] : k_s[i];
            ss += v * v;
        }
        ss = reduce_sum(ss);
        float inv = inversesqrt(ss / float(p.hd) + p.eps);
        for (uint i = tid; i < p.hd; i += WG) {
            if (is_q) {
                q_s[i] = q_s[i] * inv * qn[i];
            } else {
                k_s[i] = k_s[i] * inv * kn[i];
            }
        }
        barrier();
    }
    if ((p.flags & F_ROPE) != 0u) {
        uint half_rot = p.n_rot / 2u;
        bool il = (p.flags & F_INTERLEAVED) != 0u;
        for (uint i = tid; i < half_rot; i += WG) {
            uint a = il ? 2u * i : i;
            uint b = il ? 2u * i + 1u : i + half_rot;
            uint r = 2u * (pos * half_rot + i);
            float c = rope[r];
            float s = rope[r + 1u];
            if (is_q) {
                float x0 = q_s[a];
                float x1 = q_s[b];
                q_s[a] = x0 * c - x1 * s;
                q_s[b] = x0 * s + x1 * c;
            } else {
                float x0 = k_s[a];
                float x1 = k_s[b];
                k_s[a] = x0 * c - x1 * s;
                k_s[b] = x0 * s + x1 * c;
            }
        }
        barrier();
    }
}

void main() {
    uint h = flat_group();
    if (h >= p.n_heads) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint gsize = p.n_heads / p.n_kv;
    uint g = h / gsize;
    uint pos = step[1];
    uint kvd = p.n_kv * p.hd;
    uint qb = h * p.hd;
    uint kb = p.n_heads * p.hd + g * p.hd;
    uint vb = kb + kvd;
    for (uint i = tid; i < p.hd; i += WG) {
        q_s[i] = qkv[qb + i];
        k_s[i] = qkv[kb + i];
        v_s[i] = qkv[vb + i];
        acc_s[i] = 0.0;
    }
    barrier();
    norm_rope((p.flags & F_QNORM) != 0u, true, pos);
    norm_rope((p.flags & F_KNORM) != 0u, false, pos);
    if (h % gsize == 0u) {
        uint dst = pos * kvd + g * p.hd;
        for (uint i = tid; i < p.hd; i += WG) {
            kc[dst + i] = k_s[i];
            vc[dst + i] = v_s[i];
        }
    }
    uint lo = (p.window > 0u && pos + 1u > p.window) ? pos + 1u - p.window : 0u;
    float m = -1e30;
    float l = 0.0;
    for (uint base = lo; base <= pos; base += TILE) {
        uint n = min(TILE, pos + 1u - base);
#if USE_SUBGROUP
        for (uint i = gl_SubgroupID; i < n; i += gl_NumSubgroups) {
            uint pi = base + i;
            uint rb = pi * kvd + g * p.hd;
            float part = 0.0;
            for (uint d = gl_SubgroupInvocationID; d < p.hd; d += gl_SubgroupSize) {
                float kv = pi == pos ? k_s[d] : kc[rb + d];
                part += q_s[d] * kv;
            }
            float s = subgroupAdd(part) * p.scale;
            if (p.softcap > 0.0) {
                s = p.softcap * tanh(s / p.softcap);
            }
            if (subgroupElect()) {
                sc[i] = s;
            }
        }
#else
        for (uint i = tid; i < n; i += WG) {
            uint pi = base + i;
            uint rb = pi * kvd + g * p.hd;
            float s = 0.0;
            for (uint d = 0u; d < p.hd; d++) {
                float kv = pi == pos ? k_s[d] : kc[rb + d];
                s += q_s[d] * kv;
            }
            s *= p.scale;
            if (p.softcap > 0.0) {
                s = p.softcap * tanh(s / p.softcap);
            }
            sc[i] = s;
        }
#endif
        barrier();
        float mt = -1e30;
        for (uint i = tid; i < n; i += WG) {
            mt = max(mt, sc[i]);
        }
        float m_new = max(m, reduce_max(mt));
        float corr = exp(m - m_new);
        float part = 0.0;
        for (uint i = tid; i < n; i += WG) {
            float e = exp(sc[i] - m_new);
            sc[i] = e;
            part += e;
        }
        l = l * corr + reduce_sum(part);
        for (uint d = tid; d < p.hd; d += WG) {
            float a = acc_s[d] * corr;
            uint rb = base * kvd + g * p.hd + d;
            for (uint i = 0u; i < n; i++) {
                float vv = base + i == pos ? v_s[d] : vc[rb + i * kvd];
                a += sc[i] * vv;
            }
            acc_s[d] = a;
        }
        m = m_new;
        barrier();
    }
    float inv_l = 1.0 / l;
    for (uint d = tid; d < p.hd; d += WG) {
        float v = acc_s[d] * inv_l;
        acc_s[d] = v;
        o[qb + d] = v;
    }
    if ((p.flags & F_Q8) != 0u) {
        barrier();
        // One invocation per block of 32 of this head's output (hd is a multiple of 32).
        for (uint bk = tid; bk < p.hd / 32u; bk += WG) {
            float amax = 0.0;
            for (uint i = 0u; i < 32u; i++) {
                amax = max(amax, abs(acc_s[32u * bk + i]));
            }
            float id = amax > 0.0 ? 127.0 / amax : 0.0;
            for (uint wi = 0u; wi < 8u; wi++) {
                uint word = 0u;
                for (uint c = 0u; c < 4u; c++) {
                    int q = clamp(int(roundEven(acc_s[32u * bk + 4u * wi + c] * id)), -127, 127);
                    word |= (uint(q) & 255u) << (8u * c);
                }
                xq[(qb >> 2) + 8u * bk + wi] = word;
            }
            xd[(qb >> 5) + bk] = amax / 127.0;
        }
    }
}
