// The body of attn_dec.comp (one sequence, BATCH 0) and attn_dec_batch.comp (BATCH 1:
// each column of a batched decode step, see there); the design is described in
// attn_dec.comp.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Qkv { float qkv[]; };
// The page table (kv.glsl's paging): the binding after the last.
#if BATCH
#define KV_TABLE_BINDING 10
#else
#define KV_TABLE_BINDING 13
#endif
#include "kv.glsl"
layout(std430, binding = 3) writeonly buffer Out { vec4 o4[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };
layout(std430, binding = 5) readonly buffer Qn { float qn[]; };
layout(std430, binding = 6) readonly buffer Kn { float kn[]; };
layout(std430, binding = 7) readonly buffer Rope { float rope[]; };
#if BATCH
layout(std430, binding = 8) coherent buffer Part { float part[]; };
layout(std430, binding = 8) coherent buffer Part4 { vec4 part4[]; };
layout(std430, binding = 8) coherent buffer Part2 { vec2 part2[]; };
layout(std430, binding = 9) coherent buffer Cnt { uint cnt[]; };
#else
layout(std430, binding = 8) writeonly buffer Q8 { uint xq[]; };
layout(std430, binding = 9) writeonly buffer D8 { float xd[]; };
layout(std430, binding = 10) coherent buffer Part { float part[]; };
layout(std430, binding = 10) coherent buffer Part4 { vec4 part4[]; };
layout(std430, binding = 10) coherent buffer Part2 { vec2 part2[]; };
layout(std430, binding = 11) coherent buffer Cnt { uint cnt[]; };
layout(std430, binding = 12) readonly buffer Sinks { float sinks[]; };
#endif

const uint F_QNORM = 1u;
const uint F_KNORM = 2u;
const uint F_ROPE = 4u;
const uint F_INTERLEAVED = 8u;
const uint F_Q8 = 16u;
const uint F_QGATE = 32u;
const uint F_VNORM = 64u;
const uint F_NOKV = 128u;
const uint F_SINKS = 1024u; // (bits 8-9: the profiling stop)
const uint Q_CAP = 2048u;   // hpw * hd
const uint MAXH = 8u;
const float NEG = -1e30;

layout(push_constant) uniform Push {
    uint n_heads;
    uint n_kv;
    uint hd;
    uint n_rot;
    uint flags;
    uint ld_qkv;
    uint window;     // 0: none; else keys at positions > pos - window
    uint hpw;        // query heads per workgroup (<= 8)
    uint n_chunks;   // ceil(group size / hpw)
    uint max_splits; // blocks dispatched per (g, c)
    uint split;      // fewest positions per block
    float eps;
    float scale;
    float softcap; // 0: none
#if BATCH
    uint slot_pages; // page-table entries per pool slot
#endif
} p;

// The column's offsets (0 for one sequence): its qkv row, output row, partials (floats)
// and counts (its page table's: KV_TB).
uint QB = 0u;
uint OB = 0u;
uint PB = 0u;
uint NB0 = 0u;

// q rows (scaled), then the output rows.
shared vec4 qv[Q_CAP / 4u];
// Scratch: score partials [head][row][L]; the row groups' value sums [rg][head][quad];
// the output's int8 maxima; the token's k row at KROW and v row at VROW (vec4 units).
const uint XS = 1024u;
const uint KROW = 768u;
const uint VROW = 896u;
shared vec4 xs[XS];
// Scores and exp(s - m) per (head, row): at most 8 x 64.
shared vec4 sc4[128];
shared vec4 pe4[128];
// Running max and correction per head, double-buffered by tile parity.
shared float ms[2][MAXH];
shared float al[2][MAXH];
shared bool last_s;

float xs_get(uint i) {
    return xs[i >> 2][i & 3u];
}
void xs_set(uint i, float v) {
    xs[i >> 2][i & 3u] = v;
}

// The output gate of query head h at dims d..d+3: sigmoid(gate) with F_QGATE, else 1.
vec4 out_gate(uint h, uint d) {
    if ((p.flags & F_QGATE) == 0u) {
        return vec4(1.0);
    }
    uint b = QB + (p.n_heads + 2u * p.n_kv) * p.hd + h * p.hd + d;
    vec4 gt = vec4(qkv[b], qkv[b + 1u], qkv[b + 2u], qkv[b + 3u]);
    return 1.0 / (1.0 + exp(-gt));
}

// With F_Q8: the output rows in qv (nh heads; hd a multiple of 32) to int8 blocks of 32,
// a lane per 4 values. Follows a barrier after qv was written.
void quantize_out(uint h0, uint nh) {
#if !BATCH
    if ((p.flags & F_Q8) == 0u) {
        return;
    }
    uint tid = gl_LocalInvocationID.x;
    uint nw = nh * p.hd / 4u;
    for (uint w = tid; w < nw; w += WG) {
        vec4 a = abs(qv[w]);
        xs_set(w, max(max(a.x, a.y), max(a.z, a.w)));
    }
    barrier();
    for (uint w = tid; w < nw; w += WG) {
        float amax = 0.0;
        uint first = w & ~7u;
        [[unroll]] for (uint j = 0u; j < 8u; j++) {
            amax = max(amax, xs_get(first + j));
        }
        float id = amax > 0.0 ? 127.0 / amax : 0.0;
        ivec4 t = clamp(ivec4(roundEven(qv[w] * id)), ivec4(-127), ivec4(127));
        uvec4 u = uvec4(t) & 255u;
        xq[((h0 * p.hd) >> 2) + w] = u.x | (u.y << 8) | (u.z << 16) | (u.w << 24);
        if ((w & 7u) == 0u) {
            xd[((h0 * p.hd) >> 5) + w / 8u] = amax / 127.0;
        }
    }
#endif
}

// The sink logit of query head h (F_SINKS; the batched kernel has none).
float sink(uint h) {
#if BATCH
    return NEG;
#else
    return sinks[h];
#endif
}

void main() {
    uint grp = flat_group();
    uint per_g = p.n_chunks * p.max_splits;
#if BATCH
    uint per_col = p.n_kv * per_g;
    uint col = grp / per_col;
    if (col >= step[0]) {
        return; // padding of the bucket: uniform for the workgroup
    }
    grp = grp % per_col;
    uint pos = step[9u + 2u * col];
    QB = col * p.ld_qkv;
    OB = col * p.n_heads * p.hd;
    KV_TB = step[8u + 2u * col] * p.slot_pages;
    PB = col * p.n_heads * p.max_splits * (p.hd + 4u);
    NB0 = col * p.n_kv * p.n_chunks;
#else
    uint pos = step[1];
#endif
    uint g = grp / per_g;
    if (g >= p.n_kv) {
        return;
    }
    uint c = (grp % per_g) / p.max_splits;
    uint s = grp % p.max_splits;
    uint lo = (p.window > 0u && pos + 1u > p.window) ? pos + 1u - p.window : 0u;
    uint n = pos + 1u - lo;
    uint hd = p.hd;
    uint NQ = hd / 4u;
    // Layout (the host checks it fits; see the header).
    uint L = hd <= 64u ? 2u : (hd <= 128u ? 4u : (hd <= 256u ? 8u : 16u));
    uint T = WG / L;
    uint KV = (NQ + L - 1u) / L;
    uint split = max(p.split, (n + p.max_splits - 1u) / p.max_splits);
    split = (split + T - 1u) / T * T;
    uint n_active = (n + split - 1u) / split;
    if (s >= n_active) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint gsize = p.n_heads / p.n_kv;
    uint h0 = g * gsize + c * p.hpw;
    uint nh = min(p.hpw, gsize - c * p.hpw);
    uint kvd = p.n_kv * hd;
    uint p0 = lo + s * split;
    uint count = min(split, n - s * split);
    bool own_kv = p0 + count == pos + 1u && (p.flags & F_NOKV) == 0u;
    uint row_base = (g * hd) >> 2; // the kv head's first quad in a cache row
    uint kvd4 = kvd >> 2;

    // Score role: row sr, slice sj. Value role: row group rg, first quad dq0.
    uint sr = tid / L;
    uint sj = tid % L;
    uint RG, rg, dq0, QPL;
    if (NQ <= WG) {
        RG = WG / NQ;
        rg = tid / NQ;
        dq0 = tid % NQ;
        QPL = 1u;
    } else {
        RG = 1u;
        rg = 0u;
        dq0 = tid;
        QPL = (NQ + WG - 1u) / WG;
    }
    uint VR = (T + RG - 1u) / RG;

    // The first tile's k and v, before anything else.
    vec4 kr[8];
    vec4 vr[8];
    {
        uint tn = min(T, count);
        // One page-table lookup per lane and tile (its row), only for rows in range.
        uint prow = sr < tn ? kv_row(p0 + sr) : 0u;
        [[unroll]] for (uint u = 0u; u < 8u; u++) {
            uint q4 = sj + L * u;
            kr[u] = vec4(0.0);
            if (u < KV && q4 < NQ && sr < tn) {
                kr[u] = k4_at(prow * kvd4 + row_base + q4);
            }
        }
        [[unroll]] for (uint it = 0u; it < 8u; it++) {
            uint r = rg + RG * (it / QPL);
            uint dq = dq0 + WG * (it % QPL);
            vr[it] = vec4(0.0);
            if (it < VR * QPL && rg < RG && r < tn && dq < NQ) {
                vr[it] = v4_at(kv_row(p0 + r) * kvd4 + row_base + dq);
            }
        }
    }

    // q (and the token's k, v) norm + RoPE: rows 0..nh-1 are q heads, nh the token's k,
    // nh + 1 its v; G lanes per row, a (rotation) pair of values per step. One pass loads
    // the values, norm weights and RoPE entries together and stores rotate(x * w) (times
    // the score scale for q) while summing x^2; the 1 / rms of each normed row, a factor
    // for the whole row, is applied after one barrier (RoPE is linear).
    if (tid < MAXH) {
        ms[1][tid] = NEG;
    }
    {
        uint nrows = nh + (own_kv ? 2u : 0u);
        uint np2 = 1u;
        while (np2 < nrows) {
            np2 *= 2u;
        }
        uint G = max(WG / np2, 1u);
        uint row = tid / G;
        uint sub = tid % G;
        bool rope_on = (p.flags & F_ROPE) != 0u;
        uint half_rot = rope_on ? p.n_rot / 2u : 0u;
        bool il = (p.flags & F_INTERLEAVED) != 0u;
        bool is_q = row < nh;
        bool is_k = row == nh;
        uint fl = is_q ? F_QNORM : (is_k ? F_KNORM : F_VNORM);
        bool nrm = row < nrows && (p.flags & fl) != 0u;
        bool any_norm = (p.flags & F_QNORM) != 0u
            || (own_kv && (p.flags & (F_KNORM | F_VNORM)) != 0u);
        uint kb = p.n_heads * hd + g * hd;
        uint e0 = is_q ? row * hd : (is_k ? KROW : VROW) * 4u;
        float ss = 0.0;
        if (row < nrows) {
            uint src = QB + (is_q ? (h0 + row) * hd : (is_k ? kb : kb + kvd));
            float mul = is_q ? p.scale : 1.0;
            for (uint i0 = sub; i0 < hd / 2u; i0 += 8u * G) {
                [[unroll]] for (uint u = 0u; u < 8u; u++) {
                    uint i = i0 + u * G;
                    if (i < hd / 2u) {
                        uint a = i < half_rot ? (il ? 2u * i : i) : 2u * i;
                        uint b = i < half_rot ? (il ? 2u * i + 1u : i + half_rot) : 2u * i + 1u;
                        float x0 = qkv[src + a];
                        float x1 = qkv[src + b];
                        float wa = 1.0;
                        float wb = 1.0;
                        if (nrm && is_q) {
                            wa = qn[a];
                            wb = qn[b];
                        } else if (nrm && is_k) {
                            wa = kn[a];
                            wb = kn[b];
                        }
                        float cs = 1.0;
                        float sn = 0.0;
                        if (i < half_rot && row <= nh) {
                            uint rr = 2u * (pos * half_rot + i);
                            cs = rope[rr];
                            sn = rope[rr + 1u];
                        }
                        ss += x0 * x0 + x1 * x1;
                        float y0 = x0 * wa;
                        float y1 = x1 * wb;
                        float z0 = (y0 * cs - y1 * sn) * mul;
                        float z1 = (y0 * sn + y1 * cs) * mul;
                        if (is_q) {
                            qv[(e0 + a) >> 2][(e0 + a) & 3u] = z0;
                            qv[(e0 + b) >> 2][(e0 + b) & 3u] = z1;
                        } else {
                            xs_set(e0 + a, z0);
                            xs_set(e0 + b, z1);
                        }
                    }
                }
            }
        }
        if (any_norm) {
            red_buf[tid] = ss;
            barrier();
            if (nrm) {
                float t = 0.0;
                for (uint i = 0u; i < G; i++) {
                    t += red_buf[row * G + i];
                }
                float inv = inversesqrt(t / float(hd) + p.eps);
                // This lane's own values only: no barrier before.
                for (uint i = sub; i < hd / 2u; i += G) {
                    uint a = i < half_rot ? (il ? 2u * i : i) : 2u * i;
                    uint b = i < half_rot ? (il ? 2u * i + 1u : i + half_rot) : 2u * i + 1u;
                    if (is_q) {
                        qv[(e0 + a) >> 2][(e0 + a) & 3u] *= inv;
                        qv[(e0 + b) >> 2][(e0 + b) & 3u] *= inv;
                    } else {
                        xs_set(e0 + a, xs_get(e0 + a) * inv);
                        xs_set(e0 + b, xs_get(e0 + b) * inv);
                    }
                }
            }
        }
        barrier();
    }
    if (own_kv && c == 0u) {
        uint dst = kv_row(pos) * kvd + g * hd;
        if (KV_TYPE == KV_Q8) {
            // A block of 32 per lane: the k blocks, then the v blocks.
            uint nb = hd / 32u;
            for (uint j = tid; j < 2u * nb; j += WG) {
                bool is_v = j >= nb;
                uint q0 = (is_v ? VROW : KROW) + 8u * (is_v ? j - nb : j);
                vec4 x[8];
                [[unroll]] for (uint u = 0u; u < 8u; u++) {
                    x[u] = xs[q0 + u];
                }
                kv_put32(is_v, dst + 32u * (is_v ? j - nb : j), x);
            }
        } else {
            for (uint i = 2u * tid; i < hd; i += 2u * WG) {
                k_put2(dst + i, vec2(xs_get(KROW * 4u + i), xs_get(KROW * 4u + i + 1u)));
                v_put2(dst + i, vec2(xs_get(VROW * 4u + i), xs_get(VROW * 4u + i + 1u)));
            }
        }
    }
    // (Profiling only: bits 8.. of flags stop the kernel after a phase.)
    uint stop = (p.flags >> 8) & 3u;
    if (stop == 1u) {
        return;
    }

    // Per (head, row) slots of this lane: idx = tid + WG * k.
    uint nslots = nh * T;
    float lsum[8];
    [[unroll]] for (uint k = 0u; k < 8u; k++) {
        lsum[k] = 0.0;
    }
    vec4 acc[8];
    [[unroll]] for (uint a = 0u; a < 8u; a++) {
        acc[a] = vec4(0.0);
    }
    uint n_tiles = (count + T - 1u) / T;
    uint cur = 0u;
    for (uint t = 0u; t < n_tiles; t++) {
        cur = t & 1u;
        uint tp0 = p0 + t * T;
        uint tn = min(T, count - t * T);
        // Scores: partial dots of this lane's k slice with every head.
        {
            uint prow = tp0 + sr;
            if (own_kv && prow == pos) {
                [[unroll]] for (uint u = 0u; u < 8u; u++) {
                    uint q4 = sj + L * u;
                    if (u < KV && q4 < NQ) {
                        kr[u] = xs[KROW + q4];
                    }
                }
            }
            [[unroll]] for (uint h = 0u; h < MAXH; h++) {
                if (h < nh) {
                    float d = 0.0;
                    [[unroll]] for (uint u = 0u; u < 8u; u++) {
                        uint q4 = sj + L * u;
                        if (u < KV && q4 < NQ) {
                            d += dot(qv[h * NQ + q4], kr[u]);
                        }
                    }
                    xs_set((h * T + sr) * L + sj, d);
                }
            }
        }
        // The next tile's k rows, in flight during this tile's softmax and values.
        if (t + 1u < n_tiles) {
            uint tn1 = min(T, count - (t + 1u) * T);
            uint prow = sr < tn1 ? kv_row(tp0 + T + sr) : 0u;
            [[unroll]] for (uint u = 0u; u < 8u; u++) {
                uint q4 = sj + L * u;
                kr[u] = vec4(0.0);
                if (u < KV && q4 < NQ && sr < tn1) {
                    kr[u] = k4_at(prow * kvd4 + row_base + q4);
                }
            }
        }
        barrier();
        [[unroll]] for (uint k = 0u; k < 8u; k++) {
            uint idx = tid + WG * k;
            if (idx < nslots) {
                uint r = idx % T;
                float v = NEG;
                if (r < tn) {
                    if (L >= 4u) {
                        vec4 v4 = vec4(0.0);
                        for (uint j = 0u; j < L / 4u; j++) {
                            v4 += xs[idx * (L / 4u) + j];
                        }
                        v = (v4.x + v4.y) + (v4.z + v4.w);
                    } else {
                        v = xs_get(idx * L) + xs_get(idx * L + 1u);
                    }
                    if (p.softcap > 0.0) {
                        v = p.softcap * tanh(v / p.softcap);
                    }
                }
                sc4[idx >> 2][idx & 3u] = v;
            }
        }
        barrier();
        [[unroll]] for (uint k = 0u; k < 8u; k++) {
            uint idx = tid + WG * k;
            if (idx < nslots) {
                uint h = idx / T;
                uint r = idx % T;
                vec4 mx4 = vec4(NEG);
                for (uint i = 0u; i < T / 4u; i++) {
                    mx4 = max(mx4, sc4[h * (T / 4u) + i]);
                }
                float mt = max(max(mx4.x, mx4.y), max(mx4.z, mx4.w));
                float m_old = ms[cur ^ 1u][h];
                float m_new = max(m_old, mt);
                float pr = exp(sc4[idx >> 2][idx & 3u] - m_new);
                float alpha = exp(m_old - m_new);
                lsum[k] = lsum[k] * alpha + pr;
                pe4[idx >> 2][idx & 3u] = pr;
                if (r == 0u) {
                    ms[cur][h] = m_new;
                    al[cur][h] = alpha;
                }
            }
        }
        barrier();
        // Values: this lane's rows, every head.
        [[unroll]] for (uint a = 0u; a < 8u; a++) {
            if (a / QPL < nh) {
                acc[a] *= al[cur][a / QPL];
            }
        }
        [[unroll]] for (uint it = 0u; it < 8u; it++) {
            uint r = rg + RG * (it / QPL);
            uint qp = it % QPL;
            uint dq = dq0 + WG * qp;
            if (it < VR * QPL && rg < RG && r < tn && dq < NQ) {
                vec4 v = vr[it];
                if (own_kv && tp0 + r == pos) {
                    v = xs[VROW + dq];
                }
                [[unroll]] for (uint a = 0u; a < 8u; a++) {
                    uint h = a / QPL;
                    if (h < nh && a % QPL == qp) {
                        acc[a] += pe4[(h * T + r) >> 2][(h * T + r) & 3u] * v;
                    }
                }
            }
        }
        // The next tile's v rows.
        if (t + 1u < n_tiles) {
            uint tn1 = min(T, count - (t + 1u) * T);
            [[unroll]] for (uint it = 0u; it < 8u; it++) {
                uint r = rg + RG * (it / QPL);
                uint dq = dq0 + WG * (it % QPL);
                vr[it] = vec4(0.0);
                if (it < VR * QPL && rg < RG && r < tn1 && dq < NQ) {
                    vr[it] = v4_at(kv_row(tp0 + T + r) * kvd4 + row_base + dq);
                }
            }
        }
    }
    // The row groups' sums and the (head, row) denominators meet in shared memory.
    barrier();
    if (rg < RG) {
        [[unroll]] for (uint a = 0u; a < 8u; a++) {
            uint h = a / QPL;
            uint dq = dq0 + WG * (a % QPL);
            if (h < nh && dq < NQ) {
                xs[(rg * nh + h) * NQ + dq] = acc[a];
            }
        }
    }
    [[unroll]] for (uint k = 0u; k < 8u; k++) {
        uint idx = tid + WG * k;
        if (idx < nslots) {
            pe4[idx >> 2][idx & 3u] = lsum[k];
        }
    }
    barrier();
    bool single = n_active == 1u;
    bool has_sinks = (p.flags & F_SINKS) != 0u;
    uint NB = p.max_splits;
    uint ml_base = p.n_heads * NB * hd;
    for (uint w = tid; w < nh * NQ; w += WG) {
        uint h = w / NQ;
        uint dq = w % NQ;
        vec4 sum = vec4(0.0);
        for (uint i = 0u; i < RG; i++) {
            sum += xs[(i * nh + h) * NQ + dq];
        }
        vec4 l4 = vec4(0.0);
        for (uint i = 0u; i < T / 4u; i++) {
            l4 += pe4[h * (T / 4u) + i];
        }
        float l = l4.x + l4.y + l4.z + l4.w;
        float m = ms[cur][h];
        if (single) {
            if (has_sinks) {
                l += exp(sink(h0 + h) - m);
            }
            vec4 v = sum / l * out_gate(h0 + h, 4u * dq);
            qv[w] = v;
            o4[OB / 4u + (h0 + h) * NQ + dq] = v;
        } else {
            part4[PB / 4u + ((h0 + h) * NB + s) * NQ + dq] = sum;
            if (dq == 0u) {
                uint mb = PB + ml_base + 2u * ((h0 + h) * NB + s);
                part[mb] = m;
                part[mb + 1u] = l;
            }
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
    // The last block of (g, c) to get here combines every block's partials.
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) {
        uint done = atomicAdd(cnt[NB0 + g * p.n_chunks + c], 1u);
        last_s = done == n_active - 1u;
        if (last_s) {
            cnt[NB0 + g * p.n_chunks + c] = 0u;
        }
    }
    barrier();
    if (!last_s) {
        return; // uniform for the workgroup
    }
    memoryBarrierBuffer();
    // Per output quad: every block's m, l and acc, 16 blocks per batch of loads, with a
    // running max.
    uint ml2 = (PB + ml_base) / 2u;
    for (uint w = tid; w < nh * NQ; w += WG) {
        uint h = w / NQ;
        uint dq = w % NQ;
        uint ab = PB / 4u + (h0 + h) * NB * NQ + dq;
        uint mb = ml2 + (h0 + h) * NB;
        float mx = NEG;
        float l = 0.0;
        vec4 a = vec4(0.0);
        for (uint t0 = 0u; t0 < n_active; t0 += 16u) {
            vec4 pv[16];
            vec2 ml[16];
            [[unroll]] for (uint u = 0u; u < 16u; u++) {
                pv[u] = vec4(0.0);
                ml[u] = vec2(NEG, 0.0);
                if (t0 + u < n_active) {
                    pv[u] = part4[ab + (t0 + u) * NQ];
                    ml[u] = part2[mb + t0 + u];
                }
            }
            float bm = mx;
            [[unroll]] for (uint u = 0u; u < 16u; u++) {
                bm = max(bm, ml[u].x);
            }
            float f = exp(mx - bm);
            l *= f;
            a *= f;
            mx = bm;
            [[unroll]] for (uint u = 0u; u < 16u; u++) {
                float wt = exp(ml[u].x - mx);
                l += wt * ml[u].y;
                a += wt * pv[u];
            }
        }
        if (has_sinks) {
            l += exp(sink(h0 + h) - mx);
        }
        vec4 v = a / l * out_gate(h0 + h, 4u * dq);
        qv[w] = v;
        o4[OB / 4u + (h0 + h) * NQ + dq] = v;
    }
    barrier();
    quantize_out(h0, nh);
}
