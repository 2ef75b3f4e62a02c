#version 450
// MoE router mat-vec over Q4_K weights whose last workgroup routes the token (see mv.glsl's MV_ROUTE, route.glsl).
#define TYPE_Q4_K 1
#define MV_ROUTE 1
#include "mv.glsl"
