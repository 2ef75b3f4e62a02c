// The activations of gated MLPs.
float gelu_tanh(float v) {
    const float c = 0.7978845608;
    // tanh(u) = 1 - 2 / (exp(2u) + 1), finite for every u.
    float u = c * (v + 0.044715 * v * v * v);
    float t = 1.0 - 2.0 / (exp(min(2.0 * u, 80.0)) + 1.0);
    return 0.5 * v * (1.0 + t);
}

float silu(float v) {
    return v / (1.0 + exp(-v));
}

// A gated MLP's activation of (gate, up): gpt-oss's clamped SwiGLU when `clamped` (gate
// capped at `limit`, up clamped to +-limit, (up + 1) * gate * sigmoid(alpha * gate)),
// else GELU (tanh) or SiLU of the gate times up.
float glu_of(float g, float u, bool clamped, bool gelu, float limit, float alpha) {
    if (clamped) {
        g = min(g, limit);
        u = clamp(u, -limit, limit);
        return (u + 1.0) * g / (1.0 + exp(-alpha * g));
    }
    return (gelu ? gelu_tanh(g) : silu(g)) * u;
}
