#version 450
// Expert mat-vec on int8 activations over Q8_0 weights, emulated int8 dot, the experts chosen by the router (see expert.glsl, mvq.glsl).
#define TYPE_Q8_0 1
#define USE_DOT 0
#define MV_EXPERT 1
#include "mvq.glsl"
