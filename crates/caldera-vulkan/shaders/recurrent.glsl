// The gates of the recurrent mixers (gdn_decode, gdn_chunk, mamba2_decode).

float sigmoid(float x) {
    return 1.0 / (1.0 + exp(-x));
}

// log(1 + y) for y in [0, 1], accurate near 0 (the error of 1 + y cancels out).
float log1p_small(float y) {
    float u = 1.0 + y;
    return u == 1.0 ? y : log(u) * (y / (u - 1.0));
}

// log(1 + e^x), linear above 20 as torch's softplus.
float softplus(float x) {
    if (x > 20.0) {
        return x;
    }
    return max(x, 0.0) + log1p_small(exp(-abs(x)));
}
