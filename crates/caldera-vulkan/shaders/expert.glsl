// What the expert mat-vecs of mv_expert.glsl (f32 input) and mvq_expert.glsl (int8
// input) share, included by them with EXPERT_BINDING set to their first extra binding.
//
// The weight piece holds experts e0 .. e0 + ne of a stacked expert tensor, each `rpe`
// rows (for MVG: gate/up pairs, row 2i gate i, 2i + 1 up i). The chosen experts come
// from the router's buffers: slot s uses expert ids[slot0 + s] with weight
// wts[slot0 + s]; a slot whose expert is not in this piece is skipped, so the same
// recorded dispatches serve any choice of experts.
//   per slot (MV_SUM off): workgroup g serves slot g / gpe, rows of it (g % gpe) * NR ..,
//     gpe = ceil(rpe / NR); output i of slot s lands at y[y_offset + s y_stride + i]:
//     act(gate + b) * (up + b) with MVG, else (row + b) or relu(row + b)^2 (MV_RELU2);
//   MV_SUM: workgroup g computes rows g NR .. of every slot and stores
//     y[y_offset + r] (+)= Σ_s wts[s] (W_{e_s} x_s + b_{e_s})[r] over the slots whose
//     expert is in this piece (the down projection of the chosen experts; with several
//     pieces, the later dispatches add with MV_ADD).
// Tokens: a dispatch serves every token of the step (as many as the routing holds);
// slot s (0 .. tokens x slots) is slot s % slots of token s / slots, its routing entry
// slot0 + (s / slots) id_stride + s % slots (an id of 0xffffffff, a token past the
// step's, is skipped). Slot s reads its input at element (s / x_div) x_stride (x_stride
// 0: one input shared by every slot); MV_SUM writes token t's outputs at t y_stride.
// Bias (MV_BIAS): f32 [n_experts][rpe], in the rows' order, indexed by the expert id.
// Binding EXPERT_BINDING: ids (u32). + 1: wts (f32). + 2: bias (f32; any buffer without
// MV_BIAS).

layout(std430, binding = EXPERT_BINDING) readonly buffer Ids { uint ids[]; };
layout(std430, binding = EXPERT_BINDING + 1) readonly buffer Wts { float wts[]; };
layout(std430, binding = EXPERT_BINDING + 2) readonly buffer Bias { float ebias[]; };

// (MV_RELU2, 256, is mv_common.glsl's: store() applies it after the bias.)
const uint MV_SUM = 512u;
const uint MV_BIAS = 1024u;
const uint MV_CLAMP = 2048u;

// The local index of slot s's expert in this piece, >= p.ne when it is not here.
// The routing entry of slot s.
uint slot_entry(uint s) {
    return p.slot0 + (s / p.slots) * p.id_stride + s % p.slots;
}

uint slot_expert(uint s) {
    return ids[slot_entry(s)] - p.e0;
}

float slot_weight(uint s) {
    return wts[slot_entry(s)];
}

// The element of slot s's input where it starts.
uint slot_input(uint s) {
    return (s / p.x_div) * p.x_stride;
}

float slot_bias(uint s, uint row) {
    return (p.flags & MV_BIAS) != 0u ? ebias[ids[slot_entry(s)] * p.rpe + row] : 0.0;
}

// The work of workgroup grp, which takes `per` of the `units` rows (or outputs) of a
// slot (MV_SUM: of a token): the first of them (`first`), its slots s0 .. s1 (MV_SUM:
// the token's, else one) and, with MV_SUM, the token. False where it has nothing to do
// (its slot's expert lives in another piece): the whole workgroup returns.
bool expert_work(uint grp, uint units, uint per, out uint tok, out uint s0, out uint s1,
                 out uint first) {
    bool sum = (p.flags & MV_SUM) != 0u;
    uint gpe = (units + per - 1u) / per;
    tok = grp / gpe;
    s0 = sum ? tok * p.slots : grp / gpe;
    s1 = sum ? s0 + p.slots : s0 + 1u;
    first = (grp % gpe) * per;
    return sum || slot_expert(s0) < p.ne;
}

// The gated activation of (gate, up): SiLU, GELU (tanh) or gpt-oss's clamped SwiGLU.
float glu_act(float g, float u) {
    return glu_of(g, u, (p.flags & MV_CLAMP) != 0u, (p.flags & MV_GELU) != 0u, p.limit, p.alpha);
}

// The value of row `row` of a per-slot (not MVG) mat-vec: dot + bias (store() applies
// relu^2 where MV_RELU2 asks for it).
float plain_out(uint s, uint row, float v) {
    return v + slot_bias(s, row);
}

// Σ over the slots s0 .. s1 whose expert is in this piece of wts * bias[row].
float sum_bias(uint s0, uint s1, uint row) {
    float b = 0.0;
    if ((p.flags & MV_BIAS) != 0u) {
        for (uint s = s0; s < s1; s++) {
            if (slot_expert(s) < p.ne) {
                b += slot_weight(s) * slot_bias(s, row);
            }
        }
    }
    return b;
}
