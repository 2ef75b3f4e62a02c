#version 450
// MoE router mat-vec over Q4_1 weights whose last workgroup routes the token (see mv.glsl's MV_ROUTE, route.glsl).
#define TYPE_Q4_1 1
#define MV_ROUTE 1
#include "mv.glsl"
