#version 450
// Decode mat-vec over Q4_0 weights (see mv.glsl).
#define TYPE_Q4_0 1
#include "mv.glsl"
