#version 450
// Q8_0 (34 B / 32 elements): d: f16, qs: [i8; 32]; value d * q.
#include "matvec_head.glsl"

float row_dot(uint row, uint tid) {
    uint nb = p.k / 32u;
    uint base = row * nb * 34u;
    float acc = 0.0;
    for (uint b = tid; b < nb; b += WG) {
        uint o = base + b * 34u;
        uint xo = p.x_offset + b * 32u;
        float s = 0.0;
        [[unroll]] for (uint j = 0; j < 8u; j++) {
            int q = int(u32_at(o + 2u + 4u * j));
            uint xi = xo + 4u * j;
            s += float(bitfieldExtract(q, 0, 8)) * x[xi]
               + float(bitfieldExtract(q, 8, 8)) * x[xi + 1u]
               + float(bitfieldExtract(q, 16, 8)) * x[xi + 2u]
               + float(bitfieldExtract(q, 24, 8)) * x[xi + 3u];
        }
        acc += f16_at(o) * s;
    }
    return acc;
}

#include "matvec_main.glsl"
