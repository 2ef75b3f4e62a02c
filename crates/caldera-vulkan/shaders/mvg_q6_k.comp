#version 450
// Decode gate|up mat-vec with the GLU over Q6_K weights (see mv.glsl).
#define TYPE_Q6_K 1
#define MVG 1
#include "mv.glsl"
