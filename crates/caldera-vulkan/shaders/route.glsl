// The MoE routing of one token, shared by moe_route.comp (one workgroup per token) and
// the fused router mat-vec (mv.glsl with MV_ROUTE: its last workgroup routes). From the
// token's n router logits choose k experts and their mixing weights, as caldera-cpu's
// `ffn::route`:
//   KIND_SOFTMAX:  p = softmax(logits); the top k of p, weighted by p (ROUTE_RENORM:
//                  divided by their sum);
//   KIND_TOPK:     the top k logits, weighted by the softmax over those k (gpt-oss);
//   KIND_SIGMOID:  s = sigmoid(logits); the top k of s + selection bias (ROUTE_SEL_BIAS),
//                  weighted by s (ROUTE_RENORM: divided by their sum + 1e-20);
// then every weight times `scale`. ROUTE_LOGIT_BIAS adds a bias to the logits first (a
// router with a bias). The top k come in descending order of the key, ties to the lower
// expert id (torch.topk and the CPU's stable sort).
// ROUTE_SHARED also fills slot k for the shared expert (a one-expert tensor): id 0 and
// weight 1, or sigmoid(logit n) with ROUTE_SHARED_GATE (its gate's logit, written by the
// router mat-vec as row n).
// The includer defines RWG (invocations of the workgroup, a power of two), the buffers
// lbias[] (logit bias), sbias[] (selection bias), ids[] (u32), wts[] (f32) and
// `float route_logit(uint i)` (logit i of the token, i <= n), then calls route_token
// from uniform control flow. n <= MAXE, k <= MAXK.

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

float route_max(float v) {
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

float route_add(float v) {
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

// Routes one token: its entries out0 .. out0 + k (+ 1 with ROUTE_SHARED) of ids / wts.
void route_token(uint n, uint k, uint kind, uint flags, float scale, uint out0) {
    uint t = gl_LocalInvocationID.x;
    bool lb = (flags & ROUTE_LOGIT_BIAS) != 0u;
    bool sb = (flags & ROUTE_SEL_BIAS) != 0u;
    float mx = -3.402823466e38;
    for (uint i = t; i < n; i += RWG) {
        float l = route_logit(i) + (lb ? lbias[i] : 0.0);
        val[i] = l;
        mx = max(mx, l);
    }
    if (kind == KIND_SOFTMAX) {
        mx = route_max(mx);
        float s = 0.0;
        for (uint i = t; i < n; i += RWG) {
            float e = exp(val[i] - mx);
            val[i] = e;
            s += e;
        }
        float inv = 1.0 / route_add(s);
        for (uint i = t; i < n; i += RWG) {
            float v = val[i] * inv;
            val[i] = v;
            key[i] = v;
        }
    } else if (kind == KIND_SIGMOID) {
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
    for (uint j = t; j < k; j += RWG) {
        chosen[j] = j;
    }
    barrier();
    // The top k by rank: expert i's rank is how many experts come before it (a larger
    // key, or an equal key and a lower id); ranks 0 .. k - 1 are the chosen, in order.
    // One pass, no reductions: each invocation ranks its experts against all n.
    // (Four keys per inner iteration: lavapipe caps the iterations of a loop, which
    // n = 1024 over workgroups of 16 would pass one at a time.)
    uint n4 = n & ~3u;
    for (uint i = t; i < n; i += RWG) {
        float ki = key[i];
        uint rank = 0u;
        for (uint j = 0u; j < n4; j += 4u) {
            [[unroll]] for (uint u = 0u; u < 4u; u++) {
                float kj = key[j + u];
                rank += (kj > ki || (kj == ki && j + u < i)) ? 1u : 0u;
            }
        }
        for (uint j = n4; j < n; j++) {
            float kj = key[j];
            rank += (kj > ki || (kj == ki && j < i)) ? 1u : 0u;
        }
        if (rank < k) {
            chosen[rank] = i;
        }
    }
    barrier();
    if (t != 0u) {
        return;
    }
    float w[MAXK];
    float tot = 0.0;
    if (kind == KIND_TOPK) {
        float m = -3.402823466e38;
        for (uint j = 0u; j < k; j++) {
            m = max(m, val[chosen[j]]);
        }
        for (uint j = 0u; j < k; j++) {
            w[j] = exp(val[chosen[j]] - m);
            tot += w[j];
        }
        float inv = 1.0 / tot;
        for (uint j = 0u; j < k; j++) {
            w[j] *= inv;
        }
    } else {
        for (uint j = 0u; j < k; j++) {
            w[j] = val[chosen[j]];
            tot += w[j];
        }
        if ((flags & ROUTE_RENORM) != 0u) {
            if (kind == KIND_SIGMOID) {
                tot += 1e-20;
            }
            for (uint j = 0u; j < k; j++) {
                w[j] /= tot;
            }
        }
    }
    for (uint j = 0u; j < k; j++) {
        ids[out0 + j] = chosen[j];
        wts[out0 + j] = w[j] * scale;
    }
    if ((flags & ROUTE_SHARED) != 0u) {
        ids[out0 + k] = 0u;
        wts[out0 + k] = (flags & ROUTE_SHARED_GATE) != 0u ? sigm(route_logit(n)) : 1.0;
    }
}
