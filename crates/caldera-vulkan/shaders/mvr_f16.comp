#version 450
// MoE router mat-vec over F16 weights whose last workgroup routes the token (see mv.glsl's MV_ROUTE, route.glsl).
#define TYPE_F16 1
#define MV_ROUTE 1
#include "mv.glsl"
