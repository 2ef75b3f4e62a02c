#version 450
// Mixture-of-experts routing, one workgroup per token t < min(step[0], max_t): the
// router's logits l (row t of [max_t][n]) become mixing weights w (row t of [max_t][n]),
// zero for the experts not chosen; caldera-cpu's `ffn::route` defines them:
//   kind 0 (softmax):        p = softmax(l); the k largest p (renormed to sum 1 with
//                            F_RENORM)
//   kind 1 (top-k softmax):  the k largest l, softmax over them
//   kind 2 (sigmoid):        s = sigmoid(l); the k largest s + bias, weighted by s
//                            (renormed with F_RENORM: s / (sum + 1e-20))
// then times `scale`. Ties go to the lower expert id.
// Binding 0: logits (f32), 1: bias (f32, n; read with F_BIAS), 2: w (f32), 3: step values.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Lbuf { float logit[]; };
layout(std430, binding = 1) readonly buffer Bbuf { float bias[]; };
layout(std430, binding = 2) writeonly buffer Wbuf { float w[]; };
layout(std430, binding = 3) readonly buffer Step { uint step[]; };

const uint F_RENORM = 1u;
const uint F_BIAS = 2u;
const uint MAX_E = 1024u;
const uint MAX_K = 64u;

layout(push_constant) uniform Push {
    uint n;     // experts (<= MAX_E)
    uint k;     // chosen per token (<= MAX_K, <= n)
    uint kind;
    uint flags;
    float scale;
    uint max_t;
} p;

shared float val_s[MAX_E]; // the value an expert is weighted by
shared float sel_s[MAX_E]; // the value experts are chosen by
shared uint chosen_s[MAX_E];
shared uint top_s[MAX_K];
shared float wt_s[MAX_K];

void main() {
    uint t = flat_group();
    if (t >= min(step[0], p.max_t)) {
        return; // uniform for the workgroup
    }
    uint tid = gl_LocalInvocationID.x;
    uint base = t * p.n;
    float mx = -1e30;
    for (uint e = tid; e < p.n; e += WG) {
        float l = logit[base + e];
        mx = max(mx, l);
        val_s[e] = l;
        chosen_s[e] = 0u;
    }
    // The largest logit (for the softmax of kind 0).
    red_buf[tid] = mx;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s) {
            red_buf[tid] = max(red_buf[tid], red_buf[tid + s]);
        }
        barrier();
    }
    mx = red_buf[0];
    barrier();
    float sum = 0.0;
    for (uint e = tid; e < p.n; e += WG) {
        float l = val_s[e];
        float v = l;
        if (p.kind == 0u) {
            v = exp(l - mx);
            sum += v;
        } else if (p.kind == 2u) {
            v = 1.0 / (1.0 + exp(-l));
        }
        val_s[e] = v;
        sel_s[e] = p.kind == 2u && (p.flags & F_BIAS) != 0u ? v + bias[e] : v;
    }
    sum = reduce_sum(sum);
    if (p.kind == 0u) {
        for (uint e = tid; e < p.n; e += WG) {
            val_s[e] /= sum;
            sel_s[e] = val_s[e];
        }
    }
    barrier();
    if (tid == 0u) {
        // The k largest selection values, one pass each (k is small).
        for (uint j = 0u; j < p.k; j++) {
            uint best = p.n;
            for (uint e = 0u; e < p.n; e++) {
                if (chosen_s[e] == 0u && (best == p.n || sel_s[e] > sel_s[best])) {
                    best = e;
                }
            }
            best = min(best, p.n - 1u);
            top_s[j] = best;
            chosen_s[best] = 1u;
        }
        float tmx = -1e30;
        for (uint j = 0u; j < p.k; j++) {
            tmx = max(tmx, val_s[top_s[j]]);
        }
        float tot = 0.0;
        for (uint j = 0u; j < p.k; j++) {
            float v = val_s[top_s[j]];
            if (p.kind == 1u) {
                v = exp(v - tmx);
            }
            wt_s[j] = v;
            tot += v;
        }
        float div = 1.0;
        if (p.kind == 1u) {
            div = tot;
        } else if ((p.flags & F_RENORM) != 0u) {
            div = p.kind == 2u ? tot + 1e-20 : tot;
        }
        for (uint j = 0u; j < p.k; j++) {
            wt_s[j] = wt_s[j] / div * p.scale;
        }
    }
    barrier();
    for (uint e = tid; e < p.n; e += WG) {
        float v = 0.0;
        for (uint j = 0u; j < p.k; j++) {
            if (top_s[j] == e) {
                v = wt_s[j];
            }
        }
        w[base + e] = v;
    }
}
