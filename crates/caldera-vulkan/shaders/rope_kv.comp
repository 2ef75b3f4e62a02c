#version 450
// Per-head q/k RMSNorm, RoPE and the KV-cache write, for every token of a step.
// One workgroup per (token t, head h): h < n_heads is a query head, rewritten in place
// in the qkv rows; h = n_heads + g is kv head g, whose k (normed, rotated) and v go to
// the caches at position step[1] + t.
// Binding 0: qkv (f32), token t at t * ld_qkv: q (n_heads * hd) | k (n_kv * hd) | v.
// Binding 1: k cache, 2: v cache ([position][kv head][hd] in f32, f16 or q8_0: kv.glsl).
// Binding 3: q norm weights (hd), 4: k norm weights (hd), used when flags say so.
// Binding 5: RoPE table (f32): (cos, sin) of pair i at position pos at 2 (pos * n_rot / 2 + i).
// Binding 6: step values (u32): [0] tokens, [1] first position.
// Binding 7: the page table (u32, kv.glsl's paging: position p at row kv_row(p)).
// F_VNORM (Gemma 4): v is RMS-normalized (no weights) before it is cached. A layer that
// reads another layer's cache (KV sharing) is dispatched with n_kv = 0: q heads only.
#include "common.glsl"

layout(std430, binding = 0) buffer Qkv { float qkv[]; };
#define KV_TABLE_BINDING 7
#include "kv.glsl"
layout(std430, binding = 3) readonly buffer Qn { float qn[]; };
layout(std430, binding = 4) readonly buffer Kn { float kn[]; };
layout(std430, binding = 5) readonly buffer Rope { float rope[]; };
layout(std430, binding = 6) readonly buffer Sbuf { uint step[]; };

const uint F_QNORM = 1u;
const uint F_KNORM = 2u;
const uint F_ROPE = 4u;
const uint F_INTERLEAVED = 8u;
const uint F_VNORM = 64u;
const uint MAX_HD = 512u;

layout(push_constant) uniform Push {
    uint n_heads;
    uint n_kv;
    uint hd;
    uint n_rot;  // rotated dimensions (even, <= hd)
    uint flags;
    uint ld_qkv;
    float eps;
} p;

shared float buf[MAX_HD];

void main() {
    uint nh = p.n_heads + p.n_kv;
    uint grp = flat_group();
    uint t = grp / nh;
    uint h = grp % nh;
    if (t >= step[0]) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint pos = step[1] + t;
    bool is_q = h < p.n_heads;
    uint g = h - p.n_heads;
    uint kvd = p.n_kv * p.hd;
    uint src = t * p.ld_qkv + (is_q ? h * p.hd : p.n_heads * p.hd + g * p.hd);
    for (uint i = tid; i < p.hd; i += WG) {
        buf[i] = qkv[src + i];
    }
    barrier();
    bool norm = (p.flags & (is_q ? F_QNORM : F_KNORM)) != 0u;
    if (norm) {
        float ss = 0.0;
        for (uint i = tid; i < p.hd; i += WG) {
            ss += buf[i] * buf[i];
        }
        ss = reduce_sum(ss);
        float inv = inversesqrt(ss / float(p.hd) + p.eps);
        for (uint i = tid; i < p.hd; i += WG) {
            buf[i] = buf[i] * inv * (is_q ? qn[i] : kn[i]);
        }
        barrier();
    }
    if ((p.flags & F_ROPE) != 0u) {
        uint half_rot = p.n_rot / 2u;
        for (uint i = tid; i < half_rot; i += WG) {
            uint a = (p.flags & F_INTERLEAVED) != 0u ? 2u * i : i;
            uint b = (p.flags & F_INTERLEAVED) != 0u ? 2u * i + 1u : i + half_rot;
            uint r = 2u * (pos * half_rot + i);
            float c = rope[r];
            float s = rope[r + 1u];
            float x0 = buf[a];
            float x1 = buf[b];
            buf[a] = x0 * c - x1 * s;
            buf[b] = x0 * s + x1 * c;
        }
        barrier();
    }
    if (is_q) {
        for (uint i = tid; i < p.hd; i += WG) {
            qkv[src + i] = buf[i];
        }
    } else {
        uint dst = kv_row(pos) * kvd + g * p.hd;
        uint vsrc = t * p.ld_qkv + p.n_heads * p.hd + kvd + g * p.hd;
        float vinv = 1.0;
        if ((p.flags & F_VNORM) != 0u) {
            float ss = 0.0;
            for (uint i = tid; i < p.hd; i += WG) {
                float v = qkv[vsrc + i];
                ss += v * v;
            }
            ss = reduce_sum(ss);
            vinv = inversesqrt(ss / float(p.hd) + p.eps);
        }
        if (KV_TYPE == KV_Q8) {
            // A block of 32 per invocation: the k blocks, then the v blocks.
            uint nb = p.hd / 32u;
            for (uint j = tid; j < 2u * nb; j += WG) {
                bool is_v = j >= nb;
                uint i0 = 32u * (is_v ? j - nb : j);
                vec4 x[8];
                [[unroll]] for (uint u = 0u; u < 8u; u++) {
                    uint i = i0 + 4u * u;
                    x[u] = is_v
                        ? vec4(qkv[vsrc + i], qkv[vsrc + i + 1u], qkv[vsrc + i + 2u], qkv[vsrc + i + 3u]) * vinv
                        : vec4(buf[i], buf[i + 1u], buf[i + 2u], buf[i + 3u]);
                }
                kv_put32(is_v, dst + i0, x);
            }
        } else {
            for (uint i = 2u * tid; i < p.hd; i += 2u * WG) {
                k_put2(dst + i, vec2(buf[i], buf[i + 1u]));
                v_put2(dst + i, vec2(qkv[vsrc + i], qkv[vsrc + i + 1u]) * vinv);
            }
        }
    }
}
