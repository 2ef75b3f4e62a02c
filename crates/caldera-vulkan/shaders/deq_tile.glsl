// The tiled matmul's weight tile loader (mmt.glsl), in two halves so that all of a
// step's loads are in flight before the first is used:
//   fetch16(row, sb, h, r):  the words of weight row `row` that hold elements
//                            32 sb + 16 h .. + 16 (quants and their block's scales), raw;
//   decode16(r, sb, h, v):   those 16 elements dequantized into v.
// r[0..4]: the 16 bytes of quants; r[4..8]: high bits (Q5_K, Q6_K); r[8..12]: scales.
// Float types keep one element per word (0 at or past k: their rows need not be whole
// 32-element groups). One section per GGML type, chosen by the TYPE_* define of the
// including kernel; the block layouts are those listed in deq.glsl, whose dot32 reads
// the same bits. Needs `w` (the weight words; `w4`: the same as uvec4s), `p.k` and the
// word readers of words.glsl.

#if defined(TYPE_F32) || defined(TYPE_F16) || defined(TYPE_BF16)
void fetch16(uint row, uint sb, uint h, out uint r[16]) {
    uint base = row * p.k;
    uint c0 = sb * 32u + h * 16u;
    [[unroll]] for (uint e = 0u; e < 16u; e++) {
        uint c = c0 + e;
        uint v = 0u;
        if (c < p.k) {
#if defined(TYPE_F32)
            v = w[base + c];
#else
            v = u16_at(2u * (base + c));
#endif
        }
        r[e] = v;
    }
}
void decode16(uint r[16], uint sb, uint h, out float v[16]) {
    [[unroll]] for (uint e = 0u; e < 16u; e++) {
#if defined(TYPE_F32)
        v[e] = uintBitsToFloat(r[e]);
#elif defined(TYPE_F16)
        v[e] = unpackHalf2x16(r[e]).x;
#else
        v[e] = uintBitsToFloat(r[e] << 16);
#endif
    }
}
#elif defined(TYPE_Q4_0) || defined(TYPE_Q4_1) || defined(TYPE_Q5_0) || defined(TYPE_Q5_1) || defined(TYPE_Q8_0)
#if defined(TYPE_Q4_0)
const uint BB = 18u;
const uint QS = 2u;
#elif defined(TYPE_Q4_1)
const uint BB = 20u;
const uint QS = 4u;
#elif defined(TYPE_Q5_0)
const uint BB = 22u;
const uint QS = 6u;
#elif defined(TYPE_Q5_1)
const uint BB = 24u;
const uint QS = 8u;
#else
const uint BB = 34u;
const uint QS = 2u;
#endif
// Q4 / Q5: element i < 16 is the low nibble of qs[i], i + 16 the high one (half h is
// nibble h of all 16 bytes); Q5: bit i of qh (the word before qs) is bit 4 of element
// i. Q8_0: half h is bytes 16 h .. of qs. r[8]: d (| m << 16), r[9]: qh.
void fetch16(uint row, uint sb, uint h, out uint r[16]) {
    uint o = (row * (p.k / 32u) + sb) * BB;
#if defined(TYPE_Q8_0)
    uint qo = o + QS + 16u * h;
#else
    uint qo = o + QS;
#endif
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        r[j] = u32_at(qo + 4u * j);
    }
    r[8] = u32_at(o);
#if defined(TYPE_Q5_0) || defined(TYPE_Q5_1)
    r[9] = u32_at(qo - 4u);
#endif
}
void decode16(uint r[16], uint sb, uint h, out float v[16]) {
    vec2 dm = unpackHalf2x16(r[8]);
    float d = dm.x;
#if defined(TYPE_Q4_0)
    float m = -8.0 * d;
#elif defined(TYPE_Q5_0)
    float m = -16.0 * d;
#elif defined(TYPE_Q4_1) || defined(TYPE_Q5_1)
    float m = dm.y;
#endif
#if defined(TYPE_Q5_0) || defined(TYPE_Q5_1)
    uint qh = r[9] >> (16u * h);
#endif
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
#if defined(TYPE_Q8_0)
        int q = int(r[j]);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            v[4u * j + t] = d * float(bitfieldExtract(q, int(8u * t), 8));
        }
#else
        uint q = r[j] >> (4u * h);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint b = (q >> (8u * t)) & 15u;
#if defined(TYPE_Q5_0) || defined(TYPE_Q5_1)
            b |= ((qh >> (4u * j + t)) & 1u) << 4;
#endif
            v[4u * j + t] = d * float(b) + m;
        }
#endif
    }
}
#elif defined(TYPE_Q4_K) || defined(TYPE_Q5_K)
#if defined(TYPE_Q4_K)
const uint BB = 144u;
const uint QS = 16u;
#else
const uint BB = 176u;
const uint QS = 48u;
#endif
// Group g of a block: nibble (g & 1) of qs[32 (g / 2) + l], l < 32 (Q5_K: bit g of
// qh[l] on top); blocks (144, 176 bytes) and their fields are 16-byte aligned, read as
// uvec4s (w4). r[8]: d | dmin << 16, r[9..12]: scales[12].
void fetch16(uint row, uint sb, uint h, out uint r[16]) {
    uint o = (row * (p.k / 256u) + sb / 8u) * BB;
    uint g = sb & 7u;
    uvec4 q = w4[(o + QS + 32u * (g >> 1) + 16u * h) >> 4];
    uvec4 hd = w4[o >> 4];
#if defined(TYPE_Q5_K)
    uvec4 qh = w4[(o + 16u + 16u * h) >> 4];
#endif
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        r[j] = q[j];
        r[8u + j] = hd[j];
#if defined(TYPE_Q5_K)
        r[4u + j] = qh[j];
#endif
    }
}
// Byte i of scales[12].
uint scale_byte(uint r[16], uint i) {
    uint wd = i < 4u ? r[9] : (i < 8u ? r[10] : r[11]);
    return (wd >> (8u * (i & 3u))) & 0xffu;
}
// Group g's 6-bit scale and min.
void scale_min(uint r[16], uint g, out uint sc, out uint mn) {
    if (g < 4u) {
        sc = scale_byte(r, g) & 63u;
        mn = scale_byte(r, g + 4u) & 63u;
    } else {
        uint a = scale_byte(r, g + 4u);
        sc = (a & 15u) | ((scale_byte(r, g - 4u) >> 6) << 4);
        mn = (a >> 4) | ((scale_byte(r, g) >> 6) << 4);
    }
}
void decode16(uint r[16], uint sb, uint h, out float v[16]) {
    uint g = sb & 7u;
    vec2 dm = unpackHalf2x16(r[8]);
    uint sc;
    uint mn;
    scale_min(r, g, sc, mn);
    float d = dm.x * float(sc);
    float m = dm.y * float(mn);
    uint shift = 4u * (g & 1u);
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = r[j] >> shift;
#if defined(TYPE_Q5_K)
        uint hb = r[4u + j] >> g;
#endif
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint b = (q >> (8u * t)) & 15u;
#if defined(TYPE_Q5_K)
            b |= ((hb >> (8u * t)) & 1u) << 4;
#endif
            v[4u * j + t] = d * float(b) - m;
        }
    }
}
#elif defined(TYPE_Q6_K)
// Element e = 128 n + 32 c + l of a block: nibble (c / 2) of ql[64 n + 32 (c & 1) + l]
// with bits 2c..2c+2 of qh[32 n + l] on top, minus 32; scale index e / 16 (one per half
// group). r[0..4]: ql, r[4..8]: qh, r[8]: d, r[9]: the scale byte.
void fetch16(uint row, uint sb, uint h, out uint r[16]) {
    uint o = (row * (p.k / 256u) + sb / 8u) * 210u;
    uint g = sb & 7u;
    uint n = g >> 2;
    uint c = g & 3u;
    uint ql = o + 64u * n + 32u * (c & 1u) + 16u * h;
    uint qh = o + 128u + 32u * n + 16u * h;
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        r[j] = u32_at(ql + 4u * j);
        r[4u + j] = u32_at(qh + 4u * j);
    }
    r[8] = u16_at(o + 208u);
    r[9] = byte_at(o + 192u + 8u * n + 2u * c + h);
}
void decode16(uint r[16], uint sb, uint h, out float v[16]) {
    uint c = sb & 3u;
    uint shift = 4u * (c >> 1);
    float sc = unpackHalf2x16(r[8]).x * float(bitfieldExtract(int(r[9]), 0, 8));
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint lo = r[j] >> shift;
        uint hi = r[4u + j] >> (2u * c);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint q = ((lo >> (8u * t)) & 15u) | (((hi >> (8u * t)) & 3u) << 4);
            v[4u * j + t] = sc * (float(q) - 32.0);
        }
    }
}
#elif defined(TYPE_IQ4_XS)
const float KV_IQ4NL[16] = float[16](-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
                                     1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0);
// Group g: element i < 16 is the low nibble of qs[16 g + i], i + 16 the high one.
// r[8]: d | scales_h << 16, r[9]: scales_l[4].
void fetch16(uint row, uint sb, uint h, out uint r[16]) {
    uint o = (row * (p.k / 256u) + sb / 8u) * 136u;
    uint g = sb & 7u;
    uint qo = (o + 8u + 16u * g) >> 2;
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        r[j] = w[qo + j];
    }
    r[8] = w[o >> 2];
    r[9] = w[(o >> 2) + 1u];
}
void decode16(uint r[16], uint sb, uint h, out float v[16]) {
    uint g = sb & 7u;
    float d = unpackHalf2x16(r[8]).x;
    uint sh = r[8] >> 16;
    uint ls = ((r[9] >> (8u * (g / 2u) + 4u * (g & 1u))) & 15u) | (((sh >> (2u * g)) & 3u) << 4);
    float dl = d * (float(ls) - 32.0);
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = r[j] >> (4u * h);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            v[4u * j + t] = dl * KV_IQ4NL[(q >> (8u * t)) & 15u];
        }
    }
}
#else
#error "no TYPE_* defined"
#endif
