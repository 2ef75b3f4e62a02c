#version 450
// Q6_K (210 B / 256 elements): ql[128], qh[64], scales: [i8; 16], d: f16. Element
// e = 128n + 32c + l: nibble c / 2 (low, high) of ql[64n + 32(c & 1) + l], with bits
// 2c..2c+2 of qh[32n + l] on top, minus 32; group e / 16; value d * scales[g] * q.
// One invocation step covers one (block, n, c): 32 elements.
#include "matvec_head.glsl"

float row_dot(uint row, uint tid) {
    uint nb = p.k / 256u;
    uint base = row * nb * 210u;
    float acc = 0.0;
    for (uint u = tid; u < nb * 8u; u += WG) {
        uint b = u >> 3;
        uint n = (u >> 2) & 1u;
        uint c = u & 3u;
        uint o = base + b * 210u;
        uint ql = o + 64u * n + 32u * (c & 1u);
        uint qh = o + 128u + 32u * n;
        uint shift = 4u * (c >> 1);
        uint xo = p.x_offset + b * 256u + 128u * n + 32u * c;
        float s0 = 0.0, s1 = 0.0;
        [[unroll]] for (uint t = 0; t < 8u; t++) {
            uint lo = u32_at(ql + 4u * t);
            uint hi = u32_at(qh + 4u * t);
            [[unroll]] for (uint m = 0; m < 4u; m++) {
                uint l = 4u * t + m;
                uint v = ((lo >> (8u * m + shift)) & 15u) | (((hi >> (8u * m + 2u * c)) & 3u) << 4);
                float a = (float(v) - 32.0) * x[xo + l];
                if (l < 16u) {
                    s0 += a;
                } else {
                    s1 += a;
                }
            }
        }
        uint g = 8u * n + 2u * c;
        float sc0 = float(bitfieldExtract(int(byte_at(o + 192u + g)), 0, 8));
        float sc1 = float(bitfieldExtract(int(byte_at(o + 193u + g)), 0, 8));
        acc += f16_at(o + 208u) * (sc0 * s0 + sc1 * s1);
    }
    return acc;
}

#include "matvec_main.glsl"
