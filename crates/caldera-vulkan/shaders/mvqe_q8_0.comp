#version 450
// Decode mat-vec on int8 activations over Q8_0 weights, emulated int8 dot (see mvq.glsl).
#define TYPE_Q8_0 1
#define USE_DOT 0
#include "mvq.glsl"
