#version 450
// Decode mat-vec over Q4_1 weights (see mv.glsl).
#define TYPE_Q4_1 1
#include "mv.glsl"
