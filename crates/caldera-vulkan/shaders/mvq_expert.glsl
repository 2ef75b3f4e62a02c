// The main of the expert mat-vecs on int8 activations (mvq.glsl with MV_EXPERT; the
// layout is expert.glsl's). The block dots run as in mvq.glsl's main, over (slot, block)
// pairs: each on the slot's expert rows and input block, times wts[s] with MV_SUM, all
// summed before the one reduction. MV_XNORM (one shared input only) and MV_TAIL
// work as in mvq.glsl: a tail over per-slot outputs quantizes them for the down
// projection (outputs of one slot must fill whole blocks of 32).
// Bindings 10, 11, 12: ids, wts, bias.
#define EXPERT_BINDING 10
#include "expert.glsl"

#if USE_SUBGROUP
// Specialization constant 3 (`Tuning::mvx_subgroup`): a subgroup per output, as
// mvq.glsl's MV_SG. Output j of the workgroup's ROWS (of one slot, or with MV_SUM of one
// token) belongs to subgroup j % (subgroups); its lanes sweep the output's (slot, block)
// pairs L lanes per block, and one subgroupAdd per weight row finishes it: no shared
// memory and no barrier, and every lane busy where a row has fewer blocks than the
// workgroup has block slots (gate|up over 2,048 inputs: 8 Q4_K blocks).
// With MV_TAIL and MV_BLKT (set by the host where ROWS divides 32 and every slot's or
// token's outputs fill whole blocks of 32), the tail runs per workgroup as mvq.glsl's
// MV_BLK: one count per workgroup, or with ROWS = 32 none.
layout(constant_id = 3) const uint MV_SG = 0u;
const uint MV_BLKT = 4096u;
void main_sg() {
    uint grp = flat_group();
    uint sg = gl_SubgroupID;
    uint nsg = gl_NumSubgroups;
    uint ln = gl_SubgroupInvocationID;
    bool sum = (p.flags & MV_SUM) != 0u;
    const uint PER = MVG != 0 ? 2u : 1u;
    uint ope = p.rpe / PER; // outputs per slot (MV_SUM: per token)
    uint tok, s0, s1, q0;
    if (!expert_work(grp, ope, ROWS, tok, s0, s1, q0)) {
        return;
    }
    uint lane = ln % L;
    uint bslots = gl_SubgroupSize / L;
    uint nb = p.k / BE;
    bool xnorm = (p.flags & MV_XNORM) != 0u;
    bool tail = (p.flags & MV_TAIL) != 0u;
    bool blk = tail && (p.flags & MV_BLKT) != 0u;
    const uint XPB = BE / 32u;
    uint total = (s1 - s0) * nb;
    // Output q0's index in y, less y_offset.
    uint obase = (sum ? tok : s0) * p.y_stride + q0;
    for (uint j = sg; j < ROWS; j += nsg) {
        uint q = min(q0 + j, ope - 1u);
        float a0 = 0.0;
        float a1 = 0.0;
        float ss = 0.0;
        for (uint it = ln / L; it < total; it += bslots) {
            uint s = s0 + it / nb;
            uint b = it % nb;
            uint le = slot_expert(s);
            if (le < p.ne) {
                float ws = sum ? slot_weight(s) : 1.0;
                uint row = le * p.rpe + PER * q;
                uint xb = slot_input(s) / BE + b;
                load_x(xb, lane);
                if (xnorm && lane < XPB) {
                    ss += xs[xb * XPB + lane];
                }
                a0 += ws * block_dot(row, b, lane);
#if MVG
                a1 += ws * block_dot(row + 1u, b, lane);
#endif
            }
        }
        a0 = subgroupAdd(a0);
#if MVG
        a1 = subgroupAdd(a1);
#endif
        ss = subgroupAdd(ss);
        if (subgroupElect() && q0 + j < ope) {
            float inv = xnorm ? inversesqrt(ss / float(p.k) + p.eps) : 1.0;
            uint o = obase + j;
            uint row = PER * (q0 + j);
#if MVG
            float g = a0 * inv + slot_bias(s0, row);
            float u = a1 * inv + slot_bias(s0, row + 1u);
            float v = store(o, glu_act(g, u));
#else
            float v = store(o, sum ? a0 + sum_bias(s0, s1, row) : plain_out(s0, row, a0 * inv));
#endif
            if (blk && ROWS == 32u) {
                blk_y[j] = v;
            } else if (blk) {
                memoryBarrierBuffer();
            } else if (tail) {
                tail_one(p.y_offset + o);
            }
        }
    }
    if (!blk) {
        return;
    }
    barrier();
    uint o0 = p.y_offset + obase;
    block_tail(o0, 32u % ROWS == 0u && o0 % ROWS == 0u && q0 + ROWS <= ope);
}
#endif

void main() {
#if USE_SUBGROUP
    if (MV_SG != 0u) {
        main_sg();
        return;
    }
#endif
    uint grp = flat_group();
    uint tid = gl_LocalInvocationID.x;
    bool sum = (p.flags & MV_SUM) != 0u;
    uint tok, s0, s1, r0;
    if (!expert_work(grp, p.rpe, NR, tok, s0, s1, r0)) {
        return;
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
