// Decode mat-vec on int8 activations (one token): y[y_offset + r] (=, or +=)
// dot(W row r, x) where x arrives quantized by quant_x.comp (blocks of 32: int8 q and
// an f32 scale d). The weight nibbles / bytes meet q in 4-way int8 dot products
// (OpSDot / OpSUDot where the device has them, USE_DOT = 1; plain integer arithmetic
// otherwise), exact in int32; the block and group scales are applied in f32. With MVG
// the weight rows are gate/up pairs (rows 2i, 2i + 1) and the output is act(gate) * up.
// The work is laid out as in mv.glsl: ROWS outputs per workgroup, L lanes per weight
// block with adjacent loads, the activation words and scales of a block loaded once for
// all the rows of the workgroup.
// With MV_TAIL the kernel also prepares the next mat-vec's input, block by block: each
// invocation that stores an output adds it to an atomic count per block of 32 outputs,
// and the one that completes a block (and resets its count) quantizes it as quant_x.comp
// does, times the next norm's weights ngam with MV_TAIL_NORM, also writing the block's
// sum of squares (of y itself) to ns. The next mat-vec then runs with MV_XNORM: it sums
// those per-block squares itself and scales its dot products by 1 / rms, which is the
// same as quantizing the normed vector (the norm's 1 / rms is one factor for the whole
// vector). So no quant_x dispatch runs between the two, and no workgroup waits for all.
// Binding 0: the piece's raw blocks. 1: q (u32 words). 2: d (f32 per 32 values). 3: y.
// 4: counts (u32 per block of 32 outputs, zero between dispatches). 5: next q (u32).
// 6: next d (f32). 7: next norm weights (f32). 8: next sums of squares (f32 per block).
// 9: with MV_XNORM, this input's sums of squares (f32 per block of 32 inputs).
#include "common.glsl"
#if USE_DOT
#extension GL_EXT_spirv_intrinsics : require
#endif

layout(std430, binding = 0) readonly buffer Wbuf { uint w[]; };
layout(std430, binding = 0) readonly buffer Wbuf4 { uvec4 w4[]; };
layout(std430, binding = 1) readonly buffer Qbuf2 { uvec2 xq2[]; };
layout(std430, binding = 1) readonly buffer Qbuf4 { uvec4 xq4[]; };
layout(std430, binding = 2) readonly buffer Dbuf { float xd[]; };
layout(std430, binding = 3) buffer Ybuf { float y[]; };
// The tail reads the other workgroups' outputs through a coherent view.
layout(std430, binding = 3) coherent readonly buffer Ybuf4 { vec4 y4[]; };
layout(std430, binding = 4) coherent buffer Cnt { uint cnt[]; };
layout(std430, binding = 5) writeonly buffer NQ { uint nq[]; };
layout(std430, binding = 6) writeonly buffer ND { float nd[]; };
layout(std430, binding = 7) readonly buffer NG { vec4 ngam4[]; };
layout(std430, binding = 8) writeonly buffer NS { float nss[]; };
layout(std430, binding = 9) readonly buffer XS { float xs[]; };

layout(push_constant) uniform Push {
    uint k;
    uint rows;     // weight rows in this piece (pairs: 2 per output with MVG)
    uint y_offset;
    uint flags;    // MV_ADD, MV_GELU, MV_SOFTCAP, MV_TAIL, MV_TAIL_NORM, MV_XNORM, MV_RELU2
    float cap;
    uint n_next;   // MV_TAIL: values of y to quantize (a multiple of 32)
    float eps;     // MV_XNORM epsilon
#if defined(MV_EXPERT)
#include "mv_expert_push.glsl"
#endif
} p;

#include "mv_common.glsl"

#include "dot8.glsl"

#if defined(TYPE_Q4_0)
// 18 B / 32: d, qs[16]. Lane t (of 2): qs[8t .. 8t + 8], elements 8t .. + 8 (low
// nibbles) and 16 + 8t .. + 8 (high); value d (n - 8).
const uint L = 2u;
const uint BE = 32u;
void load_x(uint b, uint lane) {
    uvec2 lo = xq2[4u * b + lane];
    uvec2 hi = xq2[4u * b + 2u + lane];
    XA = uvec4(lo, hi);
    FX.x = xd[b];
    IX.x = sdot(lo.x, ONES) + sdot(lo.y, ONES) + sdot(hi.x, ONES) + sdot(hi.y, ONES);
}
float block_dot(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 32u) + b) * 18u;
    uvec2 q = u64_at(o + 2u + 8u * lane);
    int s = udot(q.x & LO4, XA.x) + udot(q.y & LO4, XA.y)
          + udot((q.x >> 4) & LO4, XA.z) + udot((q.y >> 4) & LO4, XA.w);
    return f16_at(o) * FX.x * float(s - 8 * IX.x);
}
#elif defined(TYPE_Q8_0)
// 34 B / 32: d, qs: i8[32]. Lane t (of 4): qs[8t .. 8t + 8].
const uint L = 4u;
const uint BE = 32u;
void load_x(uint b, uint lane) {
    XA.xy = xq2[4u * b + lane];
    FX.x = xd[b];
}
float block_dot(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 32u) + b) * 34u;
    uvec2 q = u64_at(o + 2u + 8u * lane);
    return f16_at(o) * FX.x * float(sdot(q.x, XA.x) + sdot(q.y, XA.y));
}
#elif defined(TYPE_Q4_K)
// 144 B / 256: d, dmin, scales[12], qs[128]. Lane t (of 8), j = t / 2, h = t % 2:
// qs[32j + 16h .. + 16], elements 64j + 16h .. + 16 (low nibbles, group 2j) and
// 64j + 32 + 16h .. + 16 (high nibbles, group 2j + 1); value d sc n - dmin mn.
const uint L = 8u;
const uint BE = 256u;
void load_x(uint b, uint lane) {
    uint j = lane >> 1;
    uint e = 256u * b + 64u * j + 16u * (lane & 1u);
    XA = xq4[e >> 4];
    XB = xq4[(e + 32u) >> 4];
    float dl = xd[8u * b + 2u * j];
    float dh = xd[8u * b + 2u * j + 1u];
    int sl = sdot(XA.x, ONES) + sdot(XA.y, ONES) + sdot(XA.z, ONES) + sdot(XA.w, ONES);
    int sh = sdot(XB.x, ONES) + sdot(XB.y, ONES) + sdot(XB.z, ONES) + sdot(XB.w, ONES);
    FX = vec4(dl, dh, dl * float(sl), dh * float(sh));
}
float block_dot(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 256u) + b) * 9u; // 16-byte units
    uint j = lane >> 1;
    uvec4 hd = w4[o];
    uvec4 q = w4[o + 1u + 2u * j + (lane & 1u)];
    vec2 dm = unpackHalf2x16(hd.x);
    uint sh = 16u * (j & 1u);
    uint sa = hd.y >> sh;
    uint sb = hd.z >> sh;
    uint sc = hd.w >> sh;
    uint scl = j < 2u ? sa & 0x3f3fu : (sc & 0x0f0fu) | ((sa >> 2) & 0x3030u);
    uint mnl = j < 2u ? sb & 0x3f3fu : ((sc >> 4) & 0x0f0fu) | ((sb >> 2) & 0x3030u);
    int lo = udot(q.x & LO4, XA.x) + udot(q.y & LO4, XA.y)
           + udot(q.z & LO4, XA.z) + udot(q.w & LO4, XA.w);
    int hi = udot((q.x >> 4) & LO4, XB.x) + udot((q.y >> 4) & LO4, XB.y)
           + udot((q.z >> 4) & LO4, XB.z) + udot((q.w >> 4) & LO4, XB.w);
    return dm.x * (float(scl & 255u) * FX.x * float(lo) + float(scl >> 8) * FX.y * float(hi))
         - dm.y * (float(mnl & 255u) * FX.z + float(mnl >> 8) * FX.w);
}
#elif defined(TYPE_Q6_K)
// 210 B / 256: ql[128], qh[64], scales: i8[16], d. Lane t (of 8), n = t / 4,
// l0 = 8 (t % 4): l = l0 .. l0 + 8 of half n, elements 128n + 32m + l (m = 0..3) from
// the nibbles of ql[64n + l] (m = 0, 2) and ql[64n + 32 + l] (m = 1, 3) and bits 2m of
// qh[32n + l]; value d sc[8n + l0 / 16 + 2m] (q - 32).
const uint L = 8u;
const uint BE = 256u;
void load_x(uint b, uint lane) {
    uint n = lane >> 2;
    uint e = 256u * b + 128u * n + 8u * (lane & 3u);
    uvec2 x0 = xq2[e >> 3];
    uvec2 x1 = xq2[(e + 32u) >> 3];
    uvec2 x2 = xq2[(e + 64u) >> 3];
    uvec2 x3 = xq2[(e + 96u) >> 3];
    XA = uvec4(x0, x1);
    XB = uvec4(x2, x3);
    uint db = 8u * b + 4u * n;
    FX = vec4(xd[db], xd[db + 1u], xd[db + 2u], xd[db + 3u]);
    IX = 32 * ivec4(sdot(x0.x, ONES) + sdot(x0.y, ONES), sdot(x1.x, ONES) + sdot(x1.y, ONES),
                    sdot(x2.x, ONES) + sdot(x2.y, ONES), sdot(x3.x, ONES) + sdot(x3.y, ONES));
}
float block_dot(uint row, uint b, uint lane) {
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
    const uint M2 = 0x30303030u;
    int d0 = udot((a.x & LO4) | ((h.x << 4) & M2), XA.x) + udot((a.y & LO4) | ((h.y << 4) & M2), XA.y);
    int d1 = udot((c.x & LO4) | ((h.x << 2) & M2), XA.z) + udot((c.y & LO4) | ((h.y << 2) & M2), XA.w);
    int d2 = udot(((a.x >> 4) & LO4) | (h.x & M2), XB.x) + udot(((a.y >> 4) & LO4) | (h.y & M2), XB.y);
    int d3 = udot(((c.x >> 4) & LO4) | ((h.x >> 2) & M2), XB.z)
           + udot(((c.y >> 4) & LO4) | ((h.y >> 2) & M2), XB.w);
    vec4 v = vec4(ivec4(d0, d1, d2, d3) - IX) * FX;
    return f16_at(o + 208u) * dot(sc, v);
}
#elif defined(TYPE_MXFP4)
// 17 B / 32: e (E8M0), qs[16], nibbles as Q4_0; value 2^(e - 128) KV[n], KV the E2M1
// values doubled (0, 1, 2, 3, 4, 6, 8, 12, then the same negated). Lane t (of 2):
// qs[8t .. 8t + 8]. Blocks start at any byte: words are read with u64_at_byte.
const uint L = 2u;
const uint BE = 32u;
void load_x(uint b, uint lane) {
    uvec2 lo = xq2[4u * b + lane];
    uvec2 hi = xq2[4u * b + 2u + lane];
    XA = uvec4(lo, hi);
    FX.x = xd[b];
}
// The 8 bytes at any byte offset `o`.
uvec2 u64_at_byte(uint o) {
    uint i = o >> 2;
    uint sh = (o & 3u) * 8u;
    uint a = w[i];
    uint b = w[i + 1u];
    uint c = w[i + 2u];
    return uvec2((a >> sh) | ((b << 1u) << (31u - sh)), (b >> sh) | ((c << 1u) << (31u - sh)));
}
// The codes in the low nibbles of v's 4 bytes as 4 signed bytes KV[code].
uint mx4(uint v) {
    uint r = 0u;
    [[unroll]] for (uint i = 0u; i < 4u; i++) {
        uint c = (v >> (8u * i)) & 15u;
        uint m = (0xc8643210u >> (4u * (c & 7u))) & 15u;
        r |= (((c & 8u) != 0u ? 256u - m : m) & 255u) << (8u * i);
    }
    return r;
}
float block_dot(uint row, uint b, uint lane) {
    uint o = (row * (p.k / 32u) + b) * 17u;
    uint e = byte_at(o);
    float d = uintBitsToFloat(e < 2u ? 0x00200000u << e : (e - 1u) << 23);
    uvec2 q = u64_at_byte(o + 1u + 8u * lane);
    int s = sdot(mx4(q.x & LO4), XA.x) + sdot(mx4(q.y & LO4), XA.y)
          + sdot(mx4((q.x >> 4) & LO4), XA.z) + sdot(mx4((q.y >> 4) & LO4), XA.w);
    return d * FX.x * float(s);
}
#else
#error "no TYPE_* defined"
#endif

shared float red_mv[(MAXR + 1u) * WG];

// Four values times id, rounded to int8 (as quant_x.comp) and packed into one word.
uint q8_word(vec4 v, float id) {
    ivec4 t = clamp(ivec4(roundEven(v * id)), ivec4(-127), ivec4(127));
    uvec4 u = uvec4(t) & 255u;
    return u.x | (u.y << 8) | (u.z << 16) | (u.w << 24);
}

// MV_TAIL, by the invocation that stored output o: counts it into its block of 32; the
// invocation whose count completes the block (and resets it) quantizes the block for
// the next mat-vec. No workgroup barrier: the other invocations are done.
void tail_one(uint o) {
    uint b = o / 32u;
    if (32u * b >= p.n_next) {
        return;
    }
    memoryBarrierBuffer();
    if (atomicAdd(cnt[b], 1u) != 31u) {
        return;
    }
    cnt[b] = 0u;
    memoryBarrierBuffer();
    bool norm = (p.flags & MV_TAIL_NORM) != 0u;
    vec4 v[8];
    float ss = 0.0;
    float amax = 0.0;
    [[unroll]] for (uint i = 0u; i < 8u; i++) {
        v[i] = y4[8u * b + i];
    }
    [[unroll]] for (uint i = 0u; i < 8u; i++) {
        ss += dot(v[i], v[i]);
        if (norm) {
            v[i] *= ngam4[8u * b + i];
        }
        vec4 av = abs(v[i]);
        amax = max(amax, max(max(av.x, av.y), max(av.z, av.w)));
    }
    float id = amax > 0.0 ? 127.0 / amax : 0.0;
    [[unroll]] for (uint i = 0u; i < 8u; i++) {
        nq[8u * b + i] = q8_word(v[i], id);
    }
    nd[b] = amax / 127.0;
    if (norm) {
        nss[b] = ss;
    }
}

// Sums a[0 .. NR] and, as slot MAXR, `extra` over the workgroup.
void reduce_rows(inout float a[MAXR], inout float extra) {
#if USE_SUBGROUP
    [[unroll]] for (uint j = 0u; j < MAXR; j++) {
        if (j < NR) {
            a[j] = subgroupAdd(a[j]);
        }
    }
    extra = subgroupAdd(extra);
    if (subgroupElect()) {
        [[unroll]] for (uint j = 0u; j < MAXR; j++) {
            if (j < NR) {
                red_mv[j * WG + gl_SubgroupID] = a[j];
            }
        }
        red_mv[MAXR * WG + gl_SubgroupID] = extra;
    }
    barrier();
    [[unroll]] for (uint j = 0u; j < MAXR; j++) {
        if (j < NR) {
            float s = 0.0;
            for (uint i = 0u; i < gl_NumSubgroups; i++) {
                s += red_mv[j * WG + i];
            }
            a[j] = s;
        }
    }
    float e = 0.0;
    for (uint i = 0u; i < gl_NumSubgroups; i++) {
        e += red_mv[MAXR * WG + i];
    }
    extra = e;
#else
    uint t = gl_LocalInvocationID.x;
    [[unroll]] for (uint j = 0u; j < MAXR; j++) {
        if (j < NR) {
            red_mv[j * WG + t] = a[j];
        }
    }
    red_mv[MAXR * WG + t] = extra;
    barrier();
    for (uint hs = WG / 2u; hs > 0u; hs >>= 1) {
        if (t < hs) {
            [[unroll]] for (uint j = 0u; j < MAXR; j++) {
                if (j < NR) {
                    red_mv[j * WG + t] += red_mv[j * WG + t + hs];
                }
            }
            red_mv[MAXR * WG + t] += red_mv[MAXR * WG + t + hs];
        }
        barrier();
    }
    [[unroll]] for (uint j = 0u; j < MAXR; j++) {
        if (j < NR) {
            a[j] = red_mv[j * WG];
        }
    }
    extra = red_mv[MAXR * WG];
#endif
}

#if USE_SUBGROUP
shared float blk_y[32];
// The block tail of the subgroup-per-output layouts (MV_BLK below, MV_BLKT in
// mvq_expert.glsl), after the workgroup's stores and a barrier: the block of 32 outputs
// that holds the workgroup's ROWS, from y index o0 (`whole`: all ROWS of them stored),
// quantized as tail_one does by subgroup 0 (subgroups have at least 8 lanes where these
// layouts run), lane l taking values 4l .. 4l + 4: the workgroup's own 32 (ROWS = 32,
// from blk_y) or, read back, the block's 32 / ROWS workgroups' outputs by the one whose
// count completes it.
void block_tail(uint o0, bool whole) {
    uint ln = gl_SubgroupInvocationID;
    if (gl_SubgroupID != 0u || !whole || o0 >= p.n_next) {
        return;
    }
    uint b = o0 / 32u;
    bool norm = (p.flags & MV_TAIL_NORM) != 0u;
    bool mine = ln < 8u;
    vec4 v = vec4(0.0);
    if (ROWS == 32u) {
        if (mine) {
            v = vec4(blk_y[4u * ln], blk_y[4u * ln + 1u], blk_y[4u * ln + 2u], blk_y[4u * ln + 3u]);
        }
    } else {
        uint old = 0u;
        if (subgroupElect()) {
            old = atomicAdd(cnt[b], 1u) + 1u;
        }
        if (subgroupMax(old) != 32u / ROWS) {
            return;
        }
        if (subgroupElect()) {
            cnt[b] = 0u;
        }
        memoryBarrierBuffer();
        if (mine) {
            v = y4[8u * b + ln];
        }
    }
    float ss = subgroupAdd(dot(v, v));
    if (norm && mine) {
        v *= ngam4[8u * b + ln];
    }
    vec4 av = abs(v);
    float amax = subgroupMax(max(max(av.x, av.y), max(av.z, av.w)));
    float id = amax > 0.0 ? 127.0 / amax : 0.0;
    if (mine) {
        nq[8u * b + ln] = q8_word(v, id);
    }
    if (ln == 0u) {
        nd[b] = amax / 127.0;
        if (norm) {
            nss[b] = ss;
        }
    }
}
#endif

#if defined(MV_EXPERT)
#include "mvq_expert.glsl"
#else
#if USE_SUBGROUP
// Specialization constant 3 (MV_SG, `CALDERA_VK_MV_SG=1`): a subgroup per output
// instead of the whole workgroup per ROWS outputs. Output j of the workgroup's ROWS
// belongs to subgroup j % (subgroups); that subgroup's lanes sweep its row (both rows
// of a gate/up pair) L lanes per block, and one subgroupAdd finishes it: no shared
// memory, no barrier, and every lane busy on rows whose block count is not a multiple
// of the workgroup's block slots. A subgroup holds SG_ACC weight rows at once; a
// workgroup with more outputs than its subgroups hold sweeps them in rounds.
layout(constant_id = 3) const uint MV_SG = 0u;
// Specialization constant 11: blocks per lane and step (`Tuning::mv_unroll`).
layout(constant_id = 11) const uint MV_UNR = 2u;
// Specialization constant 12 (MV_BLK, with MV_SG; `Tuning::mv_block`): MV_TAIL by
// workgroup rather than by output. The workgroup's ROWS outputs (ROWS divides 32) lie in
// one block of 32 of the next mat-vec's input; with ROWS = 32 the workgroup quantizes
// its block itself (the outputs through shared memory, one barrier, no atomic); with
// fewer, one atomic per workgroup counts the block's workgroups and the one completing
// it quantizes it (one count and fence per workgroup instead of per output). The host
// launches it only where every workgroup's outputs lie in one block (`ops::Mvq`).
layout(constant_id = 12) const uint MV_BLK = 0u;
const uint SG_ACC = MAXR; // weight rows per subgroup at most
void main_sg() {
    uint grp = flat_group();
    uint sg = gl_SubgroupID;
    uint nsg = gl_NumSubgroups;
    uint ln = gl_SubgroupInvocationID;
    uint last = p.rows - 1u;
    const uint PER = MVG != 0 ? 2u : 1u;
    const uint OPS = SG_ACC / PER; // outputs per subgroup and round
    uint lane = ln % L;
    uint slots = gl_SubgroupSize / L;
    uint nb = p.k / BE;
    bool xnorm = (p.flags & MV_XNORM) != 0u;
    bool tail = (p.flags & MV_TAIL) != 0u;
    bool blk = MV_BLK != 0u;
    const uint XPB = BE / 32u;
    for (uint j0 = 0u; j0 < ROWS; j0 += OPS * nsg) {
        float a[SG_ACC];
        [[unroll]] for (uint r = 0u; r < SG_ACC; r++) {
            a[r] = 0.0;
        }
        float ss = 0.0;
        // MV_UNR blocks per lane and step, the later ones' loads issued before the first's
        // arithmetic (a lane past the row's end repeats the last block, weighted 0): long
        // rows are one lane's chain of dependent round trips otherwise.
        for (uint b0 = ln / L; b0 < nb; b0 += MV_UNR * slots) {
            [[unroll]] for (uint u = 0u; u < MV_UNR; u++) {
                uint b = min(b0 + u * slots, nb - 1u);
                float live = b0 + u * slots < nb ? 1.0 : 0.0;
                load_x(b, lane);
                if (xnorm && lane < XPB) {
                    ss += live * xs[b * XPB + lane];
                }
                [[unroll]] for (uint i = 0u; i < OPS; i++) {
                    uint j = j0 + sg + i * nsg;
                    if (j < ROWS) {
                        [[unroll]] for (uint t = 0u; t < PER; t++) {
                            a[i * PER + t] += live * block_dot(min(grp * NR + PER * j + t, last), b, lane);
                        }
                    }
                }
            }
        }
        [[unroll]] for (uint r = 0u; r < SG_ACC; r++) {
            if (j0 + sg + (r / PER) * nsg < ROWS) {
                a[r] = subgroupAdd(a[r]);
            }
        }
        ss = subgroupAdd(ss);
        if (subgroupElect()) {
            float inv = xnorm ? inversesqrt(ss / float(p.k) + p.eps) : 1.0;
            [[unroll]] for (uint i = 0u; i < OPS; i++) {
                uint j = j0 + sg + i * nsg;
                uint row = grp * NR + PER * j;
                if (j < ROWS && row + PER - 1u <= last) {
                    uint o = grp * ROWS + j;
#if MVG
                    float g = a[2u * i] * inv;
                    float act = (p.flags & MV_GELU) != 0u ? gelu_tanh(g) : silu(g);
                    float v = store(o, act * a[2u * i + 1u] * inv);
#else
                    float v = store(o, a[i] * inv);
#endif
                    if (blk && ROWS == 32u) {
                        blk_y[j] = v;
                    } else if (blk && (p.flags & MV_DBG_NOFENCE) == 0u) {
                        memoryBarrierBuffer();
                    } else if (tail) {
                        tail_one(p.y_offset + o);
                    }
                }
            }
        }
    }
    if (!blk || !tail || (p.flags & MV_DBG_NOTAIL) != 0u) {
        return;
    }
    barrier();
    uint o0 = p.y_offset + grp * ROWS;
    block_tail(o0, 32u % ROWS == 0u && o0 % ROWS == 0u && grp * NR + NR - 1u <= last);
}
#endif

void main() {
#if USE_SUBGROUP
    if (MV_SG != 0u) {
        main_sg();
        return;
    }
#endif
    uint grp = flat_group();
    uint tid = gl_LocalInvocationID.x;
    uint row0 = grp * NR;
    uint last = p.rows - 1u;
    float a[MAXR];
    [[unroll]] for (uint r = 0u; r < MAXR; r++) {
        a[r] = 0.0;
    }
    const uint SLOTS = WG / L;
    uint lane = tid % L;
    uint nb = p.k / BE;
    // MV_XNORM: the input's per-block sums of squares, each summed by one lane.
    bool xnorm = (p.flags & MV_XNORM) != 0u;
    const uint XPB = BE / 32u;
    float ss = 0.0;
    for (uint b = tid / L; b < nb; b += SLOTS) {
        load_x(b, lane);
        if (xnorm && lane < XPB) {
            ss += xs[b * XPB + lane];
        }
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            if (r < NR) {
                a[r] += block_dot(min(row0 + r, last), b, lane);
            }
        }
    }
    reduce_rows(a, ss);
    if (xnorm) {
        float inv = inversesqrt(ss / float(p.k) + p.eps);
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            a[r] *= inv;
        }
    }
    bool tail = (p.flags & MV_TAIL) != 0u;
#if MVG
    [[unroll]] for (uint i = 0u; i < MAXR / 2u; i++) {
        if (i < ROWS && tid == i && row0 + 2u * i + 1u <= last) {
            float g = a[2u * i];
            float act = (p.flags & MV_GELU) != 0u ? gelu_tanh(g) : silu(g);
            store(grp * ROWS + i, act * a[2u * i + 1u]);
            if (tail) {
                tail_one(p.y_offset + grp * ROWS + i);
            }
        }
    }
#else
    [[unroll]] for (uint r = 0u; r < MAXR; r++) {
        if (r < NR && tid == r && row0 + r <= last) {
            store(row0 + r, a[r]);
            if (tail) {
                tail_one(p.y_offset + row0 + r);
            }
        }
    }
#endif
}
#endif
