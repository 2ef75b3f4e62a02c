#version 450
// F16 weights: 2 bytes per element.
#include "matvec_head.glsl"

float row_dot(uint row, uint tid) {
    uint base = row * p.k * 2u;
    float acc = 0.0;
    for (uint i = tid; i < p.k; i += WG) {
        acc += f16_at(base + 2u * i) * x[p.x_offset + i];
    }
    return acc;
}

#include "matvec_main.glsl"
