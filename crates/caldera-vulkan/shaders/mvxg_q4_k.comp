#version 450
// Expert gate|up mat-vec with the GLU over Q4_K weights, the experts chosen by the router (see expert.glsl, mv.glsl).
#define TYPE_Q4_K 1
#define MVG 1
#define MV_EXPERT 1
#include "mv.glsl"
