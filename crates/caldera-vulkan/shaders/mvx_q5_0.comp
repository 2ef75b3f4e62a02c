#version 450
// Expert mat-vec over Q5_0 weights, the experts chosen by the router (see expert.glsl, mv.glsl).
#define TYPE_Q5_0 1
#define MV_EXPERT 1
#include "mv.glsl"
