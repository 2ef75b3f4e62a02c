#version 450
// Expert gate|up mat-vec with the GLU over Q5_1 weights, the experts chosen by the router (see expert.glsl, mv.glsl).
#define TYPE_Q5_1 1
#define MVG 1
#define MV_EXPERT 1
#include "mv.glsl"
