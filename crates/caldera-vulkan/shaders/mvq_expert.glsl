// The main of the expert mat-vecs on int8 activations (mvq.glsl with MV_EXPERT; the
// layout is expert.glsl's). The block dots run as in mvq.glsl's main, over (slot, block)
// pairs: each on the slot's expert rows and input block, times wts[s] with MV_SUM, all
// summed before the one reduction. MV_XNORM (one shared input only) and MV_TAIL
// work as in mvq.glsl: a tail over per-slot outputs quantizes them for the down
// projection (outputs of one slot must fill whole blocks of 32).
// Bindings 10, 11, 12: ids, wts, bias.
#define EXPERT_BINDING 10
#include "expert.glsl"

void main() {
    uint grp = flat_group();
    uint tid = gl_LocalInvocationID.x;
    bool sum = (p.flags & MV_SUM) != 0u;
    uint gpe = (p.rpe + NR - 1u) / NR;
    uint tok = grp / gpe; // MV_SUM: the token
    uint s0 = sum ? tok * p.slots : grp / gpe;
    uint s1 = sum ? s0 + p.slots : s0 + 1u;
    uint r0 = (grp % gpe) * NR;
    if (!sum && slot_expert(s0) >= p.ne) {
        return; // the whole workgroup: its expert lives in another piece
    }
    float a[MAXR];
    [[unroll]] for (uint r = 0u; r < MAXR; r++) {
        a[r] = 0.0;
    }
    const uint SLOTS = WG / L;
    uint lane = tid % L;
    uint nb = p.k / BE;
    bool xnorm = (p.flags & MV_XNORM) != 0u;
    const uint XPB = BE / 32u;
    float ss = 0.0;
    // (slot, block) pairs spread over the block slots of the workgroup, so a short
    // down projection over many slots still keeps every lane busy.
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
        uint xb = slot_input(s) / BE + b;
        load_x(xb, lane);
        if (xnorm && lane < XPB) {
            ss += xs[xb * XPB + lane];
        }
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            if (r < NR) {
                a[r] += ws * block_dot(min(base + r, last), b, lane);
            }
        }
    }
    reduce_rows(a, ss);
    if (xnorm) {
        float inv = inversesqrt(ss / float(p.k) + p.eps);
        [[unroll]] for (uint r = 0u; r < MAXR; r++) {
            a[r] *= inv;
        }
    }
    bool tail = (p.flags & MV_TAIL) != 0u;
#if MVG
    [[unroll]] for (uint i = 0u; i < MAXR / 2u; i++) {
        uint row = r0 + 2u * i;
        if (i < ROWS && tid == i && row + 1u < p.rpe) {
            float g = a[2u * i] + slot_bias(s0, row);
            float u = a[2u * i + 1u] + slot_bias(s0, row + 1u);
            uint o = s0 * p.y_stride + row / 2u;
            store(o, glu_act(g, u));
            if (tail) {
                tail_one(p.y_offset + o);
            }
        }
    }
#else
    [[unroll]] for (uint r = 0u; r < MAXR; r++) {
        uint row = r0 + r;
        if (r < NR && tid == r && row < p.rpe) {
            uint o = (sum ? tok : s0) * p.y_stride + row;
            store(o, sum ? a[r] + sum_bias(s0, s1, row) : plain_out(s0, row, a[r]));
            if (tail) {
                tail_one(p.y_offset + o);
            }
        }
    }
#endif
}
