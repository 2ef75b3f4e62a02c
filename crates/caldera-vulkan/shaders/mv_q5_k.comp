#version 450
// Decode mat-vec over Q5_K weights (see mv.glsl).
#define TYPE_Q5_K 1
#include "mv.glsl"
