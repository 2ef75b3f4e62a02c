// Shared by every kernel. Compiled twice by build-shaders.sh:
//   USE_SUBGROUP=1: reductions with subgroupAdd (needs subgroup arithmetic in compute);
//   USE_SUBGROUP=0: reductions through shared memory only (any Vulkan 1.1 device).
// Specialization constant 0 is the workgroup size WG (a power of two, >= 1).
#extension GL_EXT_control_flow_attributes : enable
#if USE_SUBGROUP
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif

layout(constant_id = 0) const uint WG = 64;
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

shared float red_buf[WG];

// Sum of `v` over the workgroup, returned to every invocation. Must be reached by the
// whole workgroup (uniform control flow).
float reduce_sum(float v) {
#if USE_SUBGROUP
    v = subgroupAdd(v);
    if (subgroupElect()) {
        red_buf[gl_SubgroupID] = v;
    }
    barrier();
    float s = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) {
        s += red_buf[i];
    }
    barrier();
    return s;
#else
    uint t = gl_LocalInvocationID.x;
    red_buf[t] = v;
    barrier();
    for (uint s = WG / 2; s > 0; s >>= 1) {
        if (t < s) {
            red_buf[t] += red_buf[t + s];
        }
        barrier();
    }
    float r = red_buf[0];
    barrier();
    return r;
#endif
}

// The flat workgroup index of a 2D dispatch (x is capped at maxComputeWorkGroupCount[0]).
uint flat_group() {
    return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
}
