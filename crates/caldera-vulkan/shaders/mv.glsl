// Decode mat-vec (one token): y[y_offset + r] (=, or +=) dot(W row r, in) for the rows
// of one weight piece, where in = x, or x * gam / rms(x) with MV_NORM (the input norm
// folded in: its sum of squares is taken from the same x loads).
// With MVG (the gated-MLP variant) the weight rows come in pairs: row 2i is gate row i,
// row 2i + 1 up row i, and the output is act(gate_i . in) * (up_i . in) at
// y[y_offset + i]; the next mat-vec (down) reads it as a plain input.
//
// The work: each workgroup makes ROWS outputs (spec constant 1), so it reads NR weight
// rows (ROWS, or 2 ROWS with MVG) side by side. Fast sections (Q4_0, Q8_0, Q4_K, Q6_K)
// split every block over L consecutive invocations ("lanes") whose loads are adjacent
// words, and the WG / L block slots of the workgroup stride along the rows; the x (and
// gam) values of a slot's block are loaded once, as vec4, and used for all NR rows.
// Other types go through deq.glsl's dot32, one 32-element group per invocation.
//
// With MV_ROUTE (the MoE router, `mvr_*`) y holds the router's logits, and the last
// workgroup to finish (an atomic count, reset by that workgroup, as attn_decode's
// combine) routes the token (route.glsl) from them: the chosen experts' ids and
// weights go to device memory for the expert mat-vecs, so no routing dispatch and no
// barrier separate the router from them. The workgroups make their logits visible
// before counting (coherent y, memoryBarrierBuffer), the last one reads them after.
//
// Binding 0: the piece's raw blocks (row r at byte r * row_bytes), read as 32-bit words.
// Binding 1: x (f32, k values; vec4-aligned). Binding 2: y (f32).
// Binding 3: gam (f32, k values; any buffer of >= k floats when not MV_NORM).
// MV_ROUTE: binding 4: logit bias (f32, n_exp). 5: selection bias (f32, n_exp). 6: ids
// (u32). 7: weights (f32). 8: the count (one u32, zero between dispatches).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
layout(std430, binding = 0) readonly buffer Wbuf2 { uvec2 w2[]; };
layout(std430, binding = 0) readonly buffer Wbuf4 { uvec4 w4[]; };
layout(std430, binding = 1) readonly buffer Xbuf { float x[]; };
layout(std430, binding = 1) readonly buffer Xbuf4 { vec4 x4[]; };
#if defined(MV_ROUTE)
layout(std430, binding = 2) coherent buffer Ybuf { float y[]; };
layout(std430, binding = 4) readonly buffer LBbuf { float lbias[]; };
layout(std430, binding = 5) readonly buffer SBbuf { float sbias[]; };
layout(std430, binding = 6) writeonly buffer Ibuf { uint ids[]; };
layout(std430, binding = 7) writeonly buffer RWbuf { float wts[]; };
layout(std430, binding = 8) coherent buffer RCnt { uint rcnt[]; };
#else
layout(std430, binding = 2) buffer Ybuf { float y[]; };
#endif
layout(std430, binding = 3) readonly buffer Gbuf { float gam[]; };
layout(std430, binding = 3) readonly buffer Gbuf4 { vec4 gam4[]; };

layout(push_constant) uniform Push {
    uint k;        // elements per weight row
    uint rows;     // weight rows in this piece (pairs: 2 per output with MVG)
    uint y_offset; // element of y that the piece's output 0 writes
    uint flags;    // MV_* bits
    float eps;     // MV_NORM epsilon
    float cap;     // MV_SOFTCAP: y = cap * tanh(y / cap)
#if defined(MV_EXPERT)
#include "mv_expert_push.glsl"
#endif
#if defined(MV_ROUTE)
    uint n_exp;    // experts the router chooses among (logits 0 .. n_exp, + 1 gated)
    uint n_used;   // experts chosen
    uint kind;     // route.glsl's KIND_*
    uint rflags;   // route.glsl's ROUTE_*
    float scale;   // multiplier on the mixing weights
#endif
} p;

#include "mv_common.glsl"

// Nibbles 0, 2, 4, 6 (lo) or 1, 3, 5, 7 (hi) of a word, as floats.
vec4 nib_lo(uint v) {
    return vec4((uvec4(v) >> uvec4(0u, 8u, 16u, 24u)) & 15u);
}
vec4 nib_hi(uint v) {
    return vec4((uvec4(v) >> uvec4(4u, 12u, 20u, 28u)) & 15u);
}

// Sums of this lane's x values per half of its block (low / high nibble groups of
// Q4_K), set before block_dot.
vec2 xs;

#if defined(TYPE_Q4_0)
// 18 B / 32: d, qs[16]. Lane t (of 2) holds qs[8t .. 8t + 8]: elements 8t .. 8t + 8
// (low nibbles) and 16 + 8t .. 24 + 8t (high).
#define MV_FAST 1
const uint L = 2u;
const uint BE = 32u;
const uint NXV = 4u;
uint xcol(uint lane, uint i) {
    return 8u * lane + 16u * (i >> 1) + 4u * (i & 1u);
}
float block_dot(uint row, uint b, uint lane, vec4 xv[NXV]) {
    uint o = (row * (p.k / 32u) + b) * 18u;
    float d = f16_at(o);
    uvec2 q = u64_at(o + 2u + 8u * lane);
    const vec4 e8 = vec4(8.0);
    return d * (dot(nib_lo(q.x) - e8, xv[0]) + dot(nib_lo(q.y) - e8, xv[1])
              + dot(nib_hi(q.x) - e8, xv[2]) + dot(nib_hi(q.y) - e8, xv[3]));
}
#elif defined(TYPE_Q8_0)
// 34 B / 32: d, qs: i8[32]. Lane t (of 4) holds qs[8t .. 8t + 8].
#define MV_FAST 1
const uint L = 4u;
const uint BE = 32u;
const uint NXV = 2u;
uint xcol(uint lane, uint i) {
    return 8u * lane + 4u * i;
}
vec4 i8x4(uint v) {
    return vec4(ivec4(uvec4(v) << uvec4(24u, 16u, 8u, 0u)) >> 24);
}
float block_dot(uint row, uint b, uint lane, vec4 xv[NXV]) {
    uint o = (row * (p.k / 32u) + b) * 34u;
    float d = f16_at(o);
    uvec2 q = u64_at(o + 2u + 8u * lane);
    return d * (dot(i8x4(q.x), xv[0]) + dot(i8x4(q.y), xv[1]));
}
#elif defined(TYPE_Q4_K)
// 144 B / 256: d, dmin, scales[12], qs[128]. Lane t (of 8), j = t / 2, h = t % 2,
// holds qs[32j + 16h .. + 16] (one 16-byte load): elements 64j + 16h .. + 16 (low
// nibbles, group 2j) and 64j + 32 + 16h .. + 16 (high nibbles, group 2j + 1).
#define MV_FAST 1
const uint L = 8u;
const uint BE = 256u;
const uint NXV = 8u;
uint xcol(uint lane, uint i) {
    return 64u * (lane >> 1) + 16u * (lane & 1u) + 32u * (i >> 2) + 4u * (i & 3u);
}
// Nibbles 0 and 2 (sh 0), 1 and 3 (sh 4), ... of the two 16-bit halves of v as floats
// exactly: each nibble becomes the mantissa of the half 1024 + n.
vec2 nib2(uint v, uint sh) {
    return unpackHalf2x16(((v >> sh) & 0x000f000fu) | 0x64006400u) - vec2(1024.0);
}
// Sum over the 4 nibbles at bit offsets sh, sh + 8, sh + 16, sh + 24 of v, times x.
float nibdot(uint v, uint sh, vec4 xv) {
    vec2 a = nib2(v, sh);      // bytes 0, 2
    vec2 b = nib2(v, sh + 8u); // bytes 1, 3
    return a.x * xv.x + b.x * xv.y + a.y * xv.z + b.y * xv.w;
}
float block_dot(uint row, uint b, uint lane, vec4 xv[NXV]) {
    uint o = (row * (p.k / 256u) + b) * 9u; // 16-byte units
    uint j = lane >> 1;
    uvec4 hd = w4[o];
    uvec4 q = w4[o + 1u + 2u * j + (lane & 1u)];
    vec2 dm = unpackHalf2x16(hd.x);
    // Six-bit scales and mins of groups 2j, 2j + 1, two bytes at a time.
    uint sh = 16u * (j & 1u);
    uint sa = hd.y >> sh;
    uint sb = hd.z >> sh;
    uint sc = hd.w >> sh;
    uint scl = j < 2u ? sa & 0x3f3fu : (sc & 0x0f0fu) | ((sa >> 2) & 0x3030u);
    uint mnl = j < 2u ? sb & 0x3f3fu : ((sc >> 4) & 0x0f0fu) | ((sb >> 2) & 0x3030u);
    float lo = nibdot(q.x, 0u, xv[0]) + nibdot(q.y, 0u, xv[1])
             + nibdot(q.z, 0u, xv[2]) + nibdot(q.w, 0u, xv[3]);
    float hi = nibdot(q.x, 4u, xv[4]) + nibdot(q.y, 4u, xv[5])
             + nibdot(q.z, 4u, xv[6]) + nibdot(q.w, 4u, xv[7]);
    return dm.x * (float(scl & 255u) * lo + float(scl >> 8) * hi)
         - dm.y * (float(mnl & 255u) * xs.x + float(mnl >> 8) * xs.y);
}
#elif defined(TYPE_Q6_K)
// 210 B / 256: ql[128], qh[64], scales: i8[16], d. Lane t (of 8), n = t / 4,
// l0 = 8 (t % 4), holds l = l0 .. l0 + 8 of half n: elements 128n + l + {0, 32, 64, 96}
// from ql[64n + l] (low / high nibble), ql[64n + 32 + l] and qh[32n + l] (2 bits each),
// minus 32; scales[8n + l0 / 16 + {0, 2, 4, 6}].
#define MV_FAST 1
const uint L = 8u;
const uint BE = 256u;
const uint NXV = 8u;
uint xcol(uint lane, uint i) {
    return 128u * (lane >> 2) + 8u * (lane & 3u) + 32u * (i >> 1) + 4u * (i & 1u);
}
// The four 6-bit values of word pair (a: ql, h: qh) at nibble shift qs and 2-bit shift hs,
// minus 32, times x.
float q6dot(uint a, uint h, uint qs, uint hs, vec4 xv) {
    uvec4 v = ((uvec4(a) >> (uvec4(0u, 8u, 16u, 24u) + qs)) & 15u)
            | (((uvec4(h) >> (uvec4(0u, 8u, 16u, 24u) + hs)) & 3u) << 4);
    return dot(vec4(v) - vec4(32.0), xv);
}
float block_dot(uint row, uint b, uint lane, vec4 xv[NXV]) {
    uint o = (row * (p.k / 256u) + b) * 210u;
    uint n = lane >> 2;
    uint l0 = 8u * (lane & 3u);
    uvec2 a = u64_at(o + 64u * n + l0);
    uvec2 c = u64_at(o + 64u * n + 32u + l0);
    uvec2 h = u64_at(o + 128u + 32u * n + l0);
    uvec2 s = u64_at(o + 192u + 8u * n);
    int is = int(8u * (l0 >> 4));
    vec4 sc = vec4(bitfieldExtract(int(s.x), is, 8), bitfieldExtract(int(s.x), is + 16, 8),
                   bitfieldExtract(int(s.y), is, 8), bitfieldExtract(int(s.y), is + 16, 8));
    float d = f16_at(o + 208u);
    return d * (sc.x * (q6dot(a.x, h.x, 0u, 0u, xv[0]) + q6dot(a.y, h.y, 0u, 0u, xv[1]))
              + sc.y * (q6dot(c.x, h.x, 0u, 2u, xv[2]) + q6dot(c.y, h.y, 0u, 2u, xv[3]))
              + sc.z * (q6dot(a.x, h.x, 4u, 4u, xv[4]) + q6dot(a.y, h.y, 4u, 4u, xv[5]))
              + sc.w * (q6dot(c.x, h.x, 4u, 6u, xv[6]) + q6dot(c.y, h.y, 4u, 6u, xv[7])));
}
#else
// Every other type: deq.glsl's dot32 on the (normed) input.
#define MV_FAST 0
float xin(uint xb, uint c) {
    // gam is a buffer of >= k floats either way: a select, not a branch.
    float g = gam[c];
    return x[xb + c] * ((p.flags & MV_NORM) != 0u ? g : 1.0);
}
#include "deq.glsl"
#endif

shared float red_mv[(MAXR + 1u) * WG];

// Sums a[0 .. NR + 1] over the workgroup; every invocation gets the sums. Must be
// reached by the whole workgroup.
void reduce_rows(inout float a[MAXR + 1u]) {
#if USE_SUBGROUP
    [[unroll]] for (uint j = 0u; j <= MAXR; j++) {
        if (j <= NR) {
            a[j] = subgroupAdd(a[j]);
        }
    }
    if (subgroupElect()) {
        [[unroll]] for (uint j = 0u; j <= MAXR; j++) {
            if (j <= NR) {
                red_mv[j * WG + gl_SubgroupID] = a[j];
            }
        }
    }
    barrier();
    [[unroll]] for (uint j = 0u; j <= MAXR; j++) {
        if (j <= NR) {
            float s = 0.0;
            for (uint i = 0u; i < gl_NumSubgroups; i++) {
                s += red_mv[j * WG + i];
            }
            a[j] = s;
        }
    }
#else
    uint t = gl_LocalInvocationID.x;
    [[unroll]] for (uint j = 0u; j <= MAXR; j++) {
        if (j <= NR) {
            red_mv[j * WG + t] = a[j];
        }
    }
    barrier();
    for (uint hs = WG / 2u; hs > 0u; hs >>= 1) {
        if (t < hs) {
            [[unroll]] for (uint j = 0u; j <= MAXR; j++) {
                if (j <= NR) {
                    red_mv[j * WG + t] += red_mv[j * WG + t + hs];
                }
            }
        }
        barrier();
    }
    [[unroll]] for (uint j = 0u; j <= MAXR; j++) {
        if (j <= NR) {
            a[j] = red_mv[j * WG];
        }
    }
#endif
}

#if defined(MV_ROUTE)
#define RWG WG
float route_logit(uint i) {
    return y[p.y_offset + i];
}
#include "route.glsl"

shared bool route_last;

// After the workgroup's stores: the last workgroup of the dispatch routes the token.
void route_tail() {
    memoryBarrierBuffer();
    barrier();
    if (gl_LocalInvocationID.x == 0u) {
        uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
        uint done = atomicAdd(rcnt[0], 1u);
        route_last = done == groups - 1u;
        if (route_last) {
            rcnt[0] = 0u;
        }
    }
    barrier();
    // (MV_DBG_NOTAIL, a profiling switch: no routing, the ids of the step before.)
    if (route_last && (p.flags & MV_DBG_NOTAIL) == 0u) { // uniform for the workgroup
        memoryBarrierBuffer();
        route_token(p.n_exp, p.n_used, p.kind, p.rflags, p.scale, 0u);
    }
}
#endif

#if defined(MV_EXPERT)
#include "mv_expert.glsl"
#else
void main() {
    uint grp = flat_group();
    uint tid = gl_LocalInvocationID.x;
    uint row0 = grp * NR;
    uint last = p.rows - 1u;
    // a[0 .. NR]: the rows' dot products; a[NR]: this invocation's share of sum(x^2).
    float a[MAXR + 1u];
    [[unroll]] for (uint r = 0u; r <= MAXR; r++) {
        a[r] = 0.0;
    }
    float ss = 0.0;
#if MV_FAST
    const uint SLOTS = WG / L;
    uint lane = tid % L;
    uint nb = p.k / BE;
    bool norm = (p.flags & MV_NORM) != 0u;
    for (uint b = tid / L; b < nb; b += SLOTS) {
        vec4 xv[NXV];
        [[unroll]] for (uint i = 0u; i < NXV; i++) {
            uint c = (b * BE + xcol(lane, i)) >> 2;
            vec4 v = x4[c];
            ss += dot(v, v);
            if (norm) {
                v *= gam4[c];
            }
            xv[i] = v;
        }
        xs = vec2(0.0);
        [[unroll]] for (uint i = 0u; i < NXV; i++) {
            xs[i * 2u / NXV] += dot(xv[i], vec4(1.0));
        }
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            if (r < NR) {
                a[r] += block_dot(min(row0 + r, last), b, lane, xv);
            }
        }
    }
#else
    uint nsub = (p.k + 31u) / 32u;
    for (uint sb = tid; sb < nsub; sb += WG) {
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            if (r < NR) {
                a[r] += dot32(min(row0 + r, last), sb, 0u);
            }
        }
    }
    if ((p.flags & MV_NORM) != 0u) {
        for (uint i = tid; i < p.k; i += WG) {
            ss += x[i] * x[i];
        }
    }
#endif
    [[unroll]] for (uint r = 0u; r <= MAXR; r++) {
        if (r == NR) {
            a[r] = ss;
        }
    }
    reduce_rows(a);
    float inv = 1.0;
    [[unroll]] for (uint r = 0u; r <= MAXR; r++) {
        if (r == NR && (p.flags & MV_NORM) != 0u) {
            inv = inversesqrt(a[r] / float(p.k) + p.eps);
        }
    }
#if MVG
    [[unroll]] for (uint i = 0u; i < MAXR / 2u; i++) {
        if (i < ROWS && tid == i && row0 + 2u * i + 1u <= last) {
            float g = a[2u * i] * inv;
            float u = a[2u * i + 1u] * inv;
            float act = (p.flags & MV_GELU) != 0u ? gelu_tanh(g) : silu(g);
            store(grp * ROWS + i, act * u);
        }
    }
#else
    [[unroll]] for (uint r = 0u; r < MAXR; r++) {
        if (r < NR && tid == r && row0 + r <= last) {
            store(row0 + r, a[r] * inv);
        }
    }
#endif
#if defined(MV_ROUTE)
    route_tail();
#endif
}
#endif
