// deq16(row, sb, h, v): elements 32 sb + 16 h .. 32 sb + 16 h + 16 of weight row `row`,
// dequantized into v (the tiled matmul's weight tile loader, mmt.glsl). Elements at or
// past k (float types only: their rows need not be whole 32-element groups) are 0.
// One section per GGML type, chosen by the TYPE_* define of the including kernel; the
// block layouts are those listed in deq.glsl, whose dot32 reads the same bits.
// Needs `w` (the weight words), `p.k` and the word readers of words.glsl.

#if defined(TYPE_F32) || defined(TYPE_F16) || defined(TYPE_BF16)
void deq16(uint row, uint sb, uint h, out float v[16]) {
    uint base = row * p.k;
    uint c0 = sb * 32u + h * 16u;
    [[unroll]] for (uint e = 0u; e < 16u; e++) {
        uint c = c0 + e;
        float f = 0.0;
        if (c < p.k) {
#if defined(TYPE_F32)
            f = uintBitsToFloat(w[base + c]);
#elif defined(TYPE_F16)
            f = f16_at(2u * (base + c));
#else
            f = uintBitsToFloat(u16_at(2u * (base + c)) << 16);
#endif
        }
        v[e] = f;
    }
}
#elif defined(TYPE_Q4_0) || defined(TYPE_Q4_1)
#if defined(TYPE_Q4_0)
const uint BB = 18u;
const uint QS = 2u;
#else
const uint BB = 20u;
const uint QS = 4u;
#endif
// Element i < 16 is the low nibble of qs[i], i + 16 the high one: half h is nibble h of
// all 16 bytes.
void deq16(uint row, uint sb, uint h, out float v[16]) {
    uint o = (row * (p.k / 32u) + sb) * BB;
    float d = f16_at(o);
#if defined(TYPE_Q4_0)
    float m = -8.0 * d;
#else
    float m = f16_at(o + 2u);
#endif
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = u32_at(o + QS + 4u * j) >> (4u * h);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            v[4u * j + t] = d * float((q >> (8u * t)) & 15u) + m;
        }
    }
}
#elif defined(TYPE_Q5_0) || defined(TYPE_Q5_1)
#if defined(TYPE_Q5_0)
const uint BB = 22u;
const uint QH = 2u;
#else
const uint BB = 24u;
const uint QH = 4u;
#endif
void deq16(uint row, uint sb, uint h, out float v[16]) {
    uint o = (row * (p.k / 32u) + sb) * BB;
    float d = f16_at(o);
#if defined(TYPE_Q5_0)
    float m = -16.0 * d;
#else
    float m = f16_at(o + 2u);
#endif
    // Bit i of qh is bit 4 of element i.
    uint qh = u32_at(o + QH) >> (16u * h);
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = u32_at(o + QH + 4u + 4u * j) >> (4u * h);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint i = 4u * j + t;
            uint b = ((q >> (8u * t)) & 15u) | (((qh >> i) & 1u) << 4);
            v[i] = d * float(b) + m;
        }
    }
}
#elif defined(TYPE_Q8_0)
void deq16(uint row, uint sb, uint h, out float v[16]) {
    uint o = (row * (p.k / 32u) + sb) * 34u;
    float d = f16_at(o);
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        int q = int(u32_at(o + 2u + 16u * h + 4u * j));
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            v[4u * j + t] = d * float(bitfieldExtract(q, int(8u * t), 8));
        }
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
// Six-bit scale and min of group g (0..8); `s` is the byte offset of scales[0].
uvec2 scale_min_k4(uint g, uint s) {
    if (g < 4u) {
        return uvec2(byte_at(s + g) & 63u, byte_at(s + g + 4u) & 63u);
    }
    uint a = byte_at(s + g + 4u);
    return uvec2((a & 15u) | ((byte_at(s + g - 4u) >> 6) << 4),
                 (a >> 4) | ((byte_at(s + g) >> 6) << 4));
}
// Group g of a block: nibble (g & 1) of qs[32 (g / 2) + l], l < 32 (Q5_K: bit g of
// qh[l] on top); blocks are 4-byte aligned.
void deq16(uint row, uint sb, uint h, out float v[16]) {
    uint o = (row * (p.k / 256u) + sb / 8u) * BB;
    uint g = sb & 7u;
    vec2 dm = unpackHalf2x16(w[o >> 2]);
    uvec2 sm = scale_min_k4(g, o + 4u);
    float d = dm.x * float(sm.x);
    float m = dm.y * float(sm.y);
    uint qo = (o + QS + 32u * (g >> 1) + 16u * h) >> 2;
    uint shift = 4u * (g & 1u);
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = w[qo + j] >> shift;
#if defined(TYPE_Q5_K)
        uint hb = w[((o + 16u + 16u * h) >> 2) + j] >> g;
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
// with bits 2c..2c+2 of qh[32 n + l] on top, minus 32; scale index e / 16 (so one per
// half group).
void deq16(uint row, uint sb, uint h, out float v[16]) {
    uint o = (row * (p.k / 256u) + sb / 8u) * 210u;
    uint g = sb & 7u;
    uint n = g >> 2;
    uint c = g & 3u;
    uint ql = o + 64u * n + 32u * (c & 1u) + 16u * h;
    uint qh = o + 128u + 32u * n + 16u * h;
    uint shift = 4u * (c >> 1);
    float d = f16_at(o + 208u);
    float sc = d * float(bitfieldExtract(int(byte_at(o + 192u + 8u * n + 2u * c + h)), 0, 8));
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint lo = u32_at(ql + 4u * j) >> shift;
        uint hi = u32_at(qh + 4u * j) >> (2u * c);
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
void deq16(uint row, uint sb, uint h, out float v[16]) {
    uint o = (row * (p.k / 256u) + sb / 8u) * 136u;
    uint g = sb & 7u;
    float d = f16_at(o);
    uint sh = u16_at(o + 2u);
    uint ls = ((byte_at(o + 4u + g / 2u) >> (4u * (g & 1u))) & 15u) | (((sh >> (2u * g)) & 3u) << 4);
    float dl = d * (float(ls) - 32.0);
    uint qo = (o + 8u + 16u * g) >> 2;
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = w[qo + j] >> (4u * h);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            v[4u * j + t] = dl * KV_IQ4NL[(q >> (8u * t)) & 15u];
        }
    }
}
#else
#error "no TYPE_* defined"
#endif
