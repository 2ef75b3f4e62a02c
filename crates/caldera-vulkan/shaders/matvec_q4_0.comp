#version 450
// Q4_0 (18 B / 32 elements): d: f16, qs[16]; element i < 16 is the low nibble of qs[i],
// element i + 16 the high nibble; value d * (q - 8).
#include "matvec_head.glsl"

float row_dot(uint row, uint tid) {
    uint nb = p.k / 32u;
    uint base = row * nb * 18u;
    float acc = 0.0;
    for (uint b = tid; b < nb; b += WG) {
        uint o = base + b * 18u;
        uint xo = p.x_offset + b * 32u;
        float s = 0.0;
        [[unroll]] for (uint j = 0; j < 4u; j++) {
            uint q = u32_at(o + 2u + 4u * j);
            [[unroll]] for (uint t = 0; t < 4u; t++) {
                uint v = (q >> (8u * t)) & 0xffu;
                uint i = xo + 4u * j + t;
                s += (float(v & 15u) - 8.0) * x[i] + (float(v >> 4) - 8.0) * x[i + 16u];
            }
        }
        acc += f16_at(o) * s;
    }
    return acc;
}

#include "matvec_main.glsl"
