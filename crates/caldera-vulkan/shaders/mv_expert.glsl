// The main of the expert mat-vecs on f32 activations (mv.glsl with MV_EXPERT; the layout
// is expert.glsl's). The dots run as in mv.glsl's main, over (slot, block) pairs: each on
// the slot's expert rows and input, times wts[s] with MV_SUM, all summed before the one
// reduction. MV_NORM (per-slot mode only) norms the slot's input as in mv.glsl.
// Bindings 4, 5, 6: ids, wts, bias.
#define EXPERT_BINDING 4
#include "expert.glsl"

void main() {
    uint grp = flat_group();
    uint tid = gl_LocalInvocationID.x;
    bool sum = (p.flags & MV_SUM) != 0u;
    bool norm = (p.flags & MV_NORM) != 0u;
    uint tok, s0, s1, r0;
    if (!expert_work(grp, p.rpe, NR, tok, s0, s1, r0)) {
        return;
    }
    // a[0 .. NR]: the rows' dot products; a[NR]: this invocation's share of sum(x^2).
    float a[MAXR + 1u];
    [[unroll]] for (uint r = 0u; r <= MAXR; r++) {
        a[r] = 0.0;
    }
    float ss = 0.0;
    // (slot, block) pairs spread over the workgroup, so a short down projection over
    // many slots still keeps every lane busy.
#if MV_FAST
    const uint SLOTS = WG / L;
    uint lane = tid % L;
    uint nb = p.k / BE;
    uint total = (s1 - s0) * nb;
    for (uint it = tid / L; it < total; it += SLOTS) {
        uint s = s0 + it / nb;
        uint b = it % nb;
        uint le = slot_expert(s);
        if (le >= p.ne) {
            continue;
        }
        float ws = sum ? slot_weight(s) : 1.0;
        uint base = le * p.rpe + r0;
        uint last = le * p.rpe + p.rpe - 1u;
        uint xo = slot_input(s) >> 2;
        vec4 xv[NXV];
        [[unroll]] for (uint i = 0u; i < NXV; i++) {
            uint c = (b * BE + xcol(lane, i)) >> 2;
            vec4 v = x4[xo + c];
            ss += dot(v, v);
            if (norm) {
                v *= gam4[c];
            }
            xv[i] = v;
        }
        xs = vec2(0.0);
        [[unroll]] for (uint i = 0u; i < NXV; i++) {
            xs[i * 2u / NXV] += dot(xv[i], vec4(1.0));
        }
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            if (r < NR) {
                a[r] += ws * block_dot(min(base + r, last), b, lane, xv);
            }
        }
    }
#else
    uint nsub = (p.k + 31u) / 32u;
    uint total = (s1 - s0) * nsub;
    for (uint it = tid; it < total; it += WG) {
        uint s = s0 + it / nsub;
        uint sb = it % nsub;
        uint le = slot_expert(s);
        if (le >= p.ne) {
            continue;
        }
        float ws = sum ? slot_weight(s) : 1.0;
        uint base = le * p.rpe + r0;
        uint last = le * p.rpe + p.rpe - 1u;
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            if (r < NR) {
                a[r] += ws * dot32(min(base + r, last), sb, slot_input(s));
            }
        }
    }
    if (norm) {
        uint x0 = slot_input(s0);
        for (uint i = tid; i < p.k; i += WG) {
            ss += x[x0 + i] * x[x0 + i];
        }
    }
#endif
    [[unroll]] for (uint r = 0u; r <= MAXR; r++) {
        if (r == NR) {
            a[r] = ss;
        }
    }
    reduce_rows(a);
    float inv = 1.0;
    [[unroll]] for (uint r = 0u; r <= MAXR; r++) {
        if (r == NR && norm) {
            inv = inversesqrt(a[r] / float(p.k) + p.eps);
        }
    }
#if MVG
    [[unroll]] for (uint i = 0u; i < MAXR / 2u; i++) {
        uint row = r0 + 2u * i;
        if (i < ROWS && tid == i && row + 1u < p.rpe) {
            float g = a[2u * i] * inv + slot_bias(s0, row);
            float u = a[2u * i + 1u] * inv + slot_bias(s0, row + 1u);
            store(s0 * p.y_stride + row / 2u, glu_act(g, u));
        }
    }
#else
    [[unroll]] for (uint r = 0u; r < MAXR; r++) {
        uint row = r0 + r;
        if (r < NR && tid == r && row < p.rpe) {
            if (sum) {
                store(tok * p.y_stride + row, a[r] + sum_bias(s0, s1, row));
            } else {
                store(s0 * p.y_stride + row, plain_out(s0, row, a[r] * inv));
            }
        }
    }
#endif
}
