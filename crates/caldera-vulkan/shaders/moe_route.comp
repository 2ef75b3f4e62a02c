#version 450
// MoE router, one workgroup per token t of the step: from token t's router logits (n experts, written by a mat-vec)
// choose k experts and their mixing weights, as caldera-cpu's `ffn::route`:
//   KIND_SOFTMAX:  p = softmax(logits); the top k of p, weighted by p (ROUTE_RENORM:
//                  divided by their sum);
//   KIND_TOPK:     the top k logits, weighted by the softmax over those k (gpt-oss);
//   KIND_SIGMOID:  s = sigmoid(logits); the top k of s + selection bias (ROUTE_SEL_BIAS),
//                  weighted by s (ROUTE_RENORM: divided by their sum + 1e-20);
// then every weight times `scale`. ROUTE_LOGIT_BIAS adds a bias to the logits first (a
// router with a bias). The top k come in descending order of the key, ties to the lower
// expert id (torch.topk and the CPU's stable sort).
// ROUTE_SHARED also fills slot k for the shared expert (a one-expert tensor): id 0 and
// weight 1, or sigmoid(logits[n]) with ROUTE_SHARED_GATE (its gate's logit, written by the
// router mat-vec as row n).
// One workgroup of 128 per token; n <= MAXE, k <= MAXK. Token t reads logits row t (ld
// values apart) and writes entries t (k + shared) ..; a token past the step's (t >=
// step[0]) gets ids 0xffffffff, which the expert mat-vecs skip.
// Binding 0: logits (f32, n, n + 1 with ROUTE_SHARED_GATE). 1: logit bias (f32, n; any
// buffer without ROUTE_LOGIT_BIAS). 2: selection bias (f32, n; any buffer without
// ROUTE_SEL_BIAS). 3: ids (u32, k (+ 1) per token). 4: weights (f32, the same).
// 5: step values (u32; step[0] = tokens in the step).

layout(local_size_x = 128, local_size_y = 1, local_size_z = 1) in;
const uint RWG = 128u;

layout(std430, binding = 0) readonly buffer Lbuf { float logits[]; };
layout(std430, binding = 1) readonly buffer LBbuf { float lbias[]; };
layout(std430, binding = 2) readonly buffer SBbuf { float sbias[]; };
layout(std430, binding = 3) writeonly buffer Ibuf { uint ids[]; };
layout(std430, binding = 4) writeonly buffer Wbuf { float wts[]; };
layout(std430, binding = 5) readonly buffer Sbuf { uint step[]; };

layout(push_constant) uniform Push {
    uint n;
    uint k;
    uint kind;
    uint flags;
    float scale;
    uint ld; // logits values between tokens
} p;

const uint KIND_SOFTMAX = 0u;
const uint KIND_TOPK = 1u;
const uint KIND_SIGMOID = 2u;
const uint ROUTE_RENORM = 1u;
const uint ROUTE_SEL_BIAS = 2u;
const uint ROUTE_LOGIT_BIAS = 4u;
const uint ROUTE_SHARED = 8u;
const uint ROUTE_SHARED_GATE = 16u;

const uint MAXE = 1024u;
const uint MAXK = 32u;
const uint NONE = 0xffffffffu;

shared float val[MAXE]; // what the weights are taken from: p, the logit or s
shared float key[MAXE]; // what the top k is chosen by
shared float rv[RWG];
shared uint chosen[MAXK];

float sigm(float v) {
    return 1.0 / (1.0 + exp(-v));
}


float reduce_max(float v) {
    uint t = gl_LocalInvocationID.x;
    rv[t] = v;
    barrier();
    for (uint h = RWG / 2u; h > 0u; h >>= 1) {
        if (t < h) {
            rv[t] = max(rv[t], rv[t + h]);
        }
        barrier();
    }
    float r = rv[0];
    barrier();
    return r;
}

float reduce_add(float v) {
    uint t = gl_LocalInvocationID.x;
    rv[t] = v;
    barrier();
    for (uint h = RWG / 2u; h > 0u; h >>= 1) {
        if (t < h) {
            rv[t] += rv[t + h];
        }
        barrier();
    }
    float r = rv[0];
    barrier();
    return r;
}


void main() {
    uint t = gl_LocalInvocationID.x;
    uint tok = gl_WorkGroupID.x;
    uint per = p.k + ((p.flags & ROUTE_SHARED) != 0u ? 1u : 0u);
    uint out0 = tok * per;
    if (tok >= step[0]) {
        for (uint j = t; j < per; j += RWG) {
            ids[out0 + j] = NONE;
            wts[out0 + j] = 0.0;
        }
        return;
    }
    uint l0 = tok * p.ld;
    uint n = p.n;
    bool lb = (p.flags & ROUTE_LOGIT_BIAS) != 0u;
    bool sb = (p.flags & ROUTE_SEL_BIAS) != 0u;
    float mx = -3.402823466e38;
    for (uint i = t; i < n; i += RWG) {
        float l = logits[l0 + i] + (lb ? lbias[i] : 0.0);
        val[i] = l;
        mx = max(mx, l);
    }
    if (p.kind == KIND_SOFTMAX) {
        mx = reduce_max(mx);
        float s = 0.0;
        for (uint i = t; i < n; i += RWG) {
            float e = exp(val[i] - mx);
            val[i] = e;
            s += e;
        }
        float inv = 1.0 / reduce_add(s);
        for (uint i = t; i < n; i += RWG) {
            float v = val[i] * inv;
            val[i] = v;
            key[i] = v;
        }
    } else if (p.kind == KIND_SIGMOID) {
        for (uint i = t; i < n; i += RWG) {
            float v = sigm(val[i]);
            val[i] = v;
            key[i] = v + (sb ? sbias[i] : 0.0);
        }
    } else {
        for (uint i = t; i < n; i += RWG) {
            key[i] = val[i];
        }
    }
    // (Fallback picks should the keys hold NaNs, which rank nothing.)
    if (t < p.k) {
        chosen[t] = t;
    }
    barrier();
    // The top k by rank: expert i's rank is how many experts come before it (a larger
    // key, or an equal key and a lower id); ranks 0 .. k - 1 are the chosen, in order.
    // One pass, no reductions: each invocation ranks its experts against all n.
    for (uint i = t; i < n; i += RWG) {
        float ki = key[i];
        uint rank = 0u;
        for (uint j = 0u; j < n; j++) {
            float kj = key[j];
            rank += (kj > ki || (kj == ki && j < i)) ? 1u : 0u;
        }
        if (rank < p.k) {
            chosen[rank] = i;
        }
    }
    barrier();
    if (t != 0u) {
        return;
    }
    float w[MAXK];
    float tot = 0.0;
    if (p.kind == KIND_TOPK) {
        float m = -3.402823466e38;
        for (uint j = 0u; j < p.k; j++) {
            m = max(m, val[chosen[j]]);
        }
        for (uint j = 0u; j < p.k; j++) {
            w[j] = exp(val[chosen[j]] - m);
            tot += w[j];
        }
        float inv = 1.0 / tot;
        for (uint j = 0u; j < p.k; j++) {
            w[j] *= inv;
        }
    } else {
        for (uint j = 0u; j < p.k; j++) {
            w[j] = val[chosen[j]];
            tot += w[j];
        }
        if ((p.flags & ROUTE_RENORM) != 0u) {
            if (p.kind == KIND_SIGMOID) {
                tot += 1e-20;
            }
            for (uint j = 0u; j < p.k; j++) {
                w[j] /= tot;
            }
        }
    }
    for (uint j = 0u; j < p.k; j++) {
        ids[out0 + j] = chosen[j];
        wts[out0 + j] = w[j] * p.scale;
    }
    if ((p.flags & ROUTE_SHARED) != 0u) {
        ids[out0 + p.k] = 0u;
        wts[out0 + p.k] = (p.flags & ROUTE_SHARED_GATE) != 0u ? sigm(logits[l0 + n]) : 1.0;
    }
}
