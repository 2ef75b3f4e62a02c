#version 450
// Decode mat-vec over Q5_1 weights (see mv.glsl).
#define TYPE_Q5_1 1
#include "mv.glsl"
