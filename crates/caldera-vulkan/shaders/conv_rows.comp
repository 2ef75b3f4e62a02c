#version 450
// Prefill of GatedDeltaNet (part 1 of 3) and Mamba2 (part 1 of 3): the causal conv +
// SiLU of the `cd` channels at `src` of each projection row (GatedDeltaNet's q|k|v at 0,
// Mamba2's xBC at d_inner), for the m = step[0] tokens of a step at positions
// p0 = step[1] ..; one invocation per
// channel runs through every token, so it reads the ring (conv_ring.glsl) for the
// tokens before p0 and then stores the step's last K - 1 inputs into it without a
// race.
// Binding 0: proj rows (f32, [m][ld]), 1: constants (conv taps [cd][K] | conv bias
// [cd] | ...), 2: conv ring ([K][cd]), 3: xc (f32, [m][cd]: the conv's outputs),
// 4: step values.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Proj { float proj[]; };
layout(std430, binding = 1) readonly buffer Par { float par[]; };
layout(std430, binding = 2) buffer Ring { float ring[]; };
layout(std430, binding = 3) writeonly buffer Xc { float xc[]; };
layout(std430, binding = 4) readonly buffer Sbuf { uint step[]; };

#include "act.glsl"

layout(push_constant) uniform Push {
    uint cd;
    uint kern;
    uint ld;
    uint max_t; // rows the buffers hold (step[0] beyond it is clamped)
    uint src;   // offset of the channels in a row
} p;

void main() {
    uint ch = flat_group() * WG + gl_LocalInvocationID.x;
    if (ch >= p.cd) {
        return;
    }
    uint m = min(step[0], p.max_t);
    uint p0 = step[1];
    uint k = p.kern;
    for (uint t = 0u; t < m; t++) {
        float acc = par[p.cd * k + ch];
        for (uint i = 0u; i < k; i++) {
            uint back = k - 1u - i; // the input `back` tokens before t
            float x = t >= back ? proj[(t - back) * p.ld + p.src + ch]
                                : ring[((p0 + t + k - back) % k) * p.cd + ch];
            acc += par[ch * k + i] * x;
        }
        xc[t * p.cd + ch] = silu(acc);
    }
    for (uint t = m + 1u > k ? m + 1u - k : 0u; t < m; t++) {
        ring[((p0 + t) % k) * p.cd + ch] = proj[t * p.ld + p.src + ch];
    }
}
