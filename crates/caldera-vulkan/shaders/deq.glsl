// dot32(row, sb, xb): the dot product of elements 32 sb .. 32 sb + 32 of weight row
// `row` with the input of the token whose x row starts at xb (xin in mm.glsl).
// One section per GGML type, chosen by the TYPE_* define of the including kernel.
// Block layouts (little-endian, f16 scales):
//   Q4_0 18 B / 32: d, qs[16]; element i < 16 = low nibble of qs[i], i + 16 = high;
//        value d (q - 8).     Q4_1 20 B: d, m, qs[16]; value d q + m.
//   Q5_0 22 B: d, qh: u32, qs[16]; bit i of qh is bit 4 of element i; value d (q - 16).
//   Q5_1 24 B: d, m, qh, qs[16]; value d q + m.       Q8_0 34 B: d, qs: i8[32].
//   Q4_K 144 B / 256: d, dmin, scales[12], qs[128]; group g of 32 (6-bit scale, min)
//        is the low (g even) or high nibble of qs[32 (g / 2) ..]; value d sc q - dmin mn.
//   Q5_K 176 B: d, dmin, scales[12], qh[32], qs[128]; as Q4_K plus bit g of qh[l].
//   Q6_K 210 B: ql[128], qh[64], scales: i8[16], d; see the section below.
//   IQ4_XS 136 B: d, scales_h: u16, scales_l[4], qs[128]; group g: 6-bit scale - 32,
//        values from the IQ4_NL table.
// Rows of float types need not be whole 32-element groups.

#if defined(TYPE_F32)
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint base = row * p.k;
    [[unroll]] for (uint e = 0u; e < 32u; e++) {
        uint c = sb * 32u + e;
        if (c < p.k) {
            s += (uintBitsToFloat(w[base + c])) * xin(xb, c);
        }
    }
    return s;
}
#elif defined(TYPE_F16)
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint base = row * p.k;
    [[unroll]] for (uint e = 0u; e < 32u; e++) {
        uint c = sb * 32u + e;
        if (c < p.k) {
            s += (f16_at(2u * (base + c))) * xin(xb, c);
        }
    }
    return s;
}
#elif defined(TYPE_BF16)
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint base = row * p.k;
    [[unroll]] for (uint e = 0u; e < 32u; e++) {
        uint c = sb * 32u + e;
        if (c < p.k) {
            s += (uintBitsToFloat(u16_at(2u * (base + c)) << 16)) * xin(xb, c);
        }
    }
    return s;
}
#elif defined(TYPE_Q4_0) || defined(TYPE_Q4_1)
#if defined(TYPE_Q4_0)
const uint BB = 18u;
const uint QS = 2u;
#else
const uint BB = 20u;
const uint QS = 4u;
#endif
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint o = (row * (p.k / 32u) + sb) * BB;
    float d = f16_at(o);
#if defined(TYPE_Q4_0)
    float m = -8.0 * d;
#else
    float m = f16_at(o + 2u);
#endif
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = u32_at(o + QS + 4u * j);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint b = (q >> (8u * t)) & 0xffu;
            s += (d * float(b & 15u) + m) * xin(xb, c0 + 4u * j + t);
            s += (d * float(b >> 4) + m) * xin(xb, c0 + 4u * j + t + 16u);
        }
    }
    return s;
}
#elif defined(TYPE_Q5_0) || defined(TYPE_Q5_1)
#if defined(TYPE_Q5_0)
const uint BB = 22u;
const uint QH = 2u;
#else
const uint BB = 24u;
const uint QH = 4u;
#endif
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint o = (row * (p.k / 32u) + sb) * BB;
    float d = f16_at(o);
#if defined(TYPE_Q5_0)
    float m = -16.0 * d;
#else
    float m = f16_at(o + 2u);
#endif
    uint qh = u32_at(o + QH);
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = u32_at(o + QH + 4u + 4u * j);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint i = 4u * j + t;
            uint b = (q >> (8u * t)) & 0xffu;
            s += (d * float((b & 15u) | (((qh >> i) & 1u) << 4)) + m) * xin(xb, c0 + i);
            s += (d * float((b >> 4) | (((qh >> (i + 16u)) & 1u) << 4)) + m) * xin(xb, c0 + i + 16u);
        }
    }
    return s;
}
#elif defined(TYPE_Q8_0)
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint o = (row * (p.k / 32u) + sb) * 34u;
    float d = f16_at(o);
    [[unroll]] for (uint j = 0u; j < 8u; j++) {
        int q = int(u32_at(o + 2u + 4u * j));
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            s += (d * float(bitfieldExtract(q, int(8u * t), 8))) * xin(xb, c0 + 4u * j + t);
        }
    }
    return s;
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
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint o = (row * (p.k / 256u) + sb / 8u) * BB;
    uint g = sb & 7u;
    vec2 dm = unpackHalf2x16(w[o >> 2]);
    uvec2 sm = scale_min_k4(g, o + 4u);
    float d = dm.x * float(sm.x);
    float m = dm.y * float(sm.y);
    uint shift = 4u * (g & 1u);
    uint qo = o + QS + 32u * (g >> 1);
    [[unroll]] for (uint j = 0u; j < 8u; j++) {
        uint q = w[(qo >> 2) + j];
#if defined(TYPE_Q5_K)
        uint h = w[((o + 16u) >> 2) + j];
#endif
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint b = (q >> (8u * t + shift)) & 15u;
#if defined(TYPE_Q5_K)
            b |= ((h >> (8u * t + g)) & 1u) << 4;
#endif
            s += (d * float(b) - m) * xin(xb, c0 + 4u * j + t);
        }
    }
    return s;
}
#elif defined(TYPE_Q6_K)
// Element e = 128 n + 32 c + l of a block: nibble (c / 2) of ql[64 n + 32 (c & 1) + l]
// with bits 2c..2c+2 of qh[32 n + l] on top, minus 32; scale index e / 16.
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint o = (row * (p.k / 256u) + sb / 8u) * 210u;
    uint g = sb & 7u;
    uint n = g >> 2;
    uint c = g & 3u;
    uint ql = o + 64u * n + 32u * (c & 1u);
    uint qh = o + 128u + 32u * n;
    uint shift = 4u * (c >> 1);
    float d = f16_at(o + 208u);
    uint si = o + 192u + 8u * n + 2u * c;
    float d0 = d * float(bitfieldExtract(int(byte_at(si)), 0, 8));
    float d1 = d * float(bitfieldExtract(int(byte_at(si + 1u)), 0, 8));
    [[unroll]] for (uint j = 0u; j < 8u; j++) {
        uint lo = u32_at(ql + 4u * j);
        uint hi = u32_at(qh + 4u * j);
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint q = ((lo >> (8u * t + shift)) & 15u) | (((hi >> (8u * t + 2u * c)) & 3u) << 4);
            s += ((j < 4u ? d0 : d1) * (float(q) - 32.0)) * xin(xb, c0 + 4u * j + t);
        }
    }
    return s;
}
#elif defined(TYPE_IQ4_XS)
const float KV_IQ4NL[16] = float[16](-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
                                     1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0);
float dot32(uint row, uint sb, uint xb) {
    uint c0 = sb * 32u;
    float s = 0.0;
    uint o = (row * (p.k / 256u) + sb / 8u) * 136u;
    uint g = sb & 7u;
    float d = f16_at(o);
    uint sh = u16_at(o + 2u);
    uint ls = ((byte_at(o + 4u + g / 2u) >> (4u * (g & 1u))) & 15u) | (((sh >> (2u * g)) & 3u) << 4);
    float dl = d * (float(ls) - 32.0);
    uint qo = o + 8u + 16u * g;
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        uint q = w[(qo >> 2) + j];
        [[unroll]] for (uint t = 0u; t < 4u; t++) {
            uint b = (q >> (8u * t)) & 0xffu;
            s += (dl * KV_IQ4NL[b & 15u]) * xin(xb, c0 + 4u * j + t);
            s += (dl * KV_IQ4NL[b >> 4]) * xin(xb, c0 + 4u * j + t + 16u);
        }
    }
    return s;
}
#else
#error "no TYPE_* defined"
#endif
