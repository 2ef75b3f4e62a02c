#version 450
// Batched decode mat-vec on int8 activations over Q8_0 weights, emulated int8 dot products (see mvqn.glsl).
#define TYPE_Q8_0 1
#define USE_DOT 0
#include "mvqn.glsl"
