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
// Binding 0: the piece's raw blocks (row r at byte r * row_bytes), read as 32-bit words.
// Binding 1: x (f32, k values; vec4-aligned). Binding 2: y (f32).
// Binding 3: gam (f32, k values; any buffer of >= k floats when not MV_NORM).
#include "common.glsl"

#ifndef MVG
#define MVG 0
#endif

layout(constant_id = 1) const uint ROWS = 2;
const uint MAXR = 8u; // weight rows per workgroup at most
#if MVG
const uint NR = 2u * ROWS;
#else
const uint NR = ROWS;
#endif

const uint MV_NORM = 1u;
const uint MV_ADD = 2u;
const uint MV_GELU = 8u;
const uint MV_SOFTCAP = 16u;

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
layout(std430, binding = 0) readonly buffer Wbuf2 { uvec2 w2[]; };
layout(std430, binding = 1) readonly buffer Xbuf { float x[]; };
layout(std430, binding = 1) readonly buffer Xbuf4 { vec4 x4[]; };
layout(std430, binding = 2) buffer Ybuf { float y[]; };
layout(std430, binding = 3) readonly buffer Gbuf { float gam[]; };
layout(std430, binding = 3) readonly buffer Gbuf4 { vec4 gam4[]; };

layout(push_constant) uniform Push {
    uint k;        // elements per weight row
    uint rows;     // weight rows in this piece (pairs: 2 per output with MVG)
    uint y_offset; // element of y that the piece's output 0 writes
    uint flags;    // MV_* bits
    float eps;     // MV_NORM epsilon
    float cap;     // MV_SOFTCAP: y = cap * tanh(y / cap)
} p;

uint byte_at(uint o) {
    return (w[o >> 2] >> ((o & 3u) * 8u)) & 0xffu;
}
uint u16_at(uint o) {
    return (w[o >> 2] >> ((o & 2u) * 8u)) & 0xffffu;
}
// The 4 bytes at even offset `o`, without a branch (lanes of one subgroup read blocks
// of both alignments): a funnel shift of two words (shift 0 or 16).
uint u32_at(uint o) {
    uint i = o >> 2;
    uint sh = (o & 2u) * 8u;
    return (w[i] >> sh) | ((w[i + 1u] << 1u) << (31u - sh));
}
// The 8 bytes at even offset `o`.
uvec2 u64_at(uint o) {
    uint i = o >> 2;
    uint sh = (o & 2u) * 8u;
    uint a = w[i];
    uint b = w[i + 1u];
    uint c = w[i + 2u];
    return uvec2((a >> sh) | ((b << 1u) << (31u - sh)), (b >> sh) | ((c << 1u) << (31u - sh)));
}
float f16_at(uint o) {
    return unpackHalf2x16(u16_at(o)).x;
}

float gelu_tanh(float v) {
    const float c = 0.7978845608;
    float u = c * (v + 0.044715 * v * v * v);
    float t = 1.0 - 2.0 / (exp(min(2.0 * u, 80.0)) + 1.0);
    return 0.5 * v * (1.0 + t);
}

float silu(float v) {
    return v / (1.0 + exp(-v));
}

// Nibbles 0, 2, 4, 6 (lo) or 1, 3, 5, 7 (hi) of a word, as floats.
vec4 nib_lo(uint v) {
    return vec4((uvec4(v) >> uvec4(0u, 8u, 16u, 24u)) & 15u);
}
vec4 nib_hi(uint v) {
    return vec4((uvec4(v) >> uvec4(4u, 12u, 20u, 28u)) & 15u);
}

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
// 144 B / 256: d, dmin, scales[12], qs[128]. Lane t (of 16), j = t / 4, q = t % 4,
// holds qs[32j + 8q .. + 8]: elements 64j + 8q .. + 8 (low nibbles, group 2j) and
// 64j + 32 + 8q .. + 8 (high nibbles, group 2j + 1).
#define MV_FAST 1
const uint L = 16u;
const uint BE = 256u;
const uint NXV = 4u;
uint xcol(uint lane, uint i) {
    return 64u * (lane >> 2) + 8u * (lane & 3u) + 32u * (i >> 1) + 4u * (i & 1u);
}
uint sbyte(uvec3 s, uint i) {
    uint v = i < 4u ? s.x : (i < 8u ? s.y : s.z);
    return (v >> (8u * (i & 3u))) & 255u;
}
// Six-bit scale and min of group g.
uvec2 scale_min(uvec3 s, uint g) {
    if (g < 4u) {
        return uvec2(sbyte(s, g) & 63u, sbyte(s, g + 4u) & 63u);
    }
    uint a = sbyte(s, g + 4u);
    return uvec2((a & 15u) | ((sbyte(s, g - 4u) >> 6) << 4),
                 (a >> 4) | ((sbyte(s, g) >> 6) << 4));
}
float block_dot(uint row, uint b, uint lane, vec4 xv[NXV]) {
    uint o = (row * (p.k / 256u) + b) * 36u; // words
    uint j = lane >> 2;
    vec2 dm = unpackHalf2x16(w[o]);
    uvec3 s = uvec3(w[o + 1u], w[o + 2u], w[o + 3u]);
    uvec2 sm0 = scale_min(s, 2u * j);
    uvec2 sm1 = scale_min(s, 2u * j + 1u);
    uvec2 q = w2[(o + 4u + 8u * j + 2u * (lane & 3u)) >> 1];
    float lo = dot(nib_lo(q.x), xv[0]) + dot(nib_lo(q.y), xv[1]);
    float hi = dot(nib_hi(q.x), xv[2]) + dot(nib_hi(q.y), xv[3]);
    const vec4 one = vec4(1.0);
    float slo = dot(xv[0] + xv[1], one);
    float shi = dot(xv[2] + xv[3], one);
    return dm.x * (float(sm0.x) * lo + float(sm1.x) * hi)
         - dm.y * (float(sm0.y) * slo + float(sm1.y) * shi);
}
#elif defined(TYPE_Q6_K)
// 210 B / 256: ql[128], qh[64], scales: i8[16], d. Lane t (of 16), n = t / 8,
// l0 = 4 (t % 8), holds l = l0 .. l0 + 4 of half n: elements 128n + l + {0, 32, 64, 96}
// from ql[64n + l] (low / high nibble), ql[64n + 32 + l] and qh[32n + l] (2 bits each),
// minus 32; scales[8n + l / 16 + {0, 2, 4, 6}].
#define MV_FAST 1
const uint L = 16u;
const uint BE = 256u;
const uint NXV = 4u;
uint xcol(uint lane, uint i) {
    return 128u * (lane >> 3) + 4u * (lane & 7u) + 32u * i;
}
float block_dot(uint row, uint b, uint lane, vec4 xv[NXV]) {
    uint o = (row * (p.k / 256u) + b) * 210u;
    uint n = lane >> 3;
    uint l0 = 4u * (lane & 7u);
    uint a = u32_at(o + 64u * n + l0);
    uint c = u32_at(o + 64u * n + 32u + l0);
    uint h = u32_at(o + 128u + 32u * n + l0);
    uint s0 = u32_at(o + 192u + 8u * n);
    uint s1 = u32_at(o + 196u + 8u * n);
    int is = int(8u * (l0 >> 4));
    vec4 sc = vec4(bitfieldExtract(int(s0), is, 8), bitfieldExtract(int(s0), is + 16, 8),
                   bitfieldExtract(int(s1), is, 8), bitfieldExtract(int(s1), is + 16, 8));
    float d = f16_at(o + 208u);
    const uvec4 sh = uvec4(0u, 8u, 16u, 24u);
    uvec4 av = (uvec4(a) >> sh) & 255u;
    uvec4 cv = (uvec4(c) >> sh) & 255u;
    uvec4 hv = (uvec4(h) >> sh) & 255u;
    const vec4 e32 = vec4(32.0);
    vec4 q1 = vec4((av & 15u) | ((hv & 3u) << 4)) - e32;
    vec4 q2 = vec4((cv & 15u) | (((hv >> 2) & 3u) << 4)) - e32;
    vec4 q3 = vec4((av >> 4) | (((hv >> 4) & 3u) << 4)) - e32;
    vec4 q4 = vec4((cv >> 4) | (((hv >> 6) & 3u) << 4)) - e32;
    return d * (sc.x * dot(q1, xv[0]) + sc.y * dot(q2, xv[1])
              + sc.z * dot(q3, xv[2]) + sc.w * dot(q4, xv[3]));
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

void store(uint i, float s) {
    if ((p.flags & MV_SOFTCAP) != 0u) {
        s = p.cap * tanh(s / p.cap);
    }
    uint yi = p.y_offset + i;
    if ((p.flags & MV_ADD) != 0u) {
        s += y[yi];
    }
    y[yi] = s;
}

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
}
