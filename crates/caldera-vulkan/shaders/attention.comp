#version 450
// Causal (optionally windowed, soft-capped) attention for every token of a step, over
// the KV cache (f32, f16 or q8_0: kv.glsl), with grouped kv heads: one workgroup per
// (token t, kv head g, chunk of at most MAXH of g's query heads) reads each cached k/v
// row once for all its heads.
// Online softmax over blocks of WG positions (running max and sum per head).
// Binding 0: qkv rows (q part read), 1: k cache, 2: v cache ([pos][kv head][hd]),
// 3: out (f32, token t at t * n_heads * hd), 4: step values ([0] tokens, [1] position),
// 5: sinks (f32 per query head; read when p.sinks != 0: gpt-oss's learned logit that
// joins each head's softmax denominator), 6: the page table (kv.glsl's paging; each
// block's rows are looked up once, by the invocation that scores them).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Qkv { float qkv[]; };
#define KV_TABLE_BINDING 6
#include "kv.glsl"
layout(std430, binding = 3) writeonly buffer Out { float o[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 5) readonly buffer Sinks { float sinks[]; };

const uint MAXH = 8u;
const uint MAXQ = 2048u; // heads per workgroup * hd

layout(push_constant) uniform Push {
    uint n_heads;
    uint n_kv;
    uint hd;
    uint hpw;     // query heads per workgroup (<= MAXH, hpw * hd <= MAXQ)
    uint n_chunks; // ceil(group size / hpw)
    uint window;  // 0: none; else a query at p sees keys at positions > p - window
    uint ld_qkv;
    float scale;
    float softcap; // 0: none
    uint sinks;    // 1: sinks[] join the softmax
} p;

shared float q_s[MAXQ];
shared float acc_s[MAXQ];
shared float sc[MAXH * WG];
shared float m_s[MAXH];
shared float l_s[MAXH];
shared float corr_s[MAXH];
shared uint row_s[WG];

void main() {
    uint grp = flat_group();
    uint per_t = p.n_kv * p.n_chunks;
    uint t = grp / per_t;
    if (t >= step[0]) {
        return; // uniform for the workgroup
    }
    uint rem = grp % per_t;
    uint g = rem / p.n_chunks;
    uint ch = rem % p.n_chunks;
    uint gsize = p.n_heads / p.n_kv;
    uint h0 = g * gsize + ch * p.hpw;
    uint nh = min(p.hpw, gsize - ch * p.hpw);
    uint tid = gl_LocalInvocationID.x;
    uint pos = step[1] + t;
    uint lo = (p.window > 0u && pos + 1u > p.window) ? pos + 1u - p.window : 0u;
    uint kvd = p.n_kv * p.hd;
    uint qb = t * p.ld_qkv + h0 * p.hd;
    for (uint i = tid; i < nh * p.hd; i += WG) {
        q_s[i] = qkv[qb + i];
        acc_s[i] = 0.0;
    }
    if (tid < nh) {
        m_s[tid] = -1e30;
        l_s[tid] = 0.0;
    }
    barrier();
    for (uint base = lo; base <= pos; base += WG) {
        uint i = base + tid;
        float s[MAXH];
        [[unroll]] for (uint h = 0u; h < MAXH; h++) {
            s[h] = 0.0;
        }
        if (i <= pos) {
            uint row = kv_row(i);
            row_s[tid] = row;
            uint kb = row * kvd + g * p.hd;
            for (uint d = 0u; d < p.hd; d++) {
                float kv = k_at(kb + d);
                [[unroll]] for (uint h = 0u; h < MAXH; h++) {
                    if (h < nh) {
                        s[h] += q_s[h * p.hd + d] * kv;
                    }
                }
            }
        }
        [[unroll]] for (uint h = 0u; h < MAXH; h++) {
            if (h < nh) {
                float v = s[h] * p.scale;
                if (p.softcap > 0.0) {
                    v = p.softcap * tanh(v / p.softcap);
                }
                sc[h * WG + tid] = i <= pos ? v : -1e30;
            }
        }
        barrier();
        if (tid < nh) {
            float mx = m_s[tid];
            for (uint j = 0u; j < WG; j++) {
                mx = max(mx, sc[tid * WG + j]);
            }
            corr_s[tid] = exp(m_s[tid] - mx);
            m_s[tid] = mx;
        }
        barrier();
        [[unroll]] for (uint h = 0u; h < MAXH; h++) {
            if (h < nh) {
                float v = sc[h * WG + tid];
                sc[h * WG + tid] = i <= pos ? exp(v - m_s[h]) : 0.0;
            }
        }
        barrier();
        if (tid < nh) {
            float l = l_s[tid] * corr_s[tid];
            for (uint j = 0u; j < WG; j++) {
                l += sc[tid * WG + j];
            }
            l_s[tid] = l;
        }
        uint cnt = min(WG, pos + 1u - base);
        for (uint d = tid; d < p.hd; d += WG) {
            float a[MAXH];
            [[unroll]] for (uint h = 0u; h < MAXH; h++) {
                a[h] = h < nh ? acc_s[h * p.hd + d] * corr_s[h] : 0.0;
            }
            uint vb = g * p.hd + d;
            for (uint j = 0u; j < cnt; j++) {
                float vv = v_at(row_s[j] * kvd + vb);
                [[unroll]] for (uint h = 0u; h < MAXH; h++) {
                    a[h] += sc[h * WG + j] * vv;
                }
            }
            [[unroll]] for (uint h = 0u; h < MAXH; h++) {
                if (h < nh) {
                    acc_s[h * p.hd + d] = a[h];
                }
            }
        }
        barrier();
    }
    uint ob = t * p.n_heads * p.hd + h0 * p.hd;
    if (p.sinks != 0u && tid < nh) {
        // exp overflowing to inf gives 0, the limit.
        l_s[tid] += exp(sinks[h0 + tid] - m_s[tid]);
    }
    barrier();
    for (uint i = tid; i < nh * p.hd; i += WG) {
        o[ob + i] = acc_s[i] / l_s[i / p.hd];
    }
}
