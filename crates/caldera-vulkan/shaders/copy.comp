#version 450
// A plain device copy, b = a, 16 bytes per invocation step (grid-stride loop): how
// `bench` measures the memory bandwidth a kernel can reach on the device.
// Binding 0: a, 1: b. Push constant: n, 16-byte units.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer A { uvec4 a[]; };
layout(std430, binding = 1) writeonly buffer B { uvec4 b[]; };

layout(push_constant) uniform Push {
    uint n;
} p;

void main() {
    uint stride = gl_NumWorkGroups.x * gl_NumWorkGroups.y * WG;
    for (uint i = flat_group() * WG + gl_LocalInvocationID.x; i < p.n; i += stride) {
        b[i] = a[i];
    }
}
