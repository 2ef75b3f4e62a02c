// Shared by the decode mat-vecs (mv.glsl, mvq.glsl), included after their bindings and
// push constants (which name the weights `w`, the output `y` and p.y_offset, p.flags,
// p.cap): launch shape, flag bits, word readers, activations and the output store.
#ifndef MVG
#define MVG 0
#endif

layout(constant_id = 1) const uint ROWS = 2; // outputs per workgroup
const uint MAXR = 8u; // weight rows per workgroup at most
#if MVG
const uint NR = 2u * ROWS;
#else
const uint NR = ROWS;
#endif

const uint MV_NORM = 1u;
const uint MV_ADD = 2u;
const uint MV_GELU = 8u;
const uint MV_SOFTCAP = 16u;
const uint MV_TAIL = 32u;
const uint MV_TAIL_NORM = 64u;
const uint MV_XNORM = 128u;
const uint MV_RELU2 = 256u;
// Profiling switches (CALDERA_VK_MV_DEBUG; wrong results): the block tails without the
// per-output fence, or without anything after the stores.
const uint MV_DBG_NOFENCE = 1024u;
const uint MV_DBG_NOTAIL = 2048u;

#include "words.glsl"
#include "act.glsl"

// y[y_offset + i] (=, or += with MV_ADD) s, soft-capped with MV_SOFTCAP, through
// max(s, 0)² with MV_RELU2 (the up projection of an ungated relu² MLP); returns the
// value stored.
float store(uint i, float s) {
    if ((p.flags & MV_SOFTCAP) != 0u) {
        s = p.cap * tanh(s / p.cap);
    }
    if ((p.flags & MV_RELU2) != 0u) {
        s = max(s, 0.0);
        s *= s;
    }
    uint yi = p.y_offset + i;
    if ((p.flags & MV_ADD) != 0u) {
        s += y[yi];
    }
    y[yi] = s;
    return s;
}
