#version 450
// MoE router mat-vec over Q5_K weights whose last workgroup routes the token (see mv.glsl's MV_ROUTE, route.glsl).
#define TYPE_Q5_K 1
#define MV_ROUTE 1
#include "mv.glsl"
