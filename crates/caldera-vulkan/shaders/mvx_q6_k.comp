#version 450
// Expert mat-vec over Q6_K weights, the experts chosen by the router (see expert.glsl, mv.glsl).
#define TYPE_Q6_K 1
#define MV_EXPERT 1
#include "mv.glsl"
