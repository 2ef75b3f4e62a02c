#version 450
// Decode gate|up mat-vec with the GLU over Q5_0 weights (see mv.glsl).
#define TYPE_Q5_0 1
#define MVG 1
#include "mv.glsl"
