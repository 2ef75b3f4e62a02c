#version 450
// Expert gate|up mat-vec with the GLU on int8 activations over MXFP4 weights, emulated int8 dot, the experts chosen by the router (see expert.glsl, mvq.glsl).
#define TYPE_MXFP4 1
#define USE_DOT 0
#define MVG 1
#define MV_EXPERT 1
#include "mvq.glsl"
