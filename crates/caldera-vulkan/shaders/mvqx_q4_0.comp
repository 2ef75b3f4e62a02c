#version 450
// Expert mat-vec on int8 activations over Q4_0 weights, int8 dot products, the experts chosen by the router (see expert.glsl, mvq.glsl).
#define TYPE_Q4_0 1
#define USE_DOT 1
#define MV_EXPERT 1
#include "mvq.glsl"
