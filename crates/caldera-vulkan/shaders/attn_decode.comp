#version 450
// Decode attention for one token at position pos = step[1], split over positions
// ("flash decoding"): workgroup (g, c, s) takes query heads c * hpw .. of kv head g
// (grouped-query heads share each k/v read) and positions lo + s * split .. of the
// window [lo, pos]. It norms and rotates those q heads (RMSNorm + RoPE); the split
// holding pos also norms and rotates the token's k, uses its k and v from shared memory
// and writes them to the caches (c == 0). Scores and values go through an online
// softmax per head into partials (m, l, acc[hd]); the last split to finish (an atomic
// count per (g, c), reset by that split) combines them into the output, and with F_Q8
// also quantizes it to int8 blocks of 32 for the o-projection (quant_x.comp's format).
// With F_QGATE (Qwen3.5's gated attention) the output is multiplied by sigmoid(gate),
// the gates of the n_heads query heads following v in qkv: q | k | v | gate.
// With F_VNORM (Gemma 4) the token's v is RMS-normalized (no weights) before it is used
// and cached. With F_NOKV (a layer reading another layer's cache, Gemma 4 KV sharing)
// qkv holds only q and the token's k / v are already in the caches: nothing is written.
// With F_SINKS (gpt-oss) each query head's learned logit sinks[h] joins the softmax's
// denominator (no value). Heads of up to 512: the host keeps hpw * hd <= Q_CAP.
// Splits past the window exit at once: the dispatch covers the longest context. Bits
// 16-23 of flags (merge_from) switch a chunked dispatch to one chunk per kv head once
// that many splits are in use (see main).
// Binding 0: qkv (f32: q | k | v (| gate) of the token), 1: k cache, 2: v cache ([pos][kv][hd]),
// 3: out (f32, n_heads * hd), 4: step values ([1] position), 5: q norm, 6: k norm,
// 7: RoPE table ((cos, sin) of pair i at position p at 2 (p * n_rot / 2 + i)),
// 8: q8 values (u32), 9: q8 scales, 10: partials (f32, [head][split][2 + hd]),
// 11: counts (u32 per (g, c), zero between dispatches), 12: sinks (f32 per query head),
// 13: the page table (u32, kv.glsl's paging; a workgroup looks its split's pages up once).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Qkv { float qkv[]; };
#define KV_TABLE_BINDING 13
#include "kv.glsl"
layout(std430, binding = 3) writeonly buffer Out { float o[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 5) readonly buffer Qn { float qn[]; };
layout(std430, binding = 6) readonly buffer Kn { float kn[]; };
layout(std430, binding = 7) readonly buffer Rope { float rope[]; };
layout(std430, binding = 8) writeonly buffer Q8 { uint xq[]; };
layout(std430, binding = 9) writeonly buffer D8 { float xd[]; };
layout(std430, binding = 10) coherent buffer Part { float part[]; };
layout(std430, binding = 11) coherent buffer Cnt { uint cnt[]; };
layout(std430, binding = 12) readonly buffer Sinks { float sinks[]; };

const uint F_QNORM = 1u;
const uint F_KNORM = 2u;
const uint F_ROPE = 4u;
const uint F_INTERLEAVED = 8u;
const uint F_Q8 = 16u;
const uint F_QGATE = 32u;
const uint F_VNORM = 64u;
const uint F_NOKV = 128u;
const uint F_SINKS = 1024u; // (bits 8-9: the profiling stop)
const uint MAX_HD = 512u;
const uint Q_CAP = 2048u; // hpw * hd
const uint MAXG = 8u;
const uint MAX_SPLIT = 128u;

layout(push_constant) uniform Push {
    uint n_heads;
    uint n_kv;
    uint hd;
    uint n_rot;
    uint flags;
    uint ld_qkv;
    uint window; // 0: none; else keys at positions > pos - window
    uint hpw;    // query heads per workgroup (<= MAXG)
    uint n_chunks; // ceil(group size / hpw)
    uint max_splits;
    uint split;  // positions per workgroup (<= MAX_SPLIT)
    float eps;
    float scale;
    float softcap; // 0: none
} p;

shared float q_s[Q_CAP];
shared float k_s[MAX_HD];
shared float sc[MAXG * MAX_SPLIT];
// A tile of k (then v) rows, each padded by one float so that invocations reading
// consecutive rows hit different banks: TILE / (hd + 1) positions (32 at hd = 128).
const uint TILE = 4224u;
shared float kv_s[TILE];
shared float inv_s[MAXG + 1u];
// Combine: every split's m and l (then its weight) per head, up to MAX_COMBINE splits,
// in the k/v tile's space (free by then): cm at CM, cl at CL. Everything here fits
// 32 KiB of shared memory.
const uint MAX_COMBINE = 128u;
const uint CM = 0u;
const uint CL = MAXG * MAX_COMBINE;
// Before the first tile, the k/v tile's space holds the q norm weights (at QN), the k
// norm weights (at KN) and this position's RoPE (cos, sin) pairs (at RP), loaded in the
// same pass as q and k.
const uint QN = 0u;
const uint KN = MAX_HD;
const uint RP = 2u * MAX_HD;
shared float m_s[MAXG];
shared float l_s[MAXG];
shared bool last_s;
// The pages of this workgroup's positions (a split of at most MAX_SPLIT positions spans
// at most MAX_SPLIT / KV_PAGE + 1 pages), looked up once in the prologue: the tiles' loads
// find their rows here, not in the page table.
const uint MAX_PAGES = MAX_SPLIT / 16u + 1u;
shared uint pg_s[MAX_PAGES];
uint PG0 = 0u; // the page index of pg_s[0]
// 1 / rms of the token's v (F_VNORM), else 1.
shared float vinv_s;

// RMSNorm and RoPE of the nh query rows in q_s and, with own_k, the token's k row in
// k_s, all rows at once (row nh is k), from the weights and the (cos, sin) pairs staged
// in kv_s (QN, KN, RP).
void norm_rope_all(uint nh, bool own_k) {
    uint tid = gl_LocalInvocationID.x;
    bool q_norm = (p.flags & F_QNORM) != 0u;
    bool k_norm = own_k && (p.flags & F_KNORM) != 0u;
    uint rows = nh + (own_k ? 1u : 0u);
    if (q_norm || k_norm) {
        // G invocations per row sum its squares in strides, then one adds their sums.
        uint G = WG / rows;
        uint h = tid / G;
        float ss = 0.0;
        if (h < rows) {
            for (uint i = tid % G; i < p.hd; i += G) {
                float v = h == nh ? k_s[i] : q_s[h * p.hd + i];
                ss += v * v;
            }
        }
        red_buf[tid] = ss;
        barrier();
        if (tid < rows) {
            float t = 0.0;
            for (uint i = 0u; i < G; i++) {
                t += red_buf[tid * G + i];
            }
            inv_s[tid] = inversesqrt(t / float(p.hd) + p.eps);
        }
        barrier();
        for (uint j = tid; j < rows * p.hd; j += WG) {
            uint i = j % p.hd;
            if (j < nh * p.hd) {
                if (q_norm) {
                    q_s[j] *= inv_s[j / p.hd] * kv_s[QN + i];
                }
            } else if (k_norm) {
                k_s[i] *= inv_s[nh] * kv_s[KN + i];
            }
        }
        barrier();
    }
    if ((p.flags & F_ROPE) != 0u) {
        uint half_rot = p.n_rot / 2u;
        bool il = (p.flags & F_INTERLEAVED) != 0u;
        for (uint j = tid; j < rows * half_rot; j += WG) {
            uint i = j % half_rot;
            uint h = j / half_rot;
            uint a = il ? 2u * i : i;
            uint b = il ? 2u * i + 1u : i + half_rot;
            float c = kv_s[RP + 2u * i];
            float s = kv_s[RP + 2u * i + 1u];
            if (h < nh) {
                float x0 = q_s[h * p.hd + a];
                float x1 = q_s[h * p.hd + b];
                q_s[h * p.hd + a] = x0 * c - x1 * s;
                q_s[h * p.hd + b] = x0 * s + x1 * c;
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

// The output gate of query head h at dim d: sigmoid(gate) with F_QGATE, else 1.
float out_gate(uint h, uint d) {
    if ((p.flags & F_QGATE) == 0u) {
        return 1.0;
    }
    float gt = qkv[(p.n_heads + 2u * p.n_kv) * p.hd + h * p.hd + d];
    return 1.0 / (1.0 + exp(-gt));
}

// With F_Q8: quantizes the chunk's output (nh heads in q_s; hd a multiple of 32) to int8
// blocks of 32 for the o-projection, 8 invocations per block of 4 values each (WG a
// multiple of 8). Follows a barrier.
void quantize_out(uint h0, uint nh) {
    if ((p.flags & F_Q8) == 0u) {
        return;
    }
    uint tid = gl_LocalInvocationID.x;
    uint nw = nh * p.hd / 4u;
    for (uint base = 0u; base < nw; base += WG) {
        uint wi = base + tid;
        vec4 v = vec4(0.0);
        if (wi < nw) {
            v = vec4(q_s[4u * wi], q_s[4u * wi + 1u], q_s[4u * wi + 2u], q_s[4u * wi + 3u]);
        }
        vec4 av = abs(v);
        red_buf[tid] = max(max(av.x, av.y), max(av.z, av.w));
        barrier();
        float amax = 0.0;
        uint first = tid & ~7u;
        [[unroll]] for (uint j = 0u; j < 8u; j++) {
            amax = max(amax, red_buf[first + j]);
        }
        barrier();
        if (wi < nw) {
            float id = amax > 0.0 ? 127.0 / amax : 0.0;
            ivec4 t = clamp(ivec4(roundEven(v * id)), ivec4(-127), ivec4(127));
            uvec4 u = uvec4(t) & 255u;
            xq[((h0 * p.hd) >> 2) + wi] = u.x | (u.y << 8) | (u.z << 16) | (u.w << 24);
            if ((wi & 7u) == 0u) {
                xd[((h0 * p.hd) >> 5) + wi / 8u] = amax / 127.0;
            }
        }
    }
}

// The cache row of position pi of this workgroup's split (its page from pg_s).
uint kv_row_s(uint pi) {
    return pg_s[(pi >> KV_PAGE_SHIFT) - PG0] * KV_PAGE + (pi & (KV_PAGE - 1u));
}

// Stages tn rows of the k (or v) cache from position p_first on (kv head g) in kv_s;
// the token's own row (position pos) comes from k_s / the token's raw v in qkv. 16 loads in flight per
// invocation.
void stage(bool is_v, uint p_first, uint tn, uint pos, uint kvd, uint g) {
    uint tid = gl_LocalInvocationID.x;
    uint hd4 = p.hd / 4u;
    uint total = tn * hd4;
    bool own_cached = (p.flags & F_NOKV) != 0u;
    for (uint j0 = tid; j0 < total; j0 += 16u * WG) {
        vec4 t[16];
        [[unroll]] for (uint u = 0u; u < 16u; u++) {
            uint j = j0 + u * WG;
            uint pi = p_first + j / hd4;
            uint d = 4u * (j % hd4);
            t[u] = vec4(0.0);
            if (j < total && (pi != pos || own_cached)) {
                uint e = (kv_row_s(pi) * kvd + g * p.hd + d) >> 2;
                t[u] = is_v ? v4_at(e) : k4_at(e);
            }
        }
        [[unroll]] for (uint u = 0u; u < 16u; u++) {
            uint j = j0 + u * WG;
            if (j < total) {
                uint pi = p_first + j / hd4;
                uint d = 4u * (j % hd4);
                vec4 v = t[u];
                if (pi == pos && !own_cached) {
                    uint vb = p.n_heads * p.hd + kvd + g * p.hd + d;
                    v = is_v ? vec4(qkv[vb], qkv[vb + 1u], qkv[vb + 2u], qkv[vb + 3u]) * vinv_s
                             : vec4(k_s[d], k_s[d + 1u], k_s[d + 2u], k_s[d + 3u]);
                }
                uint sb = (j / hd4) * (p.hd + 1u) + d;
                kv_s[sb] = v.x;
                kv_s[sb + 1u] = v.y;
                kv_s[sb + 2u] = v.z;
                kv_s[sb + 3u] = v.w;
            }
        }
    }
}

void main() {
    uint grp = flat_group();
    uint per_g = p.n_chunks * p.max_splits;
    uint g = grp / per_g;
    if (g >= p.n_kv) {
        return;
    }
    uint c = (grp % per_g) / p.max_splits;
    uint s = grp % p.max_splits;
    uint pos = step[1];
    uint lo = (p.window > 0u && pos + 1u > p.window) ? pos + 1u - p.window : 0u;
    // Bits 24-31 of flags (0: off): at most that many splits where longer ones fit
    // MAX_SPLIT, so that long contexts run fewer, longer splits (fewer partials to
    // combine); the dispatch is sized for p.split, the fewest positions per split.
    uint ctx = pos + 1u - lo;
    uint target = p.flags >> 24;
    uint split = p.split;
    if (target > 0u) {
        split = clamp((ctx + target - 1u) / target, p.split, MAX_SPLIT);
        split = min((split + 31u) / 32u * 32u, MAX_SPLIT);
        split = max(split, p.split);
    }
    uint n_active = (ctx + split - 1u) / split;
    if (s >= n_active) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint gsize = p.n_heads / p.n_kv;
    // From merge_from splits in use on (bits 16-23 of flags; 0: never), chunk 0 takes
    // every query head of its kv head and the other chunks exit: short contexts run
    // many small workgroups, long ones read each kv head's cache once per split. The
    // host merges only groups that fit the q tile (gsize <= MAXG, gsize * hd <= Q_CAP).
    uint merge_from = (p.flags >> 16) & 255u;
    bool merged = merge_from > 0u && n_active >= merge_from;
    if (merged && c > 0u) {
        return; // uniform for the workgroup
    }
    uint hpw = merged ? gsize : p.hpw;
    uint h0 = g * gsize + c * hpw;
    uint nh = min(hpw, gsize - c * hpw);
    uint kvd = p.n_kv * p.hd;
    uint kb = p.n_heads * p.hd + g * p.hd;
    uint p0 = lo + s * split;
    uint n = min(split, pos + 1u - p0);
    bool has_pos = p0 + n == pos + 1u;
    bool own_kv = has_pos && (p.flags & F_NOKV) == 0u;
    for (uint i = tid; i < nh * p.hd; i += WG) {
        q_s[i] = qkv[h0 * p.hd + i];
    }
    PG0 = p0 >> KV_PAGE_SHIFT;
    for (uint i = tid; i <= ((p0 + n - 1u) >> KV_PAGE_SHIFT) - PG0; i += WG) {
        pg_s[i] = kv_table[KV_TB + PG0 + i];
    }
    // The norm weights and this position's RoPE pairs come in the same pass (one
    // memory round trip for everything the prologue reads).
    bool k_norm = own_kv && (p.flags & F_KNORM) != 0u;
    for (uint i = tid; i < p.hd; i += WG) {
        if (own_kv) {
            k_s[i] = qkv[kb + i];
        }
        if ((p.flags & F_QNORM) != 0u) {
            kv_s[QN + i] = qn[i];
        }
        if (k_norm) {
            kv_s[KN + i] = kn[i];
        }
    }
    if ((p.flags & F_ROPE) != 0u) {
        uint base = pos * 2u * (p.n_rot / 2u);
        for (uint i = tid; i < p.n_rot; i += WG) {
            kv_s[RP + i] = rope[base + i];
        }
    }
    if (tid == 0u) {
        vinv_s = 1.0;
    }
    barrier();
    norm_rope_all(nh, own_kv);
    if (own_kv) {
        if ((p.flags & F_VNORM) != 0u) {
            float ss = 0.0;
            for (uint i = tid; i < p.hd; i += WG) {
                float v = qkv[kb + kvd + i];
                ss += v * v;
            }
            ss = reduce_sum(ss);
            if (tid == 0u) {
                vinv_s = inversesqrt(ss / float(p.hd) + p.eps);
            }
            barrier();
        }
        if (c == 0u) {
            uint dst = kv_row(pos) * kvd + g * p.hd;
            float vi = vinv_s;
            if (KV_TYPE == KV_Q8) {
                // A block of 32 per invocation: the k blocks, then the v blocks.
                uint nb = p.hd / 32u;
                for (uint j = tid; j < 2u * nb; j += WG) {
                    bool is_v = j >= nb;
                    uint i0 = 32u * (is_v ? j - nb : j);
                    vec4 x[8];
                    [[unroll]] for (uint u = 0u; u < 8u; u++) {
                        uint i = i0 + 4u * u;
                        uint vb = kb + kvd + i;
                        x[u] = is_v
                            ? vec4(qkv[vb], qkv[vb + 1u], qkv[vb + 2u], qkv[vb + 3u]) * vi
                            : vec4(k_s[i], k_s[i + 1u], k_s[i + 2u], k_s[i + 3u]);
                    }
                    kv_put32(is_v, dst + i0, x);
                }
            } else {
                for (uint i = 2u * tid; i < p.hd; i += 2u * WG) {
                    k_put2(dst + i, vec2(k_s[i], k_s[i + 1u]));
                    v_put2(dst + i, vec2(qkv[kb + kvd + i], qkv[kb + kvd + i + 1u]) * vi);
                }
            }
        }
    }
    // (Profiling only: bits 8.. of flags stop the kernel after a phase.)
    uint stop = (p.flags >> 8) & 3u;
    if (stop == 1u) {
        return;
    }
    // Scores, a tile of positions at a time: every invocation first stages the tile's
    // k rows in shared memory (all loads in flight together: one memory round trip per
    // tile, not one per step of a dot product), then one task per (head, position).
    uint hd4 = p.hd / 4u;
    uint T = min(n, TILE / (p.hd + 1u));
    for (uint t0 = 0u; t0 < n; t0 += T) {
        uint tn = min(T, n - t0);
        stage(false, p0 + t0, tn, pos, kvd, g);
        barrier();
        for (uint task = tid; task < tn * nh; task += WG) {
            uint i = task % tn;
            uint h = task / tn;
            uint qb = h * p.hd;
            float a = 0.0;
            for (uint d4 = 0u; d4 < hd4; d4++) {
                uint kb4 = i * (p.hd + 1u) + 4u * d4;
                uint qo = qb + 4u * d4;
                a += q_s[qo] * kv_s[kb4] + q_s[qo + 1u] * kv_s[kb4 + 1u]
                   + q_s[qo + 2u] * kv_s[kb4 + 2u] + q_s[qo + 3u] * kv_s[kb4 + 3u];
            }
            float v = a * p.scale;
            if (p.softcap > 0.0) {
                v = p.softcap * tanh(v / p.softcap);
            }
            sc[h * MAX_SPLIT + t0 + i] = v;
        }
        barrier();
    }
    // Softmax per head: G invocations per head take strided maxima (then sums), one
    // combines them.
    uint G = WG / nh;
    uint hh = tid / G;
    {
        float mx = -1e30;
        if (hh < nh) {
            for (uint i = tid % G; i < n; i += G) {
                mx = max(mx, sc[hh * MAX_SPLIT + i]);
            }
        }
        red_buf[tid] = mx;
        barrier();
        if (tid < nh) {
            float t = -1e30;
            for (uint i = 0u; i < G; i++) {
                t = max(t, red_buf[tid * G + i]);
            }
            m_s[tid] = t;
        }
        barrier();
    }
    for (uint i = tid; i < nh * MAX_SPLIT; i += WG) {
        uint h = i / MAX_SPLIT;
        if (i % MAX_SPLIT < n) {
            sc[i] = exp(sc[i] - m_s[h]);
        }
    }
    barrier();
    bool single = n_active == 1u;
    bool has_sinks = (p.flags & F_SINKS) != 0u;
    {
        float l = 0.0;
        if (hh < nh) {
            for (uint i = tid % G; i < n; i += G) {
                l += sc[hh * MAX_SPLIT + i];
            }
        }
        red_buf[tid] = l;
        barrier();
        if (tid < nh) {
            float t = 0.0;
            for (uint i = 0u; i < G; i++) {
                t += red_buf[tid * G + i];
            }
            // One split: the sink joins its sum here (exp overflowing to inf makes the
            // output 0, the limit).
            if (single && has_sinks) {
                t += exp(sinks[h0 + tid] - m_s[tid]);
            }
            l_s[tid] = t;
        }
        barrier();
    }
    uint stride = 2u + p.hd;
    // Values, a tile at a time as for k: the sums go to q_s (q is no longer needed),
    // one (head, dim) per task.
    for (uint j = tid; j < nh * p.hd; j += WG) {
        q_s[j] = 0.0;
    }
    for (uint t0 = 0u; t0 < n; t0 += T) {
        uint tn = min(T, n - t0);
        stage(true, p0 + t0, tn, pos, kvd, g);
        barrier();
        for (uint j = tid; j < nh * p.hd; j += WG) {
            uint h = j / p.hd;
            uint d = j % p.hd;
            float acc = q_s[j];
            for (uint i = 0u; i < tn; i++) {
                acc += sc[h * MAX_SPLIT + t0 + i] * kv_s[i * (p.hd + 1u) + d];
            }
            q_s[j] = acc;
        }
        barrier();
    }
    for (uint j = tid; j < nh * p.hd; j += WG) {
        uint h = j / p.hd;
        uint d = j % p.hd;
        if (single) {
            // One split: the output directly, no partials.
            float v = q_s[j] / l_s[h] * out_gate(h0 + h, d);
            q_s[j] = v;
            o[(h0 + h) * p.hd + d] = v;
        } else {
            part[((h0 + h) * p.max_splits + s) * stride + 2u + d] = q_s[j];
        }
    }
    barrier();
    if (stop == 2u) {
        return;
    }
    if (single) {
        quantize_out(h0, nh);
        return;
    }
    if (tid < nh) {
        uint pb = ((h0 + tid) * p.max_splits + s) * stride;
        part[pb] = m_s[tid];
        part[pb + 1u] = l_s[tid];
    }
    // The last split of (g, c) to get here combines every split's partials.
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) {
        uint done = atomicAdd(cnt[g * p.n_chunks + c], 1u);
        last_s = done == n_active - 1u;
        if (last_s) {
            cnt[g * p.n_chunks + c] = 0u;
        }
    }
    barrier();
    if (!last_s) {
        return; // uniform for the workgroup
    }
    memoryBarrierBuffer();
    if (n_active <= MAX_COMBINE) {
        // Every (head, split) m and l at once, then per-split weights, then the sums.
        for (uint j = tid; j < nh * n_active; j += WG) {
            uint pb = ((h0 + j / n_active) * p.max_splits + j % n_active) * stride;
            kv_s[CM + j] = part[pb];
            kv_s[CL + j] = part[pb + 1u];
        }
        barrier();
        if (tid < nh) {
            float mx = -1e30;
            for (uint t = 0u; t < n_active; t++) {
                mx = max(mx, kv_s[CM + tid * n_active + t]);
            }
            float l = 0.0;
            for (uint t = 0u; t < n_active; t++) {
                l += exp(kv_s[CM + tid * n_active + t] - mx) * kv_s[CL + tid * n_active + t];
            }
            if (has_sinks) {
                l += exp(sinks[h0 + tid] - mx);
            }
            m_s[tid] = mx;
            l_s[tid] = l;
        }
        barrier();
        for (uint j = tid; j < nh * n_active; j += WG) {
            uint h = j / n_active;
            kv_s[CM + j] = exp(kv_s[CM + j] - m_s[h]) / l_s[h];
        }
        barrier();
        for (uint j = tid; j < nh * p.hd; j += WG) {
            uint h = j / p.hd;
            uint d = j % p.hd;
            uint pb = (h0 + h) * p.max_splits * stride + 2u + d;
            float acc = 0.0;
            for (uint t = 0u; t < n_active; t++) {
                acc += kv_s[CM + h * n_active + t] * part[pb + t * stride];
            }
            acc *= out_gate(h0 + h, d);
            q_s[j] = acc;
            o[(h0 + h) * p.hd + d] = acc;
        }
    } else {
        for (uint h = 0u; h < nh; h++) {
            uint hb = (h0 + h) * p.max_splits * stride;
            float mx = -1e30;
            for (uint t = 0u; t < n_active; t++) {
                mx = max(mx, part[hb + t * stride]);
            }
            float l = 0.0;
            for (uint t = 0u; t < n_active; t++) {
                l += exp(part[hb + t * stride] - mx) * part[hb + t * stride + 1u];
            }
            if (has_sinks) {
                l += exp(sinks[h0 + h] - mx);
            }
            for (uint d = tid; d < p.hd; d += WG) {
                float a = 0.0;
                for (uint t = 0u; t < n_active; t++) {
                    a += exp(part[hb + t * stride] - mx) * part[hb + t * stride + 2u + d];
                }
                float v = a / l * out_gate(h0 + h, d);
                q_s[h * p.hd + d] = v;
                o[(h0 + h) * p.hd + d] = v;
            }
        }
    }
    barrier();
    quantize_out(h0, nh);
}
