#version 450
// MoE router mat-vec over IQ4_XS weights whose last workgroup routes the token (see mv.glsl's MV_ROUTE, route.glsl).
#define TYPE_IQ4_XS 1
#define MV_ROUTE 1
#include "mv.glsl"
