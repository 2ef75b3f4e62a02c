#version 450
// Decode mat-vec over Q5_0 weights (see mv.glsl).
#define TYPE_Q5_0 1
#include "mv.glsl"
