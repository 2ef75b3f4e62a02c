#version 450
// Batched decode mat-vec on int8 activations over Q4_K weights, column groups of 8 with
// one reduction pass, int8 dot products (see mvqn.glsl).
#define TYPE_Q4_K 1
#define USE_DOT 1
#define MVQN_GROUPED 1
#include "mvqn.glsl"
