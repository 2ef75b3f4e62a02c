#version 450
// Causal (optionally windowed, soft-capped) flash attention for the tokens of a prefill
// step, over the KV cache (f32, f16 or q8_0: kv.glsl), which rope_kv has already written
// for this step, with grouped kv heads. One workgroup per (tile of bq query tokens, kv head g, chunk of hpw
// of g's query heads): its R = bq * hpw query rows (row r = token r / hpw, head
// r % hpw) sit in shared memory; keys are visited in tiles of bkv positions, each k and
// v tile staged in shared memory once for all R rows; an online softmax (running max m
// and sum l per row) rescales the f32 output accumulators, which stay in registers
// (R * hd / 4 vec4s spread over the workgroup, at most ACC per invocation).
// Binding 0: qkv rows (q part read, token t at t * ld_qkv), 1: k cache, 2: v cache
// ([pos][kv head][hd]), 3: out (token t at t * n_heads * hd), 4: step values ([0]
// tokens, [1] first position), 5: sinks (f32 per query head, read when p.sinks != 0:
// gpt-oss's learned logit joining each head's softmax denominator). hd, ld_qkv are
// multiples of 4: everything is read as vec4. 6: the page table (kv.glsl's paging: a
// tile's rows are looked up once, before the barrier that ends the tile before it).
#extension GL_EXT_control_flow_attributes : enable

const uint FA_WG = 128u;
layout(local_size_x = 128, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer Qkv { vec4 qkv[]; };
#define KV_TABLE_BINDING 6
#include "kv.glsl"
layout(std430, binding = 3) writeonly buffer Out { vec4 o[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 5) readonly buffer Sinks { float sinks[]; };

layout(push_constant) uniform Push {
    uint n_heads;
    uint n_kv;
    uint hd;
    uint hpw;      // query heads per workgroup
    uint n_chunks; // ceil(group size / hpw)
    uint window;   // 0: none; else a query at p sees keys at positions > p - window
    uint ld_qkv;
    float scale;
    float softcap; // 0: none
    uint bq;       // query tokens per workgroup
    uint bkv;      // keys per tile
    uint sinks;    // 1: sinks[] join the softmax
} p;

// Capacities (in floats) the host sizes the tiles by; rows are hd + 4 floats apart so
// that invocations reading different rows hit different banks.
const uint Q_CAP = 4352u;  // R * (hd + 4)
const uint KV_CAP = 2176u; // bkv * (hd + 4)
const uint S_CAP = 1024u;  // R * bkv
const uint MAX_R = 64u;
const uint ACC = 8u;       // R * hd / 4 <= ACC * FA_WG
const float NEG = -1e30;   // a masked score; also the running max before any key

shared vec4 q_s[Q_CAP / 4u];
shared vec4 kv_s[KV_CAP / 4u];
shared float s_s[S_CAP];
shared float m_s[MAX_R];
shared float l_s[MAX_R];
shared float c_s[MAX_R];
const uint MAX_BKV = 32u;
shared uint row_s[MAX_BKV]; // the current tile's cache rows

void main() {
    uint grp = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint per_tile = p.n_kv * p.n_chunks;
    uint tok0 = (grp / per_tile) * p.bq;
    uint nt = step[0];
    if (tok0 >= nt) {
        return; // uniform for the workgroup
    }
    uint rem = grp % per_tile;
    uint g = rem / p.n_chunks;
    uint ch = rem % p.n_chunks;
    uint gsize = p.n_heads / p.n_kv;
    uint h0 = g * gsize + ch * p.hpw;
    uint nh = min(p.hpw, gsize - ch * p.hpw);
    uint ntok = min(p.bq, nt - tok0);
    uint tid = gl_LocalInvocationID.x;
    uint hd4 = p.hd / 4u;
    uint st4 = hd4 + 1u; // row stride of q_s / kv_s in vec4s
    uint rows = p.bq * p.hpw;
    uint pos0 = step[1] + tok0;
    uint hi = pos0 + ntok - 1u; // last key any row sees
    uint lo = (p.window > 0u && pos0 + 1u > p.window) ? pos0 + 1u - p.window : 0u;
    uint kvd4 = p.n_kv * hd4;

    for (uint i = tid; i < rows * hd4; i += FA_WG) {
        uint r = i / hd4;
        uint d = i % hd4;
        uint tl = r / p.hpw;
        uint hl = r % p.hpw;
        vec4 v = vec4(0.0);
        if (tl < ntok && hl < nh) {
            v = qkv[((tok0 + tl) * p.ld_qkv) / 4u + (h0 + hl) * hd4 + d];
        }
        q_s[r * st4 + d] = v;
    }
    if (tid < rows) {
        m_s[tid] = NEG;
        l_s[tid] = 0.0;
    }
    if (tid < min(p.bkv, hi + 1u - lo)) {
        row_s[tid] = kv_row(lo + tid);
    }
    vec4 acc[ACC];
    [[unroll]] for (uint a = 0u; a < ACC; a++) {
        acc[a] = vec4(0.0);
    }
    barrier();

    for (uint kb = lo; kb <= hi; kb += p.bkv) {
        uint nk = min(p.bkv, hi + 1u - kb);
        for (uint i = tid; i < nk * hd4; i += FA_WG) {
            uint j = i / hd4;
            uint d = i % hd4;
            kv_s[j * st4 + d] = k4_at(row_s[j] * kvd4 + g * hd4 + d);
        }
        barrier();
        // Scores of every (row, key) of the tile; masked ones NEG.
        for (uint e = tid; e < rows * p.bkv; e += FA_WG) {
            uint r = e / p.bkv;
            uint j = e % p.bkv;
            uint kp = kb + j;
            uint qp = pos0 + r / p.hpw;
            float s = NEG;
            if (j < nk && kp <= qp && (p.window == 0u || kp + p.window > qp)) {
                float dot4 = 0.0;
                for (uint d = 0u; d < hd4; d++) {
                    dot4 += dot(q_s[r * st4 + d], kv_s[j * st4 + d]);
                }
                s = dot4 * p.scale;
                if (p.softcap > 0.0) {
                    s = p.softcap * tanh(s / p.softcap);
                }
            }
            s_s[e] = s;
        }
        barrier();
        // Online softmax per row: new max, rescale factor, probabilities in place.
        if (tid < rows) {
            uint b = tid * p.bkv;
            float mold = m_s[tid];
            float mx = mold;
            for (uint j = 0u; j < nk; j++) {
                mx = max(mx, s_s[b + j]);
            }
            float sum = 0.0;
            for (uint j = 0u; j < nk; j++) {
                float s = s_s[b + j];
                float pj = s > NEG ? exp(s - mx) : 0.0;
                s_s[b + j] = pj;
                sum += pj;
            }
            float c = exp(mold - mx);
            c_s[tid] = c;
            m_s[tid] = mx;
            l_s[tid] = l_s[tid] * c + sum;
        }
        // The v tile replaces the k tile (every score is computed: barrier above).
        for (uint i = tid; i < nk * hd4; i += FA_WG) {
            uint j = i / hd4;
            uint d = i % hd4;
            kv_s[j * st4 + d] = v4_at(row_s[j] * kvd4 + g * hd4 + d);
        }
        barrier();
        [[unroll]] for (uint a = 0u; a < ACC; a++) {
            uint e = tid + a * FA_WG;
            if (e < rows * hd4) {
                uint r = e / hd4;
                uint d = e % hd4;
                vec4 v = acc[a] * c_s[r];
                for (uint j = 0u; j < nk; j++) {
                    v += s_s[r * p.bkv + j] * kv_s[j * st4 + d];
                }
                acc[a] = v;
            }
        }
        // The next tile's rows (row_s is not read again in this one).
        uint next = kb + p.bkv;
        if (next <= hi && tid < min(p.bkv, hi + 1u - next)) {
            row_s[tid] = kv_row(next + tid);
        }
        barrier();
    }

    if (p.sinks != 0u && tid < rows) {
        // exp overflowing to inf gives 0, the limit.
        uint hl = tid % p.hpw;
        if (hl < nh) {
            l_s[tid] += exp(sinks[h0 + hl] - m_s[tid]);
        }
    }
    barrier();
    uint ld_o4 = p.n_heads * hd4;
    [[unroll]] for (uint a = 0u; a < ACC; a++) {
        uint e = tid + a * FA_WG;
        if (e < rows * hd4) {
            uint r = e / hd4;
            uint d = e % hd4;
            uint tl = r / p.hpw;
            uint hl = r % p.hpw;
            if (tl < ntok && hl < nh) {
                o[(tok0 + tl) * ld_o4 + (h0 + hl) * hd4 + d] = acc[a] / l_s[r];
            }
        }
    }
}
