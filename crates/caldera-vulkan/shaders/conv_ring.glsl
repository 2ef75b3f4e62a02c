// The conv state of gdn_decode and mamba2_decode; the including shader declares
// `par[]` (its constants, conv taps first) and `ring[]` (the conv state).
//
// Conv state as a ring of K rows of `cd` channels: the conv input of the token at
// position t sits in row t % K. A step at position `pos` reads rows (pos + 1 + i) % K,
// i < K - 1 (positions pos - K + 1 + i, zero before the sequence starts) and writes row
// pos % K, which nothing reads during that step: workgroups that share a channel (q/k
// of a key head, B/C of a group) may all read it while one of them writes it.

// RING_BASE (default 0): the ring's first value in `ring[]` (a batched step's slot).
#ifndef RING_BASE
#define RING_BASE 0u
#endif

// Causal depthwise conv of channel `ch` (taps par[ch * K + i], tap K-1 on the current
// input `x_new`; bias par[cd * K + ch]) over the ring at position `pos`, before the
// activation; with `write`, stores x_new in the ring.
float ring_conv(uint ch, float x_new, uint pos, uint cd, uint kern, bool write) {
    float acc = par[cd * kern + ch];
    for (uint i = 0u; i + 1u < kern; i++) {
        acc += par[ch * kern + i] * ring[RING_BASE + ((pos + 1u + i) % kern) * cd + ch];
    }
    acc += par[ch * kern + kern - 1u] * x_new;
    if (write) {
        ring[RING_BASE + (pos % kern) * cd + ch] = x_new;
    }
    return acc;
}
