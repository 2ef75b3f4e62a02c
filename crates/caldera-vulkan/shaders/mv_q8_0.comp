#version 450
// Decode mat-vec over Q8_0 weights (see mv.glsl).
#define TYPE_Q8_0 1
#include "mv.glsl"
