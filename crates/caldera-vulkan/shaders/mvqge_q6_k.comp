#version 450
// Decode gate|up mat-vec with the GLU on int8 activations over Q6_K weights, emulated int8 dot (see mvq.glsl).
#define TYPE_Q6_K 1
#define USE_DOT 0
#define MVG 1
#include "mvq.glsl"
