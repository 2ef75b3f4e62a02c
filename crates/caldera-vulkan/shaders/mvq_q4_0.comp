#version 450
// Decode mat-vec on int8 activations over Q4_0 weights, int8 dot products (see mvq.glsl).
#define TYPE_Q4_0 1
#define USE_DOT 1
#include "mvq.glsl"
